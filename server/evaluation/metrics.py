"""Classification metrics, from scikit-learn, and intervals over seeds."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, recall_score, roc_auc_score


def macro_auroc(y_true: np.ndarray, proba: np.ndarray, num_classes: int) -> float:
    """One-vs-rest macro AUROC over the classes present in `y_true` (NaN if fewer than two)."""
    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan")
    if num_classes == 2:
        return float(roc_auc_score(y_true, proba[:, 1]))
    scores = proba[:, present]
    scores = scores / np.clip(scores.sum(axis=1, keepdims=True), 1e-12, None)
    if len(present) == 2:
        return float(roc_auc_score(y_true == present[1], scores[:, 1]))
    return float(roc_auc_score(y_true, scores, multi_class="ovr", average="macro", labels=present))


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy (the ISIC 2019 metric), macro AUROC, per-class recall, confusion matrix."""
    with warnings.catch_warnings():  # small test sets miss classes; the metrics below handle that explicitly
        warnings.simplefilter("ignore", UserWarning)
        return _classification_metrics(np.asarray(y_true), proba, classes)


def _classification_metrics(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> dict:
    y_pred = proba.argmax(axis=1)
    labels = list(range(len(classes)))
    recalls = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    present = set(np.unique(y_true).tolist())
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_auroc": macro_auroc(y_true, proba, len(classes)),
        "per_class_recall": {c: (float(r) if i in present else None) for i, (c, r) in enumerate(zip(classes, recalls))},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def mean_ci(values: Sequence[float], confidence: float = 0.95, bounds: tuple[float, float] = (-np.inf, np.inf)) -> dict:
    """Mean and a t-distribution confidence interval over seeds (NaN-free values only), clipped to `bounds`."""
    array = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(array) == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(array.mean())
    if len(array) < 2:
        return {"mean": mean, "low": mean, "high": mean, "n": 1}
    half = float(stats.t.ppf(0.5 + confidence / 2, len(array) - 1) * array.std(ddof=1) / np.sqrt(len(array)))
    low, high = max(bounds[0], mean - half), min(bounds[1], mean + half)
    return {"mean": mean, "low": low, "high": high, "n": int(len(array))}
