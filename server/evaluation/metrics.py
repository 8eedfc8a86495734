"""Classification metrics as the ISIC challenge scorer defines them; the seeds' spread.

The ISIC scorer (`isic-challenge-scoring`) computes, per diagnostic category, one-vs-rest AUROC
on that category's raw probability column, and averages over the categories; balanced accuracy
is the mean over categories of true positives / positives. A category absent from the truth has
no positives: its recall and AUROC are undefined and it is left out of both means (the scorer's
NaN-skipping mean). A site's test images often miss classes, so this matters: renormalising the
probabilities over the present classes, or collapsing two present classes into one binary AUROC,
gives other numbers than the field's scorer.

A prediction is the class of the highest probability; a row whose highest probability is shared by
two or more classes is "undecided", as the scorer's `_to_labels` makes it: never right, so it
counts against the recall of its true class and against accuracy, and it has no column in the
confusion matrix (counted apart, as `undecided`).
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, recall_score, roc_auc_score


UNDECIDED = -1  # the predicted label of a row whose highest probability is tied


def predicted_labels(scores: np.ndarray) -> np.ndarray:
    """The ISIC scorer's prediction per row: the index of the highest score, or UNDECIDED where it is tied."""
    scores = np.asarray(scores)
    labels = scores.argmax(axis=1)
    tied = (scores == scores.max(axis=1, keepdims=True)).sum(axis=1) > 1
    return np.where(tied, UNDECIDED, labels)


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
        y_pred = predicted_labels(proba)
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
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),  # undecided rows left out
            "undecided": int(np.sum(y_pred == UNDECIDED)),
        }


METRICS_FORMAT = "dermfed-evaluation-v3"  # v3: content-checked overlap, verdicts withheld on too few lesions, ties
COVERS_SEEDS = "head seeds only: mean, lowest and highest (test and validation images fixed; not a confidence interval)"


def seed_spread(values: Sequence[Optional[float]]) -> dict:
    """Mean, lowest and highest over head seeds, for quantities only the seeds vary (e.g. the overfitting gap);
    test metrics get bootstrap intervals over test lesions and seeds (`uncertainty.py`)."""
    array = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(array) == 0:
        return {"mean": None, "min": None, "max": None, "n": 0, "covers": COVERS_SEEDS}
    return {"mean": float(array.mean()), "min": float(array.min()), "max": float(array.max()), "n": int(len(array)),
            "covers": COVERS_SEEDS}
