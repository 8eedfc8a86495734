"""The evaluation's metric code, checked against scikit-learn and hand computations on known inputs."""

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from common.config import load_config
from server.evaluation.heads import train_head
from server.evaluation.metrics import classification_metrics, macro_auroc, seed_spread

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
    assert macro_auroc(y_true, proba) == pytest.approx(0.75)


def _isic_reference(y_true, proba):
    """The ISIC scorer's definitions, per class with scikit-learn: one-vs-rest AUROC on each raw probability
    column and recall, averaged over the classes present."""
    present = np.unique(y_true)
    auroc = np.mean([roc_auc_score(y_true == c, proba[:, c]) for c in present])
    recall = np.mean([(proba.argmax(1)[y_true == c] == c).mean() for c in present])
    return auroc, recall


@pytest.mark.parametrize("present", [[0, 1, 2, 3, 4, 5], [0, 2, 3, 5], [1, 4]])
def test_missing_classes_follow_the_isic_scorer(present):
    """7 classes, some absent from the test images (as at vienna_dias): no renormalising, no binary collapse."""
    rng = np.random.default_rng(len(present))
    y_true = rng.choice(present, 80)
    proba = rng.dirichlet(np.ones(7), 80)
    proba[np.arange(80), y_true] += rng.uniform(0, 0.6, 80)  # informative, imperfect
    proba /= proba.sum(1, keepdims=True)
    classes = [f"c{i}" for i in range(7)]
    result = classification_metrics(y_true, proba, classes)
    auroc, recall = _isic_reference(y_true, proba)
    assert result["macro_auroc"] == pytest.approx(auroc, abs=1e-12)
    assert result["balanced_accuracy"] == pytest.approx(recall, abs=1e-12)
    assert result["classes_present"] == [classes[c] for c in sorted(set(present) & set(y_true))]
    assert all((result["per_class_auroc"][c] is None) == (i not in y_true) for i, c in enumerate(classes))


