"""`dermfed evaluate`: every available arm, identical heads, several seeds, paired uncertainty, one metrics.json.

For each arm: no image it pretrained on may be in the validation or test split (`leakage.py`);
features of every image are computed once (or every epoch for the training images when
`evaluation.augment`); for each split seed and head seed a head is trained, its best epoch
chosen on validation data, and the test set is scored pooled, per site and (synthetic data with
the shortcut switch) where the artefact no longer matches the class. Then the paired bootstrap
(`uncertainty.py`) gives every arm's interval and, the study's answer, each difference between
the federated arm and the others on the same test images.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from common.augment import build_augmentation
from common.checkpoint import checkpoint_config, load_checkpoint
from common.config import ConfigError, DermFedConfig, write_config
from common.data.catalog import Catalog, DataError
from common.data.pipeline import PreparedData, prepare_data
from common.data.splits import assign_splits, split_indices
from common.data.synthetic import shortcut_matches_class
from server.evaluation.arms import Arm, ArmUnavailable, checkpoint_arm, imagenet_arm, random_arm
from server.evaluation.features import FeatureExtractor
from server.evaluation.heads import train_head
from server.evaluation.leakage import overlap, refuse_leaks
from server.evaluation.metrics import classification_metrics, mean_ci
from server.evaluation.uncertainty import (
    METRICS,
    ArmReplicates,
    arm_replicates,
    cluster_weights,
    difference,
    interval,
    nanmean,
)

log = logging.getLogger("dermfed.evaluate")

SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_auroc")
COMPARED_METRICS = ("balanced_accuracy", "macro_auroc")
REFERENCE_ARM = "federated"
PREDICTIONS_NAME = "predictions.npz"


@dataclass
class Split:
    """One train/val/test split of the evaluation's catalog, and its bootstrap weights over test lesions."""

    seed: int
    catalog: Catalog
    rows: dict[str, np.ndarray]
    weights: np.ndarray  # replicates x test images


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


def make_splits(config: DermFedConfig, prepared: PreparedData, rng: np.random.Generator) -> list[Split]:
    """The split of `seed`, plus one per `evaluation.split_seeds`; each with its bootstrap weights."""
    seeds = list(dict.fromkeys([config.seed, *config.evaluation.split_seeds])) if config.evaluation.split_seeds \
        else [config.seed]
    if len(seeds) > 1 and prepared.catalog.predefined_splits:
        raise ConfigError(f"evaluation.split_seeds={config.evaluation.split_seeds}: data.format={config.data.format} "
                          "defines its own split, which cannot be redrawn; leave evaluation.split_seeds empty")
    splits = []
    for seed in seeds:
        catalog = prepared.catalog if seed == config.seed else assign_splits(
            prepared.catalog, config.data.val_fraction, config.data.test_fraction, seed)
        rows = {name: split_indices(catalog, name) for name in ("train", "val", "test")}
        empty = [name for name, index in rows.items() if len(index) == 0]
        if empty:
            raise DataError(f"the {', '.join(empty)} split is empty; adjust data.val_fraction / data.test_fraction")
        groups = catalog.frame["group"].to_numpy()[rows["test"]]
        splits.append(Split(seed, catalog, rows, cluster_weights(groups, config.evaluation.bootstrap_replicates, rng)))
    return splits


def _curves(histories: list[list[dict[str, float]]]) -> dict[str, list[float]]:
    """Per-epoch mean and standard deviation over seeds."""
    keys = [k for k in histories[0][0] if k != "epoch"]
    curves: dict[str, list[float]] = {"epoch": [h["epoch"] for h in histories[0]]}
    for key in keys:
        values = np.array([[h[key] for h in history] for history in histories])
        curves[key] = values.mean(axis=0).tolist()
        curves[f"{key}_std"] = values.std(axis=0).tolist()
    return curves


