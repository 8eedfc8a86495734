"""`dermfed evaluate`: every available arm, identical heads, several seeds, paired uncertainty, one metrics.json.

For each arm: no image it pretrained on (nor another image of its lesion) may be in the
validation or test split or in an external test set (`leakage.py`); features of every image are
computed once (or every epoch for the training images when `evaluation.augment`); for each split
seed and head seed a head is trained on the source's training split, its best epoch chosen on the
source's validation split, and it is scored on every test set: the source's test split (pooled,
per site and, synthetic data with the shortcut switch, where the artefact no longer matches the
class) and each external set (`external.py`), all of whose images are test data. Then, per test
set, the paired bootstrap over that set's lesions (`uncertainty.py`) gives every arm's interval
and, the study's answer, each difference between arm A and the others on the same test images.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from common.augment import build_augmentation
from common.checkpoint import checkpoint_config, load_checkpoint
from common.config import ConfigError, DermFedConfig, write_config
from common.data.catalog import Catalog, DataError
from common.data.identity import with_content
from common.data.pipeline import PreparedData, ensure_data, prepare_data
from common.data.splits import assign_lesion_splits, assign_splits, split_indices
from common.data.synthetic import shortcut_matches_class
from common.objectives import get_objective
from common.run_folder import METRICS_NAME
from server.evaluation.arms import Arm, ArmContext, build_arms, check_arm_names, is_study_key, study_arm
from server.evaluation.external import ExternalSet, load_external
from server.evaluation.features import FeatureExtractor
from server.evaluation.heads import SELECTION_METRIC, train_head
from server.evaluation.leakage import external_overlap, overlap, refuse_external_leaks, refuse_leaks
from server.evaluation.metrics import METRICS_FORMAT, classification_metrics, seed_spread
from server.evaluation.uncertainty import (
    CONFIDENCE,
    COVERS_BOOTSTRAP,
    METRICS,
    ArmReplicates,
    Metric,
    arm_replicates,
    class_recall,
    cluster_weights,
    difference,
    holm,
    interval,
    nanmean,
)

log = logging.getLogger("dermfed.evaluate")

SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_auroc")
COMPARED_METRICS = ("balanced_accuracy", "macro_auroc")
GAP_METRICS = ("accuracy", "balanced_accuracy", "loss")
PREDICTIONS_NAME = "predictions.npz"
SOURCE = ":source"  # the source's test split among the test sets; no external set's name can start with ':'


@dataclass
class Split:
    """One train/val/test split of the evaluation's catalog, and its bootstrap weights over test lesions."""

    seed: int
    catalog: Catalog
    rows: dict[str, np.ndarray]
    weights: np.ndarray  # replicates x test images