def test_absent_classes_are_reported_not_hidden():
    y_true = np.array([0, 0, 1, 1])  # no BKL in this site's test images
    proba = np.array([[0.9, 0.05, 0.05], [0.4, 0.5, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    result = classification_metrics(y_true, proba, CLASSES)
    assert result["per_class_recall"]["BKL"] is None
    assert result["confusion_matrix"][2] == [0, 0, 0] and result["confusion_matrix"][1][2] == 1
    assert result["macro_auroc"] == pytest.approx(np.mean([roc_auc_score(y_true == c, proba[:, c]) for c in (0, 1)]))
    assert np.isnan(macro_auroc(np.array([1, 1]), proba[:2]))


def _recall_of_class_one(groups, correct, replicates=2000):
    """Per-class recall as `dermfed evaluate` computes it: class 1's images, `correct` of them predicted right."""
    from server.evaluation.run import TestSet, _class_recall
    from server.evaluation.uncertainty import cluster_weights

    n = len(groups)
    labels = np.r_[np.ones(n, dtype=int), np.zeros(4, dtype=int)]
    groups = np.r_[np.asarray(groups, dtype=str), [f"other{i}" for i in range(4)]]
    proba = np.tile([0.9, 0.1], (n + 4, 1))
    proba[:correct] = [0.1, 0.9]
    rng = np.random.default_rng(0)
    test = TestSet("t", labels, np.array(["s"] * (n + 4)), {0: np.arange(n + 4)},
                   {0: cluster_weights(groups, replicates, rng)}, groups)
    return _class_recall(test, {0: [proba, proba, proba]}, ["a", "b"], rng)["b"]


def test_per_class_recall_interval_is_a_bootstrap_over_test_lesions_not_a_point():
    """7 of 9 images right, three equal head seeds: the issue's "0.78 [0.78, 0.78]"; over 9 lesions about 0.5-1.0."""
    alone = _recall_of_class_one([f"l{i}" for i in range(9)], 7)
    assert alone["mean"] == pytest.approx(7 / 9) and alone["images"] == 9 and alone["lesions"] == 9
    assert alone["low"] < 0.6 and alone["high"] == 1.0 and "lesions" in alone["covers"]
    # the same 9 images as 3 lesions of 3 images (the 7 right ones: two whole lesions and one image of the third):
    # the images of one lesion are drawn together, so the interval is wider than the 9 independent images' one
    clustered = _recall_of_class_one(["l0"] * 3 + ["l1"] * 3 + ["l2"] * 3, 7)
    assert clustered["lesions"] == 3 and clustered["low"] < alone["low"] - 0.1


def test_a_class_most_replicates_miss_is_counted_not_silently_dropped():
    """A class with one test lesion: about a third of the replicates draw none of it; they are counted and the
    interval is flagged as unable to support a verdict."""
    single = _recall_of_class_one(["only"], 1)
    assert single["undefined"] > 0.2 * single["replicates"] and single["n"] + single["undefined"] == single["replicates"]
    assert single["degenerate"]


def test_the_seeds_spread_says_it_covers_head_seeds_only():
    spread = seed_spread([0.6, 0.7, 0.8, None])
    assert spread["mean"] == pytest.approx(0.7) and (spread["min"], spread["max"], spread["n"]) == (0.6, 0.8, 3)
    assert spread["covers"].startswith("head seeds only")
    assert seed_spread([float("nan")])["mean"] is None


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
        scores = [h["val_balanced_accuracy"] for h in run.history]  # the default: the headline metric
        assert run.best_epoch == int(np.argmax(scores)) + 1
        for h in run.history:
            assert h["gap_accuracy"] == pytest.approx(h["train_accuracy"] - h["val_accuracy"])
            assert h["gap_balanced_accuracy"] == pytest.approx(h["train_balanced_accuracy"] - h["val_balanced_accuracy"])
            assert h["gap_loss"] == pytest.approx(h["val_loss"] - h["train_loss"])
    by_loss = load_config("smoke", ["evaluation.epochs=12", "evaluation.lr=0.01", "evaluation.select_on=val_loss"]).evaluation
    run = train_head(by_loss, lambda epoch: x_train, y_train, x_val, y_val, 3, seed=0)
    val_losses = [h["val_loss"] for h in run.history]
    assert run.best_epoch == int(np.argmin(val_losses)) + 1


def test_validation_loss_is_weighted_like_the_training_objective():
    """Selecting on validation loss uses the loss the head is trained on (class-weighted), not another one."""
    import torch
    import torch.nn.functional as F

    from server.evaluation.heads import objective_weights

    rng = np.random.default_rng(1)
    x_train, y_train = _separable(200, rng, 1.0)
    y_train[:150] = 0  # imbalanced
    x_val, y_val = _separable(60, rng, 1.0)
    config = load_config("smoke", ["evaluation.epochs=1"]).evaluation  # one epoch: the returned head is that epoch's
    run = train_head(config, lambda epoch: x_train, y_train, x_val, y_val, 3, seed=0)
    weights = objective_weights(config, y_train, 3)
    assert not torch.allclose(weights, torch.ones(3))
    with torch.no_grad():
        logits = run.head((torch.from_numpy(x_val) - run.mean) / run.std)
    target = torch.from_numpy(y_val).long()
    assert run.history[0]["val_loss"] == pytest.approx(float(F.cross_entropy(logits, target, weight=weights)), rel=1e-5)
    assert run.history[0]["val_loss"] != pytest.approx(float(F.cross_entropy(logits, target)), rel=1e-3)


def test_weighted_bootstrap_metrics_equal_scikit_learn_with_sample_weights():
    from server.evaluation.metrics import UNDECIDED, predicted_labels
    from server.evaluation.uncertainty import cluster_weights, weighted_balanced_accuracy, weighted_macro_auroc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 70)  # class 3 of 4 never present
    proba = np.round(rng.dirichlet(np.ones(4), 70), 2)  # rounding makes ties
    weights = cluster_weights(rng.integers(0, 25, 70), 6, rng)
    aurocs, balanced = weighted_macro_auroc(y, proba, weights), weighted_balanced_accuracy(y, proba, weights)
    for b, w in enumerate(weights):
        drawn = w > 0
        reference = [roc_auc_score(y[drawn] == c, proba[drawn, c], sample_weight=w[drawn])
                     for c in range(4) if 0 < (w * (y == c)).sum() < w.sum()]
        assert aurocs[b] == pytest.approx(np.mean(reference), abs=1e-12)
        assert balanced[b] == pytest.approx(balanced_accuracy_score(y[drawn], predicted_labels(proba[drawn]),
                                                                    sample_weight=w[drawn]), abs=1e-12)
    assert (predicted_labels(proba) == UNDECIDED).any()  # the ties are undecided, as the ISIC scorer makes them


def _arm(y, quality, seeds, rng):
    """Test probabilities of an arm per head seed: `quality` 0 is noise, 1 is the truth."""
    probas = []
    for _ in range(seeds):
        noise = rng.dirichlet(np.ones(3), len(y))
        probas.append((1 - quality) * noise + quality * np.eye(3)[y])
    return probas


def test_paired_bootstrap_an_arm_against_itself_contains_zero_a_better_arm_excludes_it():
    from server.evaluation.uncertainty import METRICS, arm_replicates, cluster_weights, difference

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 120)
    groups = np.repeat(np.arange(60), 2)  # two images per lesion: resampled together
    weights = cluster_weights(groups, 1000, rng)
    weak, strong = _arm(y, 0.1, 3, rng), _arm(y, 0.5, 3, rng)
    for metric in ("balanced_accuracy", "macro_auroc"):
        a = arm_replicates(METRICS[metric], y, weak, weights, np.random.default_rng(1))
        again = arm_replicates(METRICS[metric], y, weak, weights, np.random.default_rng(2))
        itself = difference(a, again)
        assert itself["low"] <= 0 <= itself["high"] and not itself["excludes_zero"]
        better = difference(arm_replicates(METRICS[metric], y, strong, weights, np.random.default_rng(3)), a)
        assert better["excludes_zero"] and better["low"] > 0 and better["mean"] > 0


def test_a_tied_prediction_is_undecided_as_the_isic_scorer_makes_it():
    """The ISIC scorer's `_to_labels` gives a row whose highest probability is shared no label: never right.
    argmax would credit the first tied class (here the true one) and inflate accuracy and recall."""
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
    result = classification_metrics(y, proba, ["a", "b"])
    assert result["undecided"] == 1 and result["accuracy"] == pytest.approx(3 / 4)
    assert result["per_class_recall"] == {"a": 0.5, "b": 1.0} and result["balanced_accuracy"] == pytest.approx(0.75)
    assert result["confusion_matrix"] == [[1, 0], [0, 2]]  # the undecided row has no column


def test_a_verdict_must_survive_holms_correction_over_every_comparison_on_the_test_set():
    """A reviewer reads all verdicts together: two 'better' calls at p 0.03 and 0.04 among four comparisons are what
    chance makes of arms that do not differ, and the report must not call them; one at p 0.001 survives."""
    from server.evaluation.run import _words, correct_for_multiplicity

    arms = [{"key": k, "label": k.upper()} for k in ("a", "b", "c", "d", "e")]

    def compared(p_values, excludes):
        comparisons = [{"a": "a", "b": other, "metric": "balanced_accuracy", "mean": 0.05, "low": 0.01 if x else -0.01,
                        "high": 0.09, "undefined": 0, "replicates": 2000, "excludes_zero": x, "p": p}
                       for other, p, x in zip("bcde", p_values, excludes)]
        correct_for_multiplicity(comparisons)
        return comparisons, [_words(arms, c["a"], c["b"], c["metric"], c, [], None) for c in comparisons]

    chance, words = compared([0.03, 0.04, 0.20, 0.60], [True, True, False, False])
    assert [c["holds_after_correction"] for c in chance] == [False] * 4
    assert all("is better" not in w for w in words) and "not with Holm's correction for the 4 comparisons" in words[0]
    real, words = compared([0.001, 0.04, 0.20, 0.60], [True, True, False, False])
    assert [c["holds_after_correction"] for c in real] == [True, False, False, False]
    assert "A is better" in words[0] and "is better" not in words[1]


def test_the_bootstrap_p_value_agrees_with_the_interval():
    from server.evaluation.uncertainty import METRICS, arm_replicates, cluster_weights, difference

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 120)
    weights = cluster_weights(np.repeat(np.arange(60), 2), 1000, rng)
    weak, strong = _arm(y, 0.1, 3, rng), _arm(y, 0.5, 3, rng)
    a = arm_replicates(METRICS["balanced_accuracy"], y, weak, weights, np.random.default_rng(1))
    again = arm_replicates(METRICS["balanced_accuracy"], y, weak, weights, np.random.default_rng(2))
    better = arm_replicates(METRICS["balanced_accuracy"], y, strong, weights, np.random.default_rng(3))
    assert difference(a, again)["p"] >= 0.05 and difference(better, a)["p"] < 0.05