def evaluate_arm(arm: Arm, config: DermFedConfig, prepared: PreparedData, splits: list[Split], labels: np.ndarray,
                 sites: np.ndarray, shortcut_mask: Optional[np.ndarray]) -> tuple[dict[str, Any], dict[int, list[np.ndarray]]]:
    """Heads for every split and seed; returns the arm's results and its test probabilities per split."""
    cfg = config.evaluation
    leaks = {split.seed: overlap(arm.pretraining, split.catalog) for split in splits}
    for counts in leaks.values():
        refuse_leaks(arm.key, arm.label, counts)
    extract = FeatureExtractor(arm.encoder, prepared.store, cfg.feature_batch_size)
    started = time.perf_counter()
    features = extract(np.arange(len(prepared.catalog)), desc=f"{arm.key} features")  # every image, once
    feature_seconds = time.perf_counter() - started
    augment = build_augmentation(config.train.augment) if cfg.augment else None
    classes = prepared.catalog.classes
    per_seed, histories, probabilities = [], [], {}
    for split in splits:
        rows = split.rows

        def train_features(epoch: int, rows: dict[str, np.ndarray] = rows) -> np.ndarray:
            if augment is None:
                return features[rows["train"]]
            return extract(rows["train"], transform=augment, desc=f"{arm.key} augmented features")

        probabilities[split.seed] = []
        for seed in cfg.seeds:
            run = train_head(cfg, train_features, labels[rows["train"]], features[rows["val"]], labels[rows["val"]],
                             len(classes), seed)
            histories.append(run.history)
            proba = run.predict_proba(features[rows["test"]])
            probabilities[split.seed].append(proba)
            truth, test_sites = labels[rows["test"]], sites[rows["test"]]
            result = {"split_seed": split.seed, "seed": seed, "best_epoch": run.best_epoch,
                      "gap_at_best": run.history[run.best_epoch - 1]["gap"], "gap_last": run.history[-1]["gap"],
                      **classification_metrics(truth, proba, classes)}
            result["per_site"] = {site: classification_metrics(truth[test_sites == site], proba[test_sites == site], classes)
                                  for site in sorted(set(test_sites))}
            per_seed.append(result)
    out: dict[str, Any] = {
        "key": arm.key, "label": arm.label, "source": arm.source, "feature_dim": int(features.shape[1]),
        "feature_seconds": feature_seconds, "curves": _curves(histories), "seeds": per_seed,
        "pretraining_overlap": leaks[splits[0].seed] if len(splits) == 1 else {str(k): v for k, v in leaks.items()},
        "confusion_matrix": np.sum([r["confusion_matrix"] for r in per_seed], axis=0).tolist(),
        "per_class_recall": {c: mean_ci([r["per_class_recall"][c] for r in per_seed], bounds=(0.0, 1.0)) for c in classes},
        "gap": {"at_best_epoch": mean_ci([r["gap_at_best"] for r in per_seed], bounds=(-1.0, 1.0)),
                "at_last_epoch": mean_ci([r["gap_last"] for r in per_seed], bounds=(-1.0, 1.0))},
    }
    return out, probabilities


def _replicates(metric: str, probabilities: dict[int, list[np.ndarray]], splits: list[Split], labels: np.ndarray,
                rng: np.random.Generator, mask_of=None) -> ArmReplicates:
    """One arm's metric over all splits: the mean of the splits' points, their replicates side by side."""
    parts = []
    for split in splits:
        mask = mask_of(split) if mask_of else None
        parts.append(arm_replicates(METRICS[metric], labels[split.rows["test"]], probabilities[split.seed],
                                    split.weights, rng, mask))
    return ArmReplicates(nanmean([p.point for p in parts]), np.concatenate([p.replicates for p in parts]))


def add_uncertainty(results: list[dict[str, Any]], probabilities: dict[str, dict[int, list[np.ndarray]]],
                    splits: list[Split], labels: np.ndarray, sites: np.ndarray, shortcut_mask: Optional[np.ndarray],
                    seed: int) -> list[dict[str, Any]]:
    """Bootstrap intervals for every arm (pooled, per site, shortcut subsets) and the paired differences."""
    replicates: dict[str, dict[str, ArmReplicates]] = {}
    for number, arm in enumerate(results):
        key = arm["key"]
        rng = np.random.default_rng([seed, number])
        replicates[key] = {m: _replicates(m, probabilities[key], splits, labels, rng) for m in SUMMARY_METRICS}
        arm["summary"] = {m: interval(r.point, r.replicates) for m, r in replicates[key].items()}
        test_sites = {s.seed: sites[s.rows["test"]] for s in splits}
        arm["per_site"] = {}
        for site in sorted(set(sites[splits[0].rows["test"]])):
            site_rows = {m: _replicates(m, probabilities[key], splits, labels, rng,
                                        lambda split, site=site: test_sites[split.seed] == site) for m in SUMMARY_METRICS}
            present = sorted({c for r in arm["seeds"] for c in r["per_site"].get(site, {}).get("classes_present", [])})
            arm["per_site"][site] = {**{m: interval(r.point, r.replicates) for m, r in site_rows.items()},
                                     "classes_present": present}
        if shortcut_mask is not None:
            matches = {s.seed: shortcut_mask[s.rows["test"]] for s in splits}
            arm["shortcut"] = {}
            for name, agree in (("artefact_matches_class", True), ("artefact_mismatches_class", False)):
                subset = _replicates("accuracy", probabilities[key], splits, labels, rng,
                                     lambda split, agree=agree: matches[split.seed] == agree)
                arm["shortcut"][name] = interval(subset.point, subset.replicates)
    reference = REFERENCE_ARM if REFERENCE_ARM in replicates else results[0]["key"]
    comparisons = []
    for arm in results:
        if arm["key"] == reference:
            continue
        for metric in COMPARED_METRICS:
            diff = difference(replicates[reference][metric], replicates[arm["key"]][metric])
            comparisons.append({"a": reference, "b": arm["key"], "metric": metric, **diff,
                                "words": _words(results, reference, arm["key"], metric, diff)})
    return comparisons


