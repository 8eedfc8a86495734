"""Central evaluation end to end: arms, cached features, per-site metrics, and the HTML report."""

import base64
import hashlib
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import server.evaluation.features as features_module
from server.cli import main
from server.evaluation.arms import ArmUnavailable
from server.evaluation.arms.imagenet import cached_imagenet_file, imagenet_arm

# One worker runs this whole module: its module-scoped fixtures are computed once (pyproject: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_evaluation")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_missing_imagenet_weights_offline_name_both_fixes(monkeypatch):
    monkeypatch.setattr("server.evaluation.arms.imagenet.cached_imagenet_file", lambda name: None)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("offline: nothing may be downloaded"))
    with pytest.raises(ArmUnavailable) as err:
        imagenet_arm("convnext_tiny.fb_in1k", None)
    assert "HF_HUB_OFFLINE" in str(err.value)
    assert "--imagenet-weights" in str(err.value) and "Hugging Face cache" in str(err.value)
    with pytest.raises(ArmUnavailable, match="no such file"):
        imagenet_arm("convnext_tiny.fb_in1k", "/nonexistent/weights.bin")


def test_online_the_imagenet_arm_fetches_its_weights_as_timm_does(monkeypatch):
    """With the Hub reachable (stubbed here: tests never download), arm B asks timm for the pretrained model."""
    monkeypatch.setattr("server.evaluation.arms.imagenet.cached_imagenet_file", lambda name: None)
    monkeypatch.setattr("server.evaluation.arms.imagenet._hub_unreachable", lambda: None)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def fetch(name, **kwargs):
        calls.append((name, kwargs))
        return torch.nn.Identity()

    monkeypatch.setattr(timm, "create_model", fetch)
    arm = imagenet_arm("convnext_tiny.fb_in1k", None)
    assert calls == [("convnext_tiny.fb_in1k", {"pretrained": True, "num_classes": 0})]
    assert "Hugging Face Hub" in arm.source

    def no_network(name, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(ArmUnavailable, match="could not be downloaded .*Network is unreachable.*--imagenet-weights"):
        imagenet_arm("convnext_tiny.fb_in1k", None)
    monkeypatch.setattr("server.evaluation.arms.imagenet._hub_unreachable", lambda: "huggingface.co: Name or service not known")
    with pytest.raises(ArmUnavailable, match="cannot be reached .*--imagenet-weights"):
        imagenet_arm("convnext_tiny.fb_in1k", None)


def test_imagenet_weights_load_from_a_file_or_the_cache(tmp_path):
    torch.manual_seed(1)
    reference = timm.create_model("convnext_tiny", pretrained=False)  # with its 1000-class head, as published
    path = tmp_path / "pytorch_model.bin"
    torch.save(reference.state_dict(), path)
    arm = imagenet_arm("convnext_tiny.fb_in1k", str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    # random weights in timm's layout are not ImageNet's: named by their file and hash, their pretraining unknown
    assert "ImageNet" not in arm.label and "unverified weights" in arm.label and digest[:12] in arm.label, arm.label
    assert not arm.pretraining.known and digest in arm.source
    loaded = arm.encoder.state_dict()
    assert "head.fc.weight" not in loaded  # classifier dropped: a frozen feature extractor
    assert torch.equal(loaded["stem.0.weight"], reference.state_dict()["stem.0.weight"])
    snapshot = tmp_path / "hub" / "models--timm--convnext_tiny.fb_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    shutil.copy(path, snapshot / "pytorch_model.bin")
    (tmp_path / "hub" / "models--timm--convnext_tiny.fb_in1k" / "refs").mkdir()
    (tmp_path / "hub" / "models--timm--convnext_tiny.fb_in1k" / "refs" / "main").write_text("abc123")
    assert cached_imagenet_file("convnext_tiny.fb_in1k", str(tmp_path / "hub")) == snapshot / "pytorch_model.bin"



def test_imagenet_weights_are_named_imagenet_only_by_a_known_hash(tmp_path, monkeypatch):
    from server.evaluation.arms import imagenet as arms

    assert "08b9dc9c3a3a29421de7996761e176501896d1ae7fc3085cf56a643772329276" in \
        arms.KNOWN_IMAGENET_SHA256["convnext_tiny.fb_in1k"]  # timm/convnext_tiny.fb_in1k model.safetensors
    path = tmp_path / "pytorch_model.bin"
    torch.save(timm.create_model("convnext_tiny", pretrained=False).state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(arms.KNOWN_IMAGENET_SHA256, "convnext_tiny.fb_in1k", frozenset({digest}))
    arm = imagenet_arm("convnext_tiny.fb_in1k", str(path))
    assert arm.label == "B: ImageNet ConvNeXt-Tiny" and arm.pretraining.known and digest in arm.source


@pytest.fixture(scope="module")
def ham_evaluation(tmp_path_factory):
    from tests.conftest import HAM_SAMPLE

    if not (HAM_SAMPLE / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"real HAM10000 sample not found at {HAM_SAMPLE}")
    work = tmp_path_factory.mktemp("ham-eval")
    common = ["data.format=ham10000", f"data.root={HAM_SAMPLE}", "data.image_size=64", f"data.cache_dir={work / 'cache'}"]
    assert main(["pretrain", "--config", "smoke", "--out", str(work / "pretrain"), *common]) == 0
    calls = {"n": 0}
    original = features_module.FeatureExtractor.__call__

    def counting(self, rows, transform=None, desc=""):
        calls["n"] += 1
        return original(self, rows, transform, desc)

    features_module.FeatureExtractor.__call__ = counting
    try:
        assert main(["evaluate", "--config", "smoke", "--checkpoint", str(work / "pretrain"), "--out", str(work / "eval"),
                     *common, "evaluation.epochs=4", "evaluation.seeds=[0,1]"]) == 0
    finally:
        features_module.FeatureExtractor.__call__ = original
    return work / "eval", calls["n"]


def test_small_evaluation_on_real_ham10000(ham_evaluation):
    run, extraction_calls = ham_evaluation
    metrics = json.loads((run / "metrics.json").read_text())
    arms = {arm["key"]: arm for arm in metrics["arms"]}
    assert set(arms) == {"federated", "random"}  # B needs ImageNet weights; D and E need checkpoints
    assert "--imagenet-weights" in metrics["skipped_arms"]["imagenet"]
    assert extraction_calls == 2  # features of every image once per arm, reused by every seed and epoch
    assert metrics["data"]["classes"] == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC"]
    for arm in arms.values():
        assert len(arm["seeds"]) == 2 and len(arm["curves"]["epoch"]) == 4
        assert set(arm["per_site"]) == {"rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"}
        summary = arm["summary"]["balanced_accuracy"]
        assert 0 <= summary["low"] <= summary["mean"] <= summary["high"] <= 1
        assert np.array(arm["confusion_matrix"]).sum() == 2 * metrics["data"]["split_sizes"]["test"]
        assert all(1 <= s["best_epoch"] <= 4 for s in arm["seeds"])
        assert arm["gap"]["metric"] == "balanced_accuracy"  # the metric heads are selected on (the default)
        for where in ("at_chosen_epoch", "at_last_epoch"):
            assert arm["gap"][where]["covers"].startswith("head seeds only") and arm["gap"][where]["n"] == 2
        chosen = [s["gap_at_chosen"]["balanced_accuracy"] for s in arm["seeds"]]
        assert arm["gap"]["at_chosen_epoch"]["mean"] == pytest.approx(np.mean(chosen))
        assert len(arm["curves"]["val_balanced_accuracy"]) == 4  # the training curves carry the selection metric
        recall = arm["per_class_recall"]["DF"]  # a bootstrap interval over the test lesions, not over 2 seeds
        assert "lesions" in recall["covers"] and recall["n"] > 0 and recall["low"] < recall["high"]
        assert recall["images"] >= recall["lesions"] > 0
        assert arm["pretraining_overlap"]["val"] == arm["pretraining_overlap"]["test"] == 0
    assert arms["federated"]["pretraining_overlap"]["train"] == arms["federated"]["pretraining_overlap"]["pretraining_images"] > 0
    vienna = arms["federated"]["per_site"]["vienna_dias"]["classes_present"]
    assert 0 < len(vienna) < 7  # per-site rows say which classes the site's test images hold
    (comparison, *_) = [c for c in metrics["comparisons"] if c["b"] == "random" and c["metric"] == "balanced_accuracy"]
    assert comparison["a"] == "federated" and comparison["low"] <= comparison["mean"] <= comparison["high"]
    predictions = np.load(run / "predictions.npz")
    assert predictions["split0_federated"].shape == (2, metrics["data"]["split_sizes"]["test"], 7)
    assert (run / "report.html").is_file() and (run / "figures" / "curves.png").is_file()


def test_augmented_training_recomputes_features(tmp_path, synthetic_root):
    from common.config import load_config
    from server.evaluation.run import run_evaluation

    pretrain = tmp_path / "pretrain"
    common = [f"data.root={synthetic_root}", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["pretrain", "--config", "smoke", "--out", str(pretrain), *common]) == 0
    calls = {"n": 0}
    original = features_module.FeatureExtractor.__call__

    def counting(self, rows, transform=None, desc=""):
        calls["n"] += transform is not None
        return original(self, rows, transform, desc)

    features_module.FeatureExtractor.__call__ = counting
    try:
        config = load_config("smoke", [*common, "evaluation.epochs=3", "evaluation.seeds=[0]", "evaluation.augment=true",
                                       "evaluation.arms=[federated]"])
        metrics = run_evaluation(config, pretrain, tmp_path / "eval")
    finally:
        features_module.FeatureExtractor.__call__ = original
    assert calls["n"] == 3  # one fresh pass over augmented training images per epoch
    assert metrics["arms"][0]["shortcut"]["artefact_mismatches_class"]["mean"] is not None


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium; .ci/run does)")
def test_report_renders_in_headless_chromium(ham_evaluation, tmp_path):
    run, _ = ham_evaluation
    metrics = json.loads((run / "metrics.json").read_text())
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = (run / "report.html").resolve().as_uri()
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert "DermFed evaluation report" in dom and "Final test metrics" in dom
    assert dom.index("The answer: paired differences") < dom.index("Final test metrics")  # the answer first
    assert "minus C: random init (control), balanced accuracy" in dom
    federated = next(arm for arm in metrics["arms"] if arm["key"] == "federated")
    assert f"{federated['summary']['balanced_accuracy']['mean']:.3f}" in dom
    assert "vienna_dias" in dom and "Arm imagenet did not run" in dom
    assert "What it cannot mean on its own" in dom and "(seeds: " in dom and "per-class recall included" in dom  # what each interval covers
    assert "generalisation to external" not in dom  # no external set: the source's answer comes first
    assert "DP-SGD off." in dom and not (run / "figures" / "privacy.png").exists()  # words, not an empty chart
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', dom)
    assert len(images) == 4  # curves, gap, confusion matrices, pretraining loss
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,2400", url],
                   capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10  # text, tables and figures were drawn, not a blank page


def test_pooled_and_local_control_arms(tmp_path, synthetic_root):
    common = [f"data.root={synthetic_root}", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["pretrain", "--config", "smoke", "--out", str(tmp_path / "pooled"), *common]) == 0
    assert main(["pretrain", "--config", "smoke", "--out", str(tmp_path / "local"), *common, "data.site=hospital_1"]) == 0
    assert main(["evaluate", "--config", "smoke", "--checkpoint", str(tmp_path / "pooled"), "--pooled", str(tmp_path / "pooled"),
                 "--local", str(tmp_path / "local"), "--out", str(tmp_path / "eval"), *common,
                 "evaluation.epochs=2", "evaluation.seeds=[0]", "evaluation.head=mlp"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert [arm["key"] for arm in metrics["arms"]] == ["federated", "random", "pooled", "local"]
    assert "data.site" not in metrics["arms"][3]["source"] and "local" in metrics["arms"][3]["source"]
    report = (tmp_path / "eval" / "report.html").read_text()
    assert report.count("E: local-only VAE encoder (hospital_1, 1 epoch, DP-SGD off)") >= 2
    # a pooled run passed as --checkpoint is named pooled, in every heading and verdict: never "federated"
    assert metrics["arms"][0]["label"] == "A: pooled VAE encoder (1 epoch, DP-SGD off)"
    assert metrics["arms"][0]["provenance"]["kind"] == "pooled" and "A: federated" not in report
    assert all(c["words"].startswith("A: pooled VAE encoder (1 epoch, DP-SGD off) minus ") for c in metrics["comparisons"])


def test_the_local_only_arm_never_pretrained_on_an_evaluation_image(ham_sample, tmp_path):
    """On the real HAM10000 sample: each site's local-only checkpoint and the pooled evaluation's val/test splits are disjoint."""
    from common.checkpoint import load_checkpoint
    from common.config import load_config
    from common.data.pipeline import prepare_data
    from server.evaluation.leakage import overlap, pretraining_images

    common = ["data.format=ham10000", f"data.root={ham_sample}", f"data.cache_dir={tmp_path / 'cache'}"]
    catalog = prepare_data(load_config("smoke", common)).catalog
    for site in ("rosendahl", "vienna_dias"):
        out = tmp_path / site
        assert main(["pretrain", "--config", "smoke", "--out", str(out), *common, f"data.site={site}", "train.max_steps=1"]) == 0
        counts = overlap(pretraining_images(load_checkpoint(out)), catalog)
        assert counts["val"] == counts["test"] == 0, (site, counts)
        assert counts["train"] == counts["pretraining_images"] > 0


def test_a_checkpoint_pretrained_on_another_split_is_refused(ham_sample, tmp_path, capsys):
    common = ["data.format=ham10000", f"data.root={ham_sample}", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["pretrain", "--config", "smoke", "--out", str(tmp_path / "seed3"), *common, "seed=3",
                 "train.max_steps=1"]) == 0
    capsys.readouterr()
    code = main(["evaluate", "--config", "smoke", "--checkpoint", str(tmp_path / "seed3"), "--out", str(tmp_path / "eval"),
                 *common, "seed=0", "evaluation.epochs=1", "evaluation.seeds=[0]"])
    message = capsys.readouterr().err
    assert code == 2
    assert re.search(r"arm federated \(A: pooled VAE encoder \(1 epoch, DP-SGD off\)\) pretrained on [1-9]\d* test \([^)]*\) and "
                     r"\d+ validation images", message), message
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_split_seeds_redraw_the_split_for_arms_that_permit_it(ham_sample, tmp_path, capsys):
    """The random arm pretrained on nothing: every split is allowed. A checkpoint pretrained on split 0 is not."""
    from common.config import load_config
    from server.evaluation.run import run_evaluation

    common = ["data.format=ham10000", f"data.root={ham_sample}", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["pretrain", "--config", "smoke", "--out", str(tmp_path / "pre"), *common, "train.max_steps=1"]) == 0
    config = load_config("smoke", [*common, "evaluation.epochs=1", "evaluation.seeds=[0]", "evaluation.split_seeds=[0,1]",
                                   "evaluation.arms=[random]", "evaluation.bootstrap_replicates=200"])
    metrics = run_evaluation(config, tmp_path / "pre", tmp_path / "eval")
    (arm,) = metrics["arms"]
    assert metrics["data"]["split_seeds"] == [0, 1] and [s["split_seed"] for s in arm["seeds"]] == [0, 1]
    assert arm["summary"]["balanced_accuracy"]["n"] == 2 * 200  # replicates of both splits pooled
    both = config.model_copy(update={"evaluation": config.evaluation.model_copy(update={"arms": ["federated"]})})
    with pytest.raises(Exception, match="arm federated .* pretrained on [1-9]"):
        run_evaluation(both, tmp_path / "pre", tmp_path / "eval2")


def test_an_older_checkpoint_without_a_record_is_rebuilt_from_its_config(synthetic_root, tmp_path):
    from common.checkpoint import load_checkpoint
    from server.evaluation.leakage import pretraining_images

    out = tmp_path / "pre"
    assert main(["pretrain", "--config", "smoke", "--out", str(out), f"data.root={synthetic_root}",
                 f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=1"]) == 0
    payload = load_checkpoint(out)
    recorded = pretraining_images(payload)
    del payload["extra"]["pretraining_images"]
    rebuilt = pretraining_images(payload)
    assert rebuilt.image_ids == recorded.image_ids and len(recorded.image_ids) > 0
    assert rebuilt.groups == recorded.groups and len(recorded.groups) > 0
    assert rebuilt.source.startswith("rebuilt") and recorded.source.startswith("recorded")