def make_splits(config: DermFedConfig, prepared: PreparedData, rng: np.random.Generator) -> list[Split]:
    """The split of `seed`, plus one per `evaluation.split_seeds`; each with its bootstrap weights."""
    seeds = list(dict.fromkeys([config.seed, *config.evaluation.split_seeds])) if config.evaluation.split_seeds \
        else [config.seed]
    if len(seeds) > 1 and prepared.catalog.predefined_splits:
        raise ConfigError(f"evaluation.split_seeds={config.evaluation.split_seeds}: data.format={config.data.format} "
                          "defines its own split, which cannot be redrawn; leave evaluation.split_seeds empty")
    splits = []
    for seed in seeds:
        redraw = assign_lesion_splits if config.dp.enabled else assign_splits  # the rule pretraining used
        catalog = prepared.catalog if seed == config.seed else redraw(
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


@dataclass
class TestSet:
    """Images the heads are scored on: the source's test split (other rows for each split seed) or an external
    set (all of its images, the same for every split seed), with its bootstrap weights over its lesions."""

    name: str  # SOURCE, or the external set's name (which cannot be SOURCE)
    labels: np.ndarray  # class index per row of its catalog
    sites: np.ndarray
    rows: dict[int, np.ndarray]  # per split seed: the scored rows
    weights: dict[int, np.ndarray]  # per split seed: replicates x scored rows
    groups: np.ndarray  # lesion (or patient) per row of its catalog; an image without either is its own
    shortcut: Optional[np.ndarray] = None  # per row: the artefact agrees with the class (synthetic data, shortcut on)

    def lesions(self) -> int:
        """The fewest distinct test lesions (or patients) of any split seed: what the bootstrap resamples."""
        return min(int(len(np.unique(self.groups[rows]))) for rows in self.rows.values())

    def truth(self, split_seed: int) -> np.ndarray:
        return self.labels[self.rows[split_seed]]


def source_test_set(prepared: PreparedData, splits: list[Split], labels: np.ndarray,
                    shortcut_mask: Optional[np.ndarray]) -> TestSet:
    return TestSet(SOURCE, labels, prepared.catalog.frame["site"].to_numpy(), {s.seed: s.rows["test"] for s in splits},
                   {s.seed: s.weights for s in splits}, prepared.catalog.frame["group"].astype(str).to_numpy(),
                   shortcut_mask)


def external_test_set(external: ExternalSet, splits: list[Split], replicates: int, rng: np.random.Generator) -> TestSet:
    rows = np.arange(len(external.catalog))
    groups = external.catalog.frame["group"].to_numpy()
    return TestSet(external.name, external.labels, external.catalog.frame["site"].to_numpy(),
                   {s.seed: rows for s in splits}, {s.seed: cluster_weights(groups, replicates, rng) for s in splits},
                   groups.astype(str))


def evaluate_arm(arm: Arm, config: DermFedConfig, prepared: PreparedData, splits: list[Split], labels: np.ndarray,
                 externals: list[ExternalSet]) -> tuple[dict[str, Any], dict[str, dict[int, list[np.ndarray]]]]:
    """Heads for every split and seed, trained and selected on the source only; returns the arm's training results
    and its probabilities on every test set (`source` and each external set's name) per split seed."""
    cfg = config.evaluation
    leaks = {split.seed: overlap(arm.pretraining, split.catalog) for split in splits}
    for counts in leaks.values():
        refuse_leaks(arm.key, arm.label, counts)
    external_leaks = {ext.name: external_overlap(arm.pretraining, ext.catalog.frame) for ext in externals}
    for name, counts in external_leaks.items():
        refuse_external_leaks(arm.key, arm.label, name, counts)
    extract = FeatureExtractor(arm.encoder, prepared.store, cfg.feature_batch_size)
    started = time.perf_counter()
    features = _finite(arm, extract(np.arange(len(prepared.catalog)), desc=f"{arm.key} features"), "the source")
    external_features = {ext.name: _finite(arm, FeatureExtractor(arm.encoder, ext.store, cfg.feature_batch_size)(
        np.arange(len(ext.catalog)), desc=f"{arm.key} features of {ext.name}"), f"external set {ext.name!r}")
        for ext in externals}
    feature_seconds = time.perf_counter() - started
    augment = build_augmentation(config.train.augment) if cfg.augment else None
    selected = SELECTION_METRIC[cfg.select_on]
    per_seed, histories = [], []
    probabilities: dict[str, dict[int, list[np.ndarray]]] = {SOURCE: {}, **{ext.name: {} for ext in externals}}
    for split in splits:
        rows = split.rows

        def train_features(epoch: int, rows: dict[str, np.ndarray] = rows) -> np.ndarray:
            if augment is None:
                return features[rows["train"]]
            return extract(rows["train"], transform=augment, desc=f"{arm.key} augmented features")

        for name in probabilities:
            probabilities[name][split.seed] = []
        for seed in cfg.seeds:
            run = train_head(cfg, train_features, labels[rows["train"]], features[rows["val"]], labels[rows["val"]],
                             len(prepared.catalog.classes), seed)
            histories.append(run.history)
            probabilities[SOURCE][split.seed].append(run.predict_proba(features[rows["test"]]))
            for name, values in external_features.items():
                probabilities[name][split.seed].append(run.predict_proba(values))
            chosen, last = run.history[run.best_epoch - 1], run.history[-1]
            per_seed.append({"split_seed": split.seed, "seed": seed, "best_epoch": run.best_epoch,
                             "gap_at_chosen": {m: chosen[f"gap_{m}"] for m in GAP_METRICS},
                             "gap_last": {m: last[f"gap_{m}"] for m in GAP_METRICS}})
    out: dict[str, Any] = {
        "key": arm.key, "label": arm.label, "source": arm.source, "provenance": arm.provenance,
        "feature_dim": int(features.shape[1]), "feature_seconds": feature_seconds, "curves": _curves(histories),
        "seeds": per_seed,
        "pretraining_overlap": leaks[splits[0].seed] if len(splits) == 1 else {str(k): v for k, v in leaks.items()},
        "external_overlap": external_leaks,
        "gap": {"metric": selected,
                "at_chosen_epoch": seed_spread([r["gap_at_chosen"][selected] for r in per_seed]),
                "at_last_epoch": seed_spread([r["gap_last"][selected] for r in per_seed])},
    }
    return out, probabilities


def _finite(arm: Arm, features: np.ndarray, where: str) -> np.ndarray:
    """Features a head can be trained on: an encoder whose weights hold NaN or overflow gives NaN or inf features,
    which no head can learn from; refused in one line naming the arm rather than failing inside the head."""
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise DataError(f"arm {arm.key} ({arm.label}): its encoder gives NaN or infinite features for {int(bad.sum())} of "
                        f"{len(features)} images of {where} ({arm.source}); its weights are broken (a diverged or damaged "
                        "checkpoint). Evaluate a checkpoint from before it diverged, or pretrain again")
    return features


def _replicates(metric: Metric, test: TestSet, probabilities: dict[int, list[np.ndarray]], rng: np.random.Generator,
                mask_of: Optional[Callable[[int], np.ndarray]] = None) -> ArmReplicates:
    """One arm's metric over all split seeds: the mean of the splits' points, their replicates side by side."""
    parts = []
    for split_seed, probas in probabilities.items():
        mask = mask_of(split_seed) if mask_of else None
        parts.append(arm_replicates(metric, test.truth(split_seed), probas, test.weights[split_seed], rng, mask))
    return ArmReplicates(nanmean([p.point for p in parts]), np.concatenate([p.replicates for p in parts]))


def _per_seed_metrics(test: TestSet, probabilities: dict[int, list[np.ndarray]], classes: list[str]) -> list[dict[str, Any]]:
    """The ISIC scorer's metrics of every (split seed, head seed), pooled and per site, in the order heads were trained."""
    results = []
    for split_seed, probas in probabilities.items():
        truth, sites = test.truth(split_seed), test.sites[test.rows[split_seed]]
        for proba in probas:
            result = classification_metrics(truth, proba, classes)
            result["per_site"] = {site: classification_metrics(truth[sites == site], proba[sites == site], classes)
                                  for site in sorted(set(sites))}
            results.append(result)
    return results


def _class_recall(test: TestSet, probabilities: dict[int, list[np.ndarray]], classes: list[str],
                  rng: np.random.Generator) -> dict[str, dict[str, Any]]:
    """Per-class recall, averaged over head seeds, with the bootstrap interval over test lesions (the same clustered
    resampling as every other metric: two images of one lesion are not two independent trials), its number of test
    images and lesions of the class."""
    recall = {}
    first = next(iter(test.rows))
    for index, name in enumerate(classes):
        members = test.truth(first) == index
        replicated = _replicates(class_recall(index), test, probabilities, rng)
        recall[name] = {**interval(replicated.point, replicated.replicates), "images": int(members.sum()),
                        "lesions": int(len(np.unique(test.groups[test.rows[first]][members])))}
    return recall


def score(test: TestSet, arms: list[dict[str, Any]], probabilities: dict[str, dict[int, list[np.ndarray]]],
          classes: list[str], seed: int, stream: int = 0,
          min_groups: int = 0) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Every arm's metrics on one test set, with bootstrap intervals over its lesions and head seeds (pooled, per site,
    per class, shortcut subsets), and the paired differences: each encoder under study (A, and A2, ... of a repeated
    `--checkpoint`) minus each other arm, on the same images (`compared_pairs`). With fewer than `min_groups` test lesions
    the differences keep their intervals but carry no verdict."""
    scored: dict[str, dict[str, Any]] = {}
    replicates: dict[str, dict[str, ArmReplicates]] = {}
    first = next(iter(test.rows))
    for number, arm in enumerate(arms):
        key = arm["key"]
        probas = probabilities[key]
        rng = np.random.default_rng([seed, number, stream])
        per_seed = _per_seed_metrics(test, probas, classes)
        replicates[key] = {m: _replicates(METRICS[m], test, probas, rng) for m in SUMMARY_METRICS}
        result: dict[str, Any] = {
            "seeds": per_seed,
            "summary": {m: interval(r.point, r.replicates) for m, r in replicates[key].items()},
            "confusion_matrix": np.sum([r["confusion_matrix"] for r in per_seed], axis=0).tolist(),
            "per_class_recall": _class_recall(test, probas, classes, rng),
            "undecided": int(sum(r["undecided"] for r in per_seed)),
            "per_site": {},
        }
        for site in sorted(set(test.sites[test.rows[first]])):
            site_rows = {m: _replicates(METRICS[m], test, probas, rng,
                                        lambda s, site=site: test.sites[test.rows[s]] == site) for m in SUMMARY_METRICS}
            present = sorted({c for r in per_seed for c in r["per_site"].get(site, {}).get("classes_present", [])},
                             key=classes.index)
            result["per_site"][site] = {**{m: interval(r.point, r.replicates) for m, r in site_rows.items()},
                                        "classes_present": present,
                                        "n": int(np.sum(test.sites[test.rows[first]] == site))}
        if test.shortcut is not None:
            result["shortcut"] = {}
            for name, agree in (("artefact_matches_class", True), ("artefact_mismatches_class", False)):
                subset = _replicates(METRICS["accuracy"], test, probas, rng,
                                     lambda s, agree=agree: test.shortcut[test.rows[s]] == agree)
                result["shortcut"][name] = interval(subset.point, subset.replicates)
        scored[key] = result
    comparisons = []
    lesions = test.lesions()
    too_few = (f"too few test lesions to decide: {lesions} (or patients) here, evaluation.min_test_groups={min_groups}"
               if lesions < min_groups else None)
    for reference, arm in compared_pairs([arm["key"] for arm in arms]):
        for metric in COMPARED_METRICS:
            diff = difference(replicates[reference][metric], replicates[arm][metric])
            withheld = too_few or diff["degenerate"]
            if withheld:
                diff["excludes_zero"] = None  # no verdict either way
            caveats = [c for c in (_unknown_overlap(a, test.name) for a in arms if a["key"] in (reference, arm)) if c]
            comparisons.append({"a": reference, "b": arm, "metric": metric, **diff, "covers": COVERS_BOOTSTRAP,
                                "test_groups": lesions, "withheld": withheld, "caveats": caveats})
    correct_for_multiplicity(comparisons)
    for c in comparisons:
        c["words"] = _words(arms, c["a"], c["b"], c["metric"], c, c["caveats"], c["withheld"])
    return scored, comparisons


def correct_for_multiplicity(comparisons: list[dict[str, Any]]) -> None:
    """Holm's correction over the comparisons of one test set that can have a verdict: `p_holm`, and
    `holds_after_correction` (the interval excludes 0 and the adjusted p is below 1 - confidence). With 6 comparisons
    of arms that do not differ, about one in four reports would otherwise show a 'better' somewhere by chance."""
    decided = [c for c in comparisons if c["excludes_zero"] is not None and c.get("p") is not None]
    for c, adjusted in zip(decided, holm([c["p"] for c in decided])):
        c["p_holm"] = adjusted
        c["holds_after_correction"] = bool(c["excludes_zero"] and adjusted < 1 - CONFIDENCE)
    for c in comparisons:
        c.setdefault("p_holm", None)
        c.setdefault("holds_after_correction", None)
        c["family"] = len(decided)


def compared_pairs(keys: list[str]) -> list[tuple[str, str]]:
    """(reference, other) key pairs, each pair once: every encoder under study (arm A, and A2, A3, ... of a repeated
    `--checkpoint`) minus every other arm. Without arm A, the first arm is the reference."""
    references = [key for key in keys if is_study_key(key)] or keys[:1]
    return [(reference, other) for number, reference in enumerate(references) for other in keys
            if other != reference and other not in references[:number]]


def _unknown_overlap(arm: dict[str, Any], test_name: str) -> Optional[str]:
    """Why a verdict about this arm must be qualified on this test set: its pretraining images (or lesions) are unknown."""
    counts = arm["external_overlap"][test_name] if test_name != SOURCE else arm["pretraining_overlap"]
    counts = counts if "source" in counts else next(iter(counts.values()))  # several split seeds: one entry each
    where = "the source's test images" if test_name == SOURCE else f"external set {test_name!r}"
    if counts.get("pretraining_images") is None:
        return (f"{arm['label']}'s pretraining images are not known ({counts['source']}), so they could not be checked "
                f"against {where}: had it pretrained on any, its scores there would be optimistic")
    if counts.get("pretraining_groups") is None and counts.get("source", "").startswith("recorded"):
        return (f"{arm['label']}'s checkpoint records its pretraining images but not their lesions, so other images of "
                f"those lesions in {where} could not be found")
    return None


def _words(arms: list[dict[str, Any]], a: str, b: str, metric: str, diff: dict[str, Any], caveats: list[str],
           withheld: Optional[str] = None) -> str:
    labels = {r["key"]: r["label"] for r in arms}
    name = metric.replace("_", " ").replace("macro auroc", "macro AUROC")
    if diff["mean"] is None:
        return f"{labels[a]} minus {labels[b]}, {name}: undefined on these test images"
    span = f"{diff['mean']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]"
    undefined = (f" ({diff['undefined']} of {diff['replicates']} bootstrap replicates undefined, left out)"
                 if diff.get("undefined") else "")
    family = diff.get("family", 1)
    if withheld:
        verdict = f"no verdict: {withheld}"
    elif not diff["excludes_zero"]:
        verdict = "no difference shown: the 95% interval includes 0"
    elif family > 1 and not diff.get("holds_after_correction"):
        verdict = (f"no difference shown after correction: the 95% interval excludes 0, but not with Holm's correction "
                   f"for the {family} comparisons on these test images (adjusted p {diff['p_holm']:.3f})")
    else:
        side = "better" if diff["mean"] > 0 else "worse"
        held = f", and so it does with Holm's correction for the {family} comparisons" if family > 1 else ""
        verdict = f"{labels[a]} is {side} (the 95% interval excludes 0{held})"
    qualified = f". Qualified: {'; '.join(caveats)}" if caveats else ""
    return f"{labels[a]} minus {labels[b]}, {name}: {span}{undefined}; {verdict}{qualified}"


def run_evaluation(config: DermFedConfig, checkpoint: Path, out: Path,
                   inputs: Optional[Mapping[str, Optional[str]]] = None) -> dict[str, Any]:
    """Evaluate every available arm of `evaluation.arms`: heads trained and selected on the source (`data.*`), scored
    on its test split and on every external set (`evaluation.external`); write metrics.json, predictions.npz,
    config.yaml. `inputs`: what each arm's option supplied, by arm name (`arms.arm_inputs`); the study arm reads
    `checkpoint` unless given otherwise."""
    check_arm_names(config.evaluation.arms)  # before anything is written
    checkpoint = Path(checkpoint)
    inputs = {study_arm(): str(checkpoint), **(inputs or {})}
    pretraining = load_checkpoint(checkpoint)
    size = config.evaluation.image_size or checkpoint_config(pretraining).data.image_size
    config = config.model_copy(update={"data": config.data.model_copy(update={"image_size": size})})
    out.mkdir(parents=True, exist_ok=True)
    write_config(config, out)
    ensure_data(config)  # the synthetic data if absent, the cache: written here, explicitly, never by reading
    prepared = prepare_data(config)
    if not prepared.catalog.labelled:
        raise DataError(f"evaluation needs labels; data.format={config.data.format} has none")
    prepared.catalog.frame = with_content(prepared.catalog.frame, config.data.cache_dir)  # for the leak guard
    externals = [load_external(entry, config.data, prepared.catalog) for entry in config.evaluation.external]
    splits = make_splits(config, prepared, np.random.default_rng([config.seed, 7]))
    labels = prepared.catalog.label_indices().to_numpy()
    shortcut_mask = None
    if "shortcut_artifact" in prepared.catalog.frame.columns and config.synth.shortcut:
        shortcut_mask = shortcut_matches_class(prepared.catalog.frame, config.synth.shortcut_class).to_numpy()
    skipped: dict[str, str] = {}
    results: list[dict[str, Any]] = []
    probabilities: dict[str, dict[str, dict[int, list[np.ndarray]]]] = {}  # test set -> arm -> split seed -> seeds
    for arm in build_arms(ArmContext(config, pretraining["encoder_name"]), inputs, skipped):
        print(f"evaluating {arm.label} ({arm.source})", flush=True)
        result, arm_probabilities = evaluate_arm(arm, config, prepared, splits, labels, externals)
        results.append(result)
        for name, values in arm_probabilities.items():
            probabilities.setdefault(name, {})[arm.key] = values
    if not results:
        raise DataError(f"no arm could run: {skipped}")
    classes = prepared.catalog.classes
    source = source_test_set(prepared, splits, labels, shortcut_mask)
    min_groups = config.evaluation.min_test_groups
    scored, comparisons = score(source, results, probabilities[SOURCE], classes, config.seed, min_groups=min_groups)
    for result in results:  # the source's results keep their place in each arm's entry
        for training, metrics_of_seed in zip(result["seeds"], scored[result["key"]].pop("seeds")):
            training.update(metrics_of_seed)
        result.update(scored[result["key"]])
    _print_results("source test split", results, comparisons)
    external: dict[str, Any] = {}
    rng = np.random.default_rng([config.seed, 8])
    for number, ext in enumerate(externals, start=1):
        test = external_test_set(ext, splits, config.evaluation.bootstrap_replicates, rng)
        ext_scored, ext_comparisons = score(test, results, probabilities[ext.name], classes, config.seed, stream=number,
                                            min_groups=min_groups)
        ext_arms = [{"key": r["key"], "label": r["label"], **ext_scored[r["key"]],
                     "pretraining_overlap": r["external_overlap"][ext.name]} for r in results]
        external[ext.name] = {**ext.describe(), "arms": ext_arms, "comparisons": ext_comparisons}
        _print_results(f"external test set {ext.name}", ext_arms, ext_comparisons)
    for result in results:
        result.pop("external_overlap")  # kept once, in each external set's entry
    _save_predictions(out, probabilities, splits, labels, prepared.catalog, externals)
    metrics = {
        "format": METRICS_FORMAT,
        "checkpoint": str(checkpoint.resolve()),
        "pretraining": {"evaluated": any(r["key"] == study_arm() for r in results),
                        "position": pretraining["position"], "encoder": pretraining["encoder_name"],
                        "history": pretraining["history"], "arm": pretraining.get("extra", {}).get("arm"),
                        "dp": checkpoint_config(pretraining).dp.enabled,
                        "loss": get_objective(checkpoint_config(pretraining).model.objective).terms[0]},
        "data": {"format": config.data.format, "root": config.data.root, "image_size": size,
                 "classes": classes, "sites": prepared.catalog.sites,
                 "split_seeds": [s.seed for s in splits],
                 "split_sizes": {k: int(len(v)) for k, v in splits[0].rows.items()},
                 "test_groups": int(len(np.unique(splits[0].catalog.frame["group"].to_numpy()[splits[0].rows["test"]]))),
                 "max_images_per_lesion": int(prepared.catalog.frame.groupby("group").size().max()),
                 "shortcut": ({"artifact": config.synth.shortcut_artifact, "class": config.synth.shortcut_class}
                              if shortcut_mask is not None else None)},
        "head": config.evaluation.model_dump(mode="json"),
        "comparisons": comparisons,
        "arms": results,
        "external": external,
        "skipped_arms": skipped,
    }
    metrics = _finite_or_none(metrics)
    (out / METRICS_NAME).write_text(json.dumps(metrics, indent=1, allow_nan=False))
    return metrics


def _print_results(title: str, arms: list[dict[str, Any]], comparisons: list[dict[str, Any]]) -> None:
    print(f"{title}:", flush=True)
    for arm in arms:
        summary = arm["summary"]
        print(f"  {arm['label']}: " + ", ".join(f"{k} {_fmt(summary[k])}" for k in SUMMARY_METRICS), flush=True)
    for comparison in comparisons:
        print(f"  {comparison['words']}", flush=True)


def _fmt(ci: dict[str, Any]) -> str:
    return "n/a" if ci["mean"] is None else f"{ci['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def _save_predictions(out: Path, probabilities: dict[str, dict[str, dict[int, list[np.ndarray]]]], splits: list[Split],
                      labels: np.ndarray, catalog: Catalog, externals: list[ExternalSet]) -> None:
    """Every arm's test probabilities (source and external sets), so that any number of the report can be recomputed."""
    arrays: dict[str, np.ndarray] = {}
    for split in splits:
        rows = split.rows["test"]
        arrays[f"split{split.seed}_image_id"] = catalog.frame["image_id"].to_numpy()[rows].astype(str)
        arrays[f"split{split.seed}_label"] = labels[rows]
        arrays[f"split{split.seed}_site"] = catalog.frame["site"].to_numpy()[rows].astype(str)
        arrays[f"split{split.seed}_group"] = catalog.frame["group"].to_numpy()[rows].astype(str)
        for key, per_split in probabilities[SOURCE].items():
            arrays[f"split{split.seed}_{key}"] = np.stack(per_split[split.seed])  # seeds x images x classes
    for ext in externals:
        arrays[f"external_{ext.name}_image_id"] = ext.catalog.frame["image_id"].to_numpy().astype(str)
        arrays[f"external_{ext.name}_label"] = ext.labels
        arrays[f"external_{ext.name}_site"] = ext.catalog.frame["site"].to_numpy().astype(str)
        arrays[f"external_{ext.name}_group"] = ext.catalog.frame["group"].to_numpy().astype(str)
        for key, per_split in probabilities[ext.name].items():
            for split_seed, probas in per_split.items():
                arrays[f"external_{ext.name}_split{split_seed}_{key}"] = np.stack(probas)  # seeds x images x classes
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
