"""`dermfed evaluate`: every available arm, identical heads, several seeds, one metrics.json.

For each arm: features of the train/val/test images are computed once (or every epoch for
the training images when `evaluation.augment`); for each seed a head is trained, the best
epoch is chosen on validation data, and the test set is scored pooled and per site (and, for
synthetic data with the shortcut switch, on the test images where the artefact no longer
matches the class). Results over seeds get a mean and a 95% confidence interval.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from common.augment import build_augmentation
from common.checkpoint import checkpoint_config, load_checkpoint
from common.config import DermFedConfig, write_config
from common.data.catalog import DataError
from common.data.pipeline import prepare_data
from common.data.splits import split_indices
from common.data.synthetic import shortcut_matches_class
from server.evaluation.arms import Arm, ArmUnavailable, checkpoint_arm, imagenet_arm, random_arm
from server.evaluation.features import FeatureExtractor
from server.evaluation.heads import train_head
from server.evaluation.metrics import classification_metrics, mean_ci

log = logging.getLogger("dermfed.evaluate")

SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_auroc")


def _arms(config: DermFedConfig, checkpoint: Path, encoder_name: str, imagenet_weights: Optional[str],
          pooled: Optional[str], local: Optional[str], skipped: dict[str, str]) -> Iterator[Arm]:
    """Build each requested arm when its turn comes (one encoder in memory at a time); record the skipped."""
    makers = {
        "federated": lambda: checkpoint_arm("federated", checkpoint),
        "imagenet": lambda: imagenet_arm(config.evaluation.imagenet_model, imagenet_weights),
        "random": lambda: random_arm(encoder_name, config.seed),
        "pooled": lambda: checkpoint_arm("pooled", pooled) if pooled else None,
        "local": lambda: checkpoint_arm("local", local) if local else None,
    }
    for key in config.evaluation.arms:
        try:
            arm = makers[key]()
        except ArmUnavailable as exc:
            skipped[key] = str(exc)
            print(f"arm {key} skipped: {exc}", flush=True)
            continue
        if arm is None:
            skipped[key] = f"not requested (pass --{key} CHECKPOINT from `dermfed pretrain`)"
            continue
        yield arm


def _summaries(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    return {name: mean_ci([run[name] for run in per_seed], bounds=(0.0, 1.0)) for name in SUMMARY_METRICS}


def _curves(histories: list[list[dict[str, float]]]) -> dict[str, list[float]]:
    """Per-epoch mean and standard deviation over seeds."""
    keys = [k for k in histories[0][0] if k != "epoch"]
    curves: dict[str, list[float]] = {"epoch": [h["epoch"] for h in histories[0]]}
    for key in keys:
        values = np.array([[h[key] for h in history] for history in histories])
        curves[key] = values.mean(axis=0).tolist()
        curves[f"{key}_std"] = values.std(axis=0).tolist()
    return curves


def evaluate_arm(arm: Arm, config: DermFedConfig, prepared, rows: dict[str, np.ndarray], labels: np.ndarray,
                 sites: np.ndarray, shortcut_mask: Optional[np.ndarray]) -> dict[str, Any]:
    cfg = config.evaluation
    extract = FeatureExtractor(arm.encoder, prepared.store, cfg.feature_batch_size)
    started = time.perf_counter()
    cached = {split: extract(index, desc=f"{arm.key} {split} features") for split, index in rows.items()}
    feature_seconds = time.perf_counter() - started
    augment = build_augmentation(config.train.augment) if cfg.augment else None

    def train_features(epoch: int) -> np.ndarray:
        if augment is None:
            return cached["train"]
        return extract(rows["train"], transform=augment, desc=f"{arm.key} augmented features")

    classes = prepared.catalog.classes
    per_seed, histories = [], []
    for seed in cfg.seeds:
        run = train_head(cfg, train_features, labels[rows["train"]], cached["val"], labels[rows["val"]], len(classes), seed)
        histories.append(run.history)
        proba = run.predict_proba(cached["test"])
        truth = labels[rows["test"]]
        result = {"seed": seed, "best_epoch": run.best_epoch, **classification_metrics(truth, proba, classes)}
        test_sites = sites[rows["test"]]
        result["per_site"] = {site: classification_metrics(truth[test_sites == site], proba[test_sites == site], classes)
                              for site in sorted(set(test_sites))}
        if shortcut_mask is not None:
            mismatch = ~shortcut_mask[rows["test"]]
            result["shortcut"] = {
                "artefact_mismatches_class": classification_metrics(truth[mismatch], proba[mismatch], classes),
                "artefact_matches_class": classification_metrics(truth[~mismatch], proba[~mismatch], classes),
            }
        per_seed.append(result)
    summary = _summaries(per_seed)
    sites_summary = {site: _summaries([r["per_site"][site] for r in per_seed]) for site in per_seed[0]["per_site"]}
    out: dict[str, Any] = {
        "key": arm.key, "label": arm.label, "source": arm.source, "feature_dim": int(cached["train"].shape[1]),
        "feature_seconds": feature_seconds, "curves": _curves(histories), "seeds": per_seed, "summary": summary,
        "per_site": sites_summary,
        "confusion_matrix": np.sum([r["confusion_matrix"] for r in per_seed], axis=0).tolist(),
        "per_class_recall": {c: mean_ci([r["per_class_recall"][c] for r in per_seed], bounds=(0.0, 1.0)) for c in classes},
        "final_gap": mean_ci([h[-1]["gap"] for h in histories], bounds=(-1.0, 1.0)),
    }
    if shortcut_mask is not None:
        out["shortcut"] = {name: mean_ci([r["shortcut"][name]["accuracy"] for r in per_seed], bounds=(0.0, 1.0))
                           for name in ("artefact_mismatches_class", "artefact_matches_class")}
    return out


def run_evaluation(config: DermFedConfig, checkpoint: Path, out: Path, imagenet_weights: Optional[str] = None,
                   pooled: Optional[str] = None, local: Optional[str] = None) -> dict[str, Any]:
    """Evaluate every available arm on the labelled data of `config`; write metrics.json (and config.yaml)."""
    checkpoint = Path(checkpoint)
    pretraining = load_checkpoint(checkpoint)
    size = config.evaluation.image_size or checkpoint_config(pretraining).data.image_size
    config = config.model_copy(update={"data": config.data.model_copy(update={"image_size": size})})
    out.mkdir(parents=True, exist_ok=True)
    write_config(config, out)
    prepared = prepare_data(config)
    if not prepared.catalog.labelled:
        raise DataError(f"evaluation needs labels; data.format={config.data.format} has none")
    rows = {split: split_indices(prepared.catalog, split) for split in ("train", "val", "test")}
    empty = [split for split, index in rows.items() if len(index) == 0]
    if empty:
        raise DataError(f"the {', '.join(empty)} split is empty; adjust data.val_fraction / data.test_fraction")
    labels = prepared.catalog.label_indices().to_numpy()
    sites = prepared.catalog.frame["site"].to_numpy()
    shortcut_mask = None
    if "shortcut_artifact" in prepared.catalog.frame.columns and config.synth.shortcut:
        shortcut_mask = shortcut_matches_class(prepared.catalog.frame, config.synth.shortcut_class).to_numpy()
    skipped: dict[str, str] = {}
    results = []
    for arm in _arms(config, checkpoint, pretraining["encoder_name"], imagenet_weights, pooled, local, skipped):
        print(f"evaluating {arm.label} ({arm.source})", flush=True)
        results.append(evaluate_arm(arm, config, prepared, rows, labels, sites, shortcut_mask))
        summary = results[-1]["summary"]
        print("  " + ", ".join(f"{k} {summary[k]['mean']:.3f}" for k in SUMMARY_METRICS if summary[k]["mean"] is not None),
              flush=True)
    if not results:
        raise DataError(f"no arm could run: {skipped}")
    metrics = {
        "checkpoint": str(checkpoint.resolve()),
        "pretraining": {"position": pretraining["position"], "encoder": pretraining["encoder_name"],
                        "history": pretraining["history"], "arm": pretraining.get("extra", {}).get("arm")},
        "data": {"format": config.data.format, "root": config.data.root, "image_size": size,
                 "classes": prepared.catalog.classes, "sites": prepared.catalog.sites,
                 "split_sizes": {k: int(len(v)) for k, v in rows.items()},
                 "shortcut": ({"artifact": config.synth.shortcut_artifact, "class": config.synth.shortcut_class}
                              if shortcut_mask is not None else None)},
        "head": config.evaluation.model_dump(mode="json"),
        "arms": results,
        "skipped_arms": skipped,
    }
    metrics = _finite_or_none(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
    return metrics


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN: an undefined metric (e.g. AUROC of a one-class site) becomes null."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
