"""Uncertainty that answers the study's question: is arm A better than arm C on new patients?

A paired, clustered bootstrap. Each replicate redraws the test set by lesion (or patient:
the catalog's `group`) with replacement, as a weight per test image, and, independently per arm,
redraws the head seeds; the *same* image weights serve every arm, so a difference between two
arms is measured on the same images. The interval of a difference is the 2.5th-97.5th
percentile of the replicate differences; it excludes zero when both ends have the same sign.

The weighted metrics below equal scikit-learn's (`balanced_accuracy_score`, `roc_auc_score`
with `sample_weight`), computed for all replicates at once; tests check them against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from server.evaluation.metrics import predicted_labels

CONFIDENCE = 0.95
COVERS_BOOTSTRAP = ("bootstrap: test lesions (or patients; an image without either counts alone) resampled with "
                    "replacement, and head seeds")
MAX_UNDEFINED_FRACTION = 0.05  # a verdict needs the metric defined in at least 95% of the replicates

Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def weighted_accuracy(y: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Accuracy per row of `weights` (replicates x images); a tied row is undecided, never right (ISIC scorer)."""
    correct = (predicted_labels(proba) == y).astype(float)
    total = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (weights @ correct) / total, np.nan)


def weighted_balanced_accuracy(y: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean recall over the classes present (weight > 0) in each replicate."""
    return _nanmean_rows(_weighted_recalls(y, proba, weights))


def _weighted_recalls(y: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Replicates x classes: each class's recall in each replicate; NaN where the replicate holds none of it."""
    correct = (predicted_labels(proba) == y).astype(float)
    recalls = []
    for c in range(proba.shape[1]):
        members = (y == c).astype(float)
        total = weights @ members
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(total > 0, (weights @ (members * correct)) / total, np.nan))
    return np.stack(recalls, axis=1)


def class_recall(c: int) -> "Metric":
    """The recall of class `c` per replicate, as a metric of its own (per-class recall's bootstrap interval)."""

    def recall(y: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return _weighted_recalls(y, proba, weights)[:, c]

    return recall


def weighted_macro_auroc(y: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean over classes of one-vs-rest AUROC on the raw probability column, per replicate.

    AUROC with weights is the Mann-Whitney statistic: the weighted share of (positive, negative)
    pairs ordered correctly, ties counting one half, which is the area under the trapezoidal ROC.
    Scores are sorted once per class; each replicate only re-weights them.
    """
    aurocs = []
    for c in range(proba.shape[1]):
        scores = proba[:, c]
        order = np.argsort(scores, kind="stable")
        sorted_scores = scores[order]
        starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # tie groups
        positive = (y[order] == c).astype(float)
        w = weights[:, order]
        pos = np.add.reduceat(w * positive, starts, axis=1)
        neg = np.add.reduceat(w * (1.0 - positive), starts, axis=1)
        neg_below = np.cumsum(neg, axis=1) - neg
        total_pos, total_neg = pos.sum(axis=1), neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = (pos * (neg_below + 0.5 * neg)).sum(axis=1) / (total_pos * total_neg)
        aurocs.append(np.where((total_pos > 0) & (total_neg > 0), auc, np.nan))
    return _nanmean_rows(np.stack(aurocs, axis=1))


def nanmean(values) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    defined = np.isfinite(values)
    counts = defined.sum(axis=1)
    sums = np.where(defined, values, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


METRICS: dict[str, Metric] = {
    "accuracy": weighted_accuracy,
    "balanced_accuracy": weighted_balanced_accuracy,
    "macro_auroc": weighted_macro_auroc,
}


def cluster_weights(groups: np.ndarray, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """Replicates x images: how often each image's lesion group was drawn (groups resampled with replacement)."""
    _, inverse = np.unique(groups, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    draws = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=replicates)
    return draws[:, inverse].astype(float)


@dataclass
class ArmReplicates:
    """One arm's metric on the full test set (mean over seeds) and in every bootstrap replicate."""

    point: float
    replicates: np.ndarray


def arm_replicates(metric: Metric, y: np.ndarray, probas: list[np.ndarray], weights: np.ndarray,
                   rng: np.random.Generator, mask: np.ndarray | None = None) -> ArmReplicates:
    """`probas`: one (images x classes) array per head seed. `mask` restricts to some images (a site)."""
    keep = np.ones(len(y), dtype=bool) if mask is None else mask
    ones = np.ones((1, int(keep.sum())))
    per_seed = np.stack([metric(y[keep], p[keep], weights[:, keep]) for p in probas])  # seeds x replicates
    point = nanmean([metric(y[keep], p[keep], ones)[0] for p in probas])
    seeds = rng.integers(0, len(probas), size=(weights.shape[0], len(probas)))  # seeds redrawn per replicate
    replicates = np.take_along_axis(per_seed.T, seeds, axis=1)
    return ArmReplicates(point, _nanmean_rows(replicates))


def interval(point: float, replicates: np.ndarray, confidence: float = CONFIDENCE) -> dict:
    """Percentile interval over the replicates where the metric is defined; `n` counts those, `undefined` the others
    (e.g. AUROC of a replicate that drew one class only); `degenerate` says why the interval cannot support a verdict
    (every replicate equal, or more than MAX_UNDEFINED_FRACTION of them undefined), else None."""
    total = int(len(replicates))
    finite = replicates[np.isfinite(replicates)]
    undefined = total - int(len(finite))
    if not np.isfinite(point) or len(finite) == 0:
        return {"mean": None, "low": None, "high": None, "n": 0, "undefined": undefined, "replicates": total,
                "degenerate": "undefined on these test images", "covers": COVERS_BOOTSTRAP}
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    degenerate = None
    if undefined > MAX_UNDEFINED_FRACTION * total:
        degenerate = (f"undefined in {undefined} of {total} bootstrap replicates (more than "
                      f"{MAX_UNDEFINED_FRACTION:.0%})")
    elif np.ptp(finite) == 0:
        degenerate = f"every bootstrap replicate gives {float(finite[0]):.3f}: the resampling varies nothing"
    return {"mean": float(point), "low": float(low), "high": float(high), "n": int(len(finite)), "undefined": undefined,
            "replicates": total, "degenerate": degenerate, "covers": COVERS_BOOTSTRAP}


def difference(a: ArmReplicates, b: ArmReplicates, confidence: float = CONFIDENCE) -> dict:
    """Paired difference a - b with its bootstrap interval, whether that interval excludes zero (None where the
    bootstrap is degenerate: no verdict either way), and `p`: the bootstrap's two-sided p-value (twice the smaller
    share of replicates on either side of 0), below 1 - confidence exactly when the percentile interval excludes 0."""
    diffs = a.replicates - b.replicates
    result = interval(a.point - b.point, diffs, confidence)
    excludes = bool(result["mean"] is not None and (result["low"] > 0 or result["high"] < 0))
    result["excludes_zero"] = None if result["degenerate"] else excludes
    finite = diffs[np.isfinite(diffs)]
    result["p"] = float(min(1.0, 2 * min(np.mean(finite <= 0), np.mean(finite >= 0)))) if len(finite) else None
    return result


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment: the family-wise error of all the comparisons on one test set stays at most alpha
    when a verdict needs its adjusted p below alpha (a reviewer reads every verdict of the report together)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