def _words(results: list[dict[str, Any]], a: str, b: str, metric: str, diff: dict[str, Any]) -> str:
    labels = {r["key"]: r["label"] for r in results}
    name = metric.replace("_", " ").replace("macro auroc", "macro AUROC")
    if diff["mean"] is None:
        return f"{name}: undefined on these test images"
    span = f"{diff['mean']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]"
    if not diff["excludes_zero"]:
        verdict = "no difference shown: the 95% interval includes 0"
    elif diff["mean"] > 0:
        verdict = f"{labels[a]} is better (the 95% interval excludes 0)"
    else:
        verdict = f"{labels[a]} is worse (the 95% interval excludes 0)"
    return f"{labels[a]} minus {labels[b]}, {name}: {span}; {verdict}"


def run_evaluation(config: DermFedConfig, checkpoint: Path, out: Path, imagenet_weights: Optional[str] = None,
                   pooled: Optional[str] = None, local: Optional[str] = None) -> dict[str, Any]:
    """Evaluate every available arm on the labelled data of `config`; write metrics.json, predictions.npz, config.yaml."""
    checkpoint = Path(checkpoint)
    pretraining = load_checkpoint(checkpoint)
    size = config.evaluation.image_size or checkpoint_config(pretraining).data.image_size
    config = config.model_copy(update={"data": config.data.model_copy(update={"image_size": size})})
    out.mkdir(parents=True, exist_ok=True)
    write_config(config, out)
    prepared = prepare_data(config)
    if not prepared.catalog.labelled:
        raise DataError(f"evaluation needs labels; data.format={config.data.format} has none")
    splits = make_splits(config, prepared, np.random.default_rng([config.seed, 7]))
    labels = prepared.catalog.label_indices().to_numpy()
    sites = prepared.catalog.frame["site"].to_numpy()
    shortcut_mask = None
    if "shortcut_artifact" in prepared.catalog.frame.columns and config.synth.shortcut:
        shortcut_mask = shortcut_matches_class(prepared.catalog.frame, config.synth.shortcut_class).to_numpy()
    skipped: dict[str, str] = {}
    results, probabilities = [], {}
    for arm in _arms(config, checkpoint, pretraining["encoder_name"], imagenet_weights, pooled, local, skipped):
        print(f"evaluating {arm.label} ({arm.source})", flush=True)
        result, probabilities[arm.key] = evaluate_arm(arm, config, prepared, splits, labels, sites, shortcut_mask)
        results.append(result)
    if not results:
        raise DataError(f"no arm could run: {skipped}")
    comparisons = add_uncertainty(results, probabilities, splits, labels, sites, shortcut_mask, config.seed)
    for result in results:
        summary = result["summary"]
        print(f"  {result['label']}: " + ", ".join(f"{k} {_fmt(summary[k])}" for k in SUMMARY_METRICS), flush=True)
    for comparison in comparisons:
        print(f"  {comparison['words']}", flush=True)
    _save_predictions(out, probabilities, splits, labels, prepared.catalog)
    metrics = {
        "checkpoint": str(checkpoint.resolve()),
        "pretraining": {"position": pretraining["position"], "encoder": pretraining["encoder_name"],
                        "history": pretraining["history"], "arm": pretraining.get("extra", {}).get("arm"),
                        "dp": checkpoint_config(pretraining).dp.enabled},
        "data": {"format": config.data.format, "root": config.data.root, "image_size": size,
                 "classes": prepared.catalog.classes, "sites": prepared.catalog.sites,
                 "split_seeds": [s.seed for s in splits],
                 "split_sizes": {k: int(len(v)) for k, v in splits[0].rows.items()},
                 "test_groups": int(len(np.unique(splits[0].catalog.frame["group"].to_numpy()[splits[0].rows["test"]]))),
                 "max_images_per_lesion": int(prepared.catalog.frame.groupby("group").size().max()),
                 "shortcut": ({"artifact": config.synth.shortcut_artifact, "class": config.synth.shortcut_class}
                              if shortcut_mask is not None else None)},
        "head": config.evaluation.model_dump(mode="json"),
        "comparisons": comparisons,
        "arms": results,
        "skipped_arms": skipped,
    }
    metrics = _finite_or_none(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
    return metrics


def _fmt(ci: dict[str, Any]) -> str:
    return "n/a" if ci["mean"] is None else f"{ci['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def _save_predictions(out: Path, probabilities: dict[str, dict[int, list[np.ndarray]]], splits: list[Split],
                      labels: np.ndarray, catalog: Catalog) -> None:
    """Every arm's test probabilities, so that any number of the report can be recomputed."""
    arrays: dict[str, np.ndarray] = {}
    for split in splits:
        rows = split.rows["test"]
        arrays[f"split{split.seed}_image_id"] = catalog.frame["image_id"].to_numpy()[rows].astype(str)
        arrays[f"split{split.seed}_label"] = labels[rows]
        for key, per_split in probabilities.items():
            arrays[f"split{split.seed}_{key}"] = np.stack(per_split[split.seed])  # seeds x images x classes
    np.savez_compressed(out / PREDICTIONS_NAME, **arrays)


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
    if isinstance(value, np.bool_):
        return bool(value)
    return value
