"""The evaluation's metric code, checked against scikit-learn and hand computations on known inputs."""

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from common.config import load_config
from server.evaluation.heads import train_head
from server.evaluation.metrics import classification_metrics, macro_auroc, mean_ci

CLASSES = ["MEL", "NV", "BKL"]


def test_known_three_class_case():
    y_true = np.array([0, 0, 1, 1, 1, 2])
    proba = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    result = classification_metrics(y_true, proba, CLASSES)
    # predictions: 0, 1, 1, 1, 0, 2 -> 4 of 6 right; recalls MEL 1/2, NV 2/3, BKL 1/1
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert result["per_class_recall"] == pytest.approx({"MEL": 0.5, "NV": 2 / 3, "BKL": 1.0})
    assert result["confusion_matrix"] == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]
    assert result["macro_auroc"] == pytest.approx(roc_auc_score(y_true, proba, multi_class="ovr", average="macro"))
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, proba.argmax(1)))


def test_binary_auroc_by_hand():
    # positives score 0.8, 0.4; negatives 0.6, 0.2: 3 of 4 pairs ordered correctly
    y_true = np.array([1, 1, 0, 0])
    proba = np.array([[0.2, 0.8], [0.6, 0.4], [0.4, 0.6], [0.8, 0.2]])
    assert macro_auroc(y_true, proba, 2) == pytest.approx(0.75)


def test_absent_classes_are_reported_not_hidden():
    y_true = np.array([0, 0, 1, 1])  # no BKL in this site's test images
    proba = np.array([[0.9, 0.05, 0.05], [0.4, 0.5, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    result = classification_metrics(y_true, proba, CLASSES)
    assert result["per_class_recall"]["BKL"] is None
    assert result["confusion_matrix"][2] == [0, 0, 0] and result["confusion_matrix"][1][2] == 1
    renormalised = proba[:, :2] / proba[:, :2].sum(1, keepdims=True)
    assert result["macro_auroc"] == pytest.approx(roc_auc_score(y_true, renormalised[:, 1]))
    assert np.isnan(macro_auroc(np.array([1, 1]), proba[:2], 3))


def test_mean_and_95_percent_interval_over_seeds():
    ci = mean_ci([0.6, 0.7, 0.8])
    half = stats.t.ppf(0.975, 2) * 0.1 / np.sqrt(3)
    assert ci["mean"] == pytest.approx(0.7) and ci["low"] == pytest.approx(0.7 - half) and ci["high"] == pytest.approx(0.7 + half)
    assert mean_ci([0.6, 0.7, 0.8], bounds=(0, 0.75))["high"] == 0.75
    assert mean_ci([0.5]) == {"mean": 0.5, "low": 0.5, "high": 0.5, "n": 1}
    assert mean_ci([float("nan"), None])["mean"] is None


def _separable(n, rng, shift):
    labels = rng.integers(0, 3, n)
    features = rng.normal(0, 1, (n, 8)) + np.eye(3, 8)[labels] * shift
    return features.astype(np.float32), labels


def test_head_learns_and_the_best_epoch_is_chosen_on_validation_only():
    rng = np.random.default_rng(0)
    x_train, y_train = _separable(300, rng, 3.0)
    x_val, y_val = _separable(90, rng, 3.0)
    for imbalance in ("class-weights", "balanced-sampling", "none"):
        config = load_config("smoke", ["evaluation.epochs=12", "evaluation.lr=0.01", f"evaluation.imbalance={imbalance}"]).evaluation
        run = train_head(config, lambda epoch: x_train, y_train, x_val, y_val, 3, seed=0)
        assert len(run.history) == 12
        assert run.history[-1]["val_accuracy"] > 0.8
        val_losses = [h["val_loss"] for h in run.history]
        assert run.best_epoch == int(np.argmin(val_losses)) + 1
        for h in run.history:
            assert h["gap"] == pytest.approx(h["train_accuracy"] - h["val_accuracy"])
    by_accuracy = load_config("smoke", ["evaluation.epochs=12", "evaluation.lr=0.01", "evaluation.select_by=val_balanced_accuracy"]).evaluation
    run = train_head(by_accuracy, lambda epoch: x_train, y_train, x_val, y_val, 3, seed=0)
    scores = [h["val_balanced_accuracy"] for h in run.history]
    assert run.best_epoch == int(np.argmax(scores)) + 1
