"""Classification metrics as the ISIC challenge scorer defines them, and intervals over seeds.

The ISIC scorer (`isic-challenge-scoring`) computes, per diagnostic category, one-vs-rest AUROC
on that category's raw probability column, and averages over the categories; balanced accuracy
is the mean over categories of true positives / positives. A category absent from the truth has
no positives: its recall and AUROC are undefined and it is left out of both means (the scorer's
NaN-skipping mean). A site's test images often miss classes, so this matters: renormalising the
probabilities over the present classes, or collapsing two present classes into one binary AUROC,
gives other numbers than the field's scorer.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, confusion_matrix, recall_score, roc_auc_score


def per_class_auroc(y_true: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC of each class on its raw probability column; NaN where the class has no
    positives or no negatives."""
    values = np.full(proba.shape[1], np.nan)
    for c in range(proba.shape[1]):
        positives = y_true == c
        if positives.any() and not positives.all():
            values[c] = roc_auc_score(positives, proba[:, c])
    return values


def macro_auroc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Mean of the defined per-class AUROCs (NaN when none is defined)."""
    values = per_class_auroc(np.asarray(y_true), proba)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in `y_true` (the ISIC 2019 challenge metric)."""
    present = np.unique(y_true)
    recalls = recall_score(y_true, y_pred, labels=present, average=None, zero_division=0)
    return float(np.mean(recalls)) if len(present) else float("nan")


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, macro AUROC (ISIC definitions), per-class recall and AUROC, confusion matrix."""
    with warnings.catch_warnings():  # small test sets miss classes; handled explicitly below
        warnings.simplefilter("ignore", UserWarning)
        y_true = np.asarray(y_true)
        y_pred = proba.argmax(axis=1)
        labels = list(range(len(classes)))
        recalls = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
        aurocs = per_class_auroc(y_true, proba)
        present = set(np.unique(y_true).tolist())
        return {
            "n": int(len(y_true)),
            "classes_present": [c for i, c in enumerate(classes) if i in present],
            "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else float("nan"),
            "balanced_accuracy": balanced_accuracy(y_true, y_pred, len(classes)),
            "macro_auroc": float(np.nanmean(aurocs)) if np.isfinite(aurocs).any() else float("nan"),
            "per_class_recall": {c: (float(r) if i in present else None) for i, (c, r) in enumerate(zip(classes, recalls))},
            "per_class_auroc": {c: (float(a) if np.isfinite(a) else None) for c, a in zip(classes, aurocs)},
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        }


def mean_ci(values: Sequence[Optional[float]], confidence: float = 0.95,
            bounds: tuple[float, float] = (-np.inf, np.inf)) -> dict:
    """Mean and a t-distribution interval over seeds (finite values only), clipped to `bounds`.

    Used for quantities that only the seeds vary (e.g. the best epoch's gap); test metrics get
    bootstrap intervals over images and seeds (`uncertainty.py`).
    """
    array = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(array) == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(array.mean())
    if len(array) < 2:
        return {"mean": mean, "low": mean, "high": mean, "n": 1}
    half = float(stats.t.ppf(0.5 + confidence / 2, len(array) - 1) * array.std(ddof=1) / np.sqrt(len(array)))
    return {"mean": mean, "low": max(bounds[0], mean - half), "high": min(bounds[1], mean + half), "n": int(len(array))}
