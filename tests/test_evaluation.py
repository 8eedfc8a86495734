"""Central evaluation end to end: arms, cached features, per-site metrics, and the HTML report."""

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import server.evaluation.features as features_module
from server.cli import main
from server.evaluation.arms import ArmUnavailable, cached_imagenet_file, imagenet_arm

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_missing_imagenet_weights_name_both_fixes(monkeypatch):
    monkeypatch.setattr("server.evaluation.arms.cached_imagenet_file", lambda name: None)
    with pytest.raises(ArmUnavailable) as err:
        imagenet_arm("convnext_tiny.fb_in1k", None)
    assert "--imagenet-weights" in str(err.value) and "Hugging Face cache" in str(err.value)
    with pytest.raises(ArmUnavailable, match="no such file"):
        imagenet_arm("convnext_tiny.fb_in1k", "/nonexistent/weights.bin")


def test_imagenet_weights_load_from_a_file_or_the_cache(tmp_path):
    torch.manual_seed(1)
    reference = timm.create_model("convnext_tiny", pretrained=False)  # with its 1000-class head, as published
    path = tmp_path / "pytorch_model.bin"
    torch.save(reference.state_dict(), path)
    arm = imagenet_arm("convnext_tiny.fb_in1k", str(path))
    loaded = arm.encoder.state_dict()
    assert "head.fc.weight" not in loaded  # classifier dropped: a frozen feature extractor
    assert torch.equal(loaded["stem.0.weight"], reference.state_dict()["stem.0.weight"])
    snapshot = tmp_path / "hub" / "models--timm--convnext_tiny.fb_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    shutil.copy(path, snapshot / "pytorch_model.bin")
    (tmp_path / "hub" / "models--timm--convnext_tiny.fb_in1k" / "refs").mkdir()
    (tmp_path / "hub" / "models--timm--convnext_tiny.fb_in1k" / "refs" / "main").write_text("abc123")
    assert cached_imagenet_file("convnext_tiny.fb_in1k", str(tmp_path / "hub")) == snapshot / "pytorch_model.bin"


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
    assert extraction_calls == 2 * 3  # features of train/val/test once per arm, reused by every seed and epoch
    assert metrics["data"]["classes"] == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC"]
    for arm in arms.values():
        assert len(arm["seeds"]) == 2 and len(arm["curves"]["epoch"]) == 4
        assert set(arm["per_site"]) == {"rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"}
        assert 0 <= arm["summary"]["balanced_accuracy"]["mean"] <= 1
        assert np.array(arm["confusion_matrix"]).sum() == 2 * metrics["data"]["split_sizes"]["test"]
        assert all(1 <= s["best_epoch"] <= 4 for s in arm["seeds"])
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
    assert metrics["arms"][0]["shortcut"]["artefact_mismatches_class"]["n"] == 1


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
    federated = next(arm for arm in metrics["arms"] if arm["key"] == "federated")
    assert f"{federated['summary']['balanced_accuracy']['mean']:.3f}" in dom
    assert "vienna_dias" in dom and "Arm imagenet did not run" in dom
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', dom)
    assert len(images) == 4
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
    assert (tmp_path / "eval" / "report.html").read_text().count("E: local-only VAE encoder") >= 2
