"""External test sets, through the real CLI: heads trained and selected on one data set, scored on another.

Source: synthetic data (seed 0) with two classes; external: synthetic data drawn with another seed
(other hospitals' acquisition, other lesions), without the shortcut, and with a third class the heads
never saw. A reviewer checks that every image of the external set is scored as test data, that its
numbers are the ISIC scorer's, that the unseen class is excluded and counted, that the report puts
the external answer first, and that an arm pretrained on the external set, or an external set that
is the source, is refused.
"""

import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score

from server.cli import main

# One worker runs this whole module: its module-scoped fixtures are computed once (pyproject: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_external_sets")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    work = tmp_path_factory.mktemp("external")
    assert main(["data", "synth", "--config", "smoke", "--out", str(work / "source"), "synth.classes=[nv,mel]"]) == 0
    assert main(["data", "synth", "--config", "smoke", "--out", str(work / "other"), "seed=1", "synth.shortcut=false",
                 "synth.lesions_per_site=6"]) == 0
    common = [f"data.root={work / 'source'}", f"data.cache_dir={work / 'cache'}", "synth.classes=[nv,mel]"]
    assert main(["pretrain", "--config", "smoke", "--out", str(work / "pretrain"), *common, "train.max_steps=2"]) == 0
    return work, common


@pytest.fixture(scope="module")
def external_run(two_sets):
    work, common = two_sets
    out = work / "eval"
    assert main(["evaluate", "--config", "smoke", "--checkpoint", str(work / "pretrain"), "--out", str(out), *common,
                 "--external", f"synthetic:{work / 'other'}:other", "evaluation.epochs=3", "evaluation.seeds=[0,1]",
                 "evaluation.bootstrap_replicates=200"]) == 0
    return work, out


def test_every_image_of_an_external_set_is_scored_by_heads_trained_on_the_source(external_run):
    work, out = external_run
    metrics = json.loads((out / "metrics.json").read_text())
    other = pd.read_csv(work / "other" / "synthetic_metadata.csv")
    assert set(other["split"]) == {"train", "val", "test"}  # its own split is ignored: all of it is test data
    known = other[other["dx"].isin(["nv", "mel"])]
    external = metrics["external"]["other"]
    assert external["images"] == len(known) and external["groups"] == known["lesion_id"].nunique()
    assert external["excluded_classes"] == {"BKL": int((other["dx"] == "bkl").sum())} and external["excluded_classes"]["BKL"] > 0
    assert metrics["data"]["classes"] == ["MEL", "NV"]
    predictions = np.load(out / "predictions.npz")
    assert sorted(predictions["external_other_image_id"]) == sorted(known["image_id"])
    truth = predictions["external_other_label"]
    by_key = {arm["key"]: arm for arm in external["arms"]}
    assert set(by_key) == {"federated", "random"}
    for key, arm in by_key.items():
        probas = predictions[f"external_other_split0_{key}"]
        assert probas.shape == (2, len(known), 2)
        for seed, proba in enumerate(probas):  # the ISIC scorer's balanced accuracy, recomputed from the saved probabilities
            assert arm["seeds"][seed]["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, proba.argmax(1)))
        summary = arm["summary"]["balanced_accuracy"]
        assert summary["low"] <= summary["mean"] <= summary["high"] and "lesions" in summary["covers"]
        assert set(arm["per_site"]) == set(other["dataset"])
        assert "lesions" in arm["per_class_recall"]["MEL"]["covers"]
        assert arm["per_class_recall"]["MEL"]["images"] == int((known["dx"] == "mel").sum())
        assert arm["pretraining_overlap"]["test"] == arm["pretraining_overlap"]["test_same_lesion"] == 0
    (comparison,) = [c for c in external["comparisons"] if c["metric"] == "balanced_accuracy"]
    assert (comparison["a"], comparison["b"]) == ("federated", "random")
    assert comparison["words"].startswith("A: pooled VAE encoder")
    # the source's own test split is still scored, separately
    assert metrics["arms"][0]["summary"]["balanced_accuracy"]["mean"] is not None and metrics["comparisons"]
    (out / "report.html").unlink()  # `dermfed report` rewrites it from metrics.json alone
    assert main(["report", str(out)]) == 0 and "generalisation to external test set other" in (out / "report.html").read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium; .ci/run does)")
def test_the_report_gives_the_external_answer_first(external_run, tmp_path):
    _, out = external_run
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", (out / "report.html").resolve().as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    external, source = dom.index("generalisation to external test set other"), dom.index("In distribution: the source")
    assert external < source < dom.index("Head training: chosen epochs")
    assert re.search(r"excluded, not scored: BKL: \d+", dom)


def test_an_arm_pretrained_on_an_external_set_is_refused(two_sets, capsys):
    work, common = two_sets
    other = [f"data.root={work / 'other'}", f"data.cache_dir={work / 'cache'}", "seed=1"]
    assert main(["pretrain", "--config", "smoke", "--out", str(work / "pretrain-other"), *other, "train.max_steps=1",
                 "data.pretrain_splits=[train]"]) == 0
    capsys.readouterr()
    code = main(["evaluate", "--config", "smoke", "--checkpoint", str(work / "pretrain-other"), "--out", str(work / "refused"),
                 *common, "--external", f"synthetic:{work / 'other'}:other", "evaluation.epochs=1", "evaluation.seeds=[0]"])
    message = capsys.readouterr().err
    assert code == 2, message
    assert re.search(r"arm federated \(A: pooled VAE encoder .*\) pretrained on [1-9]\d* images of external test set 'other'",
                     message), message
    assert not (work / "refused" / "metrics.json").exists()


def test_an_external_set_that_shares_images_with_the_source_is_refused(two_sets, capsys):
    work, common = two_sets
    code = main(["evaluate", "--config", "smoke", "--checkpoint", str(work / "pretrain"), "--out", str(work / "same"), *common,
                 "--external", f"synthetic:{work / 'source'}", "evaluation.epochs=1", "evaluation.seeds=[0]"])
    message = capsys.readouterr().err
    assert code == 2 and "external test set 'source' shares" in message and "with the source" in message, message


@pytest.mark.parametrize("spec, words", [("nonsense", "expected FORMAT:ROOT[:NAME]"),
                                         ("folder:/tmp", "format folder holds no labels"),
                                         ("synthetic:/nonexistent/x", "external test set 'x'")])
def test_a_bad_external_spec_is_one_line_and_exit_2(two_sets, spec, words, capsys):
    work, common = two_sets
    code = main(["evaluate", "--config", "smoke", "--checkpoint", str(work / "pretrain"), "--out", str(work / "bad"), *common,
                 "--external", spec])
    message = capsys.readouterr().err
    assert code == 2 and words in message and "unexpected" not in message, message
