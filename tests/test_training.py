"""The local pretraining engine: the loss falls on real images; runs are reproducible."""

import json

import numpy as np
import pytest
import timm
import torch

from common.augment import build_augmentation
from common.checkpoint import load_checkpoint, load_frozen_encoder
from common.config import load_config
from common.data.batches import ImageRows, read_batch, to_device_float
from common.data.pipeline import prepare_data
from common.data.splits import split_indices
from common.model import build_model
from common.objectives.vae import vae_loss_per_sample
from common.training import LocalTrainer, SiteState, lr_factor, seed_everything
from server.cli import main


@torch.no_grad()
def _eval_loss(model, images):
    model.eval()
    images = images.to(next(model.parameters()).device)  # the trainer moved the model to its device (CUDA if present)
    return float(vae_loss_per_sample(images, model(images), beta=1.0)["total"].mean())


def test_loss_falls_on_real_ham10000_images_at_64px(ham_sample, tmp_path):
    config = load_config("smoke", [
        "data.format=ham10000", f"data.root={ham_sample}", "data.image_size=64", f"data.cache_dir={tmp_path}",
        "model.encoder=convnext_atto", "model.vae.latent_dim=32", "model.vae.decoder_width=16",
        "train.max_steps=40", "train.epochs=5", "train.batch_size=16", "train.lr=0.002", "train.scheduler=constant",
    ])
    prepared = prepare_data(config)
    train = split_indices(prepared.catalog, "train")
    held_out = to_device_float(read_batch(prepared.store, split_indices(prepared.catalog, "val")[:32]), torch.device("cpu"))
    seed_everything(0)
    model = build_model(config.model, 64)
    before = _eval_loss(model, held_out)
    trainer = LocalTrainer(config, model, ImageRows(prepared.store, train))
    result = trainer.train(SiteState())
    after = _eval_loss(model, held_out)
    assert result.steps == 40 and result.images > 36 * 16  # epochs end with a partial batch
    assert after < 0.6 * before, (before, after)


def _synthetic_trainer(root, tmp_path, *overrides):
    config = load_config("smoke", [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", *overrides])
    prepared = prepare_data(config)
    dataset = ImageRows(prepared.store, split_indices(prepared.catalog, "train"))
    seed_everything(config.seed)
    return LocalTrainer(config, build_model(config.model, config.data.image_size), dataset)


def test_same_seed_same_weights_other_seed_other_weights(synthetic_root, tmp_path):
    runs = []
    for seed in (0, 0, 1):
        trainer = _synthetic_trainer(synthetic_root, tmp_path, f"seed={seed}")
        trainer.train(SiteState())
        runs.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_state_carries_step_optimizer_and_metrics(synthetic_root, tmp_path):
    trainer = _synthetic_trainer(synthetic_root, tmp_path, "train.max_steps=3", "model.vae.kl_warmup_steps=6")
    first = trainer.train(SiteState())
    assert first.state.step == 3 and first.state.optimizer["state"]
    second = trainer.train(first.state)
    assert second.state.step == 6
    assert first.epochs[0].schedule["beta"] < second.epochs[0].schedule["beta"] <= 1.0  # KL warm-up follows the global step
    metrics = second.epochs[0]
    assert metrics.images > 0 and metrics.images_per_second > 0
    losses = metrics.losses
    assert metrics.total == pytest.approx(losses["reconstruction"] + metrics.schedule["beta"] * losses["kl"], rel=0.2)


def test_learning_rate_schedule():
    assert lr_factor(0, 10, 100, "cosine") == pytest.approx(0.1)
    assert lr_factor(10, 10, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, "cosine") == pytest.approx(0.0)
    assert lr_factor(55, 10, 100, "constant") == 1.0


def test_batch_augmentations_are_exact_symmetries_or_mild_and_differ_per_image():
    torch.manual_seed(0)
    image = torch.rand(3, 16, 16)
    batch = image.expand(64, 3, 16, 16).clone()
    geometric = load_config("smoke", ["train.augment.brightness=0", "train.augment.contrast=0",
                                      "train.augment.saturation=0", "train.augment.hue=0"])
    out = build_augmentation(geometric.train.augment)(batch)
    symmetries = [torch.rot90(flipped, k, dims=(1, 2)) for flipped in (image, image.flip(-1)) for k in range(4)]
    assert all(any(torch.equal(o, s) for s in symmetries) for o in out)  # flips and rotations only permute pixels
    assert len({tuple(o.flatten()[:8].tolist()) for o in out}) > 4  # each image drew its own transform
    jitter_only = load_config("smoke", ["train.augment.hflip=false", "train.augment.vflip=false", "train.augment.rot90=false"])
    colour = build_augmentation(jitter_only.train.augment)(batch)
    assert 0 < float((colour - batch).abs().mean()) < 0.1 and colour.min() >= 0 and colour.max() <= 1  # mild
    torch.manual_seed(1)
    first = build_augmentation(load_config("smoke").train.augment)(batch)
    torch.manual_seed(1)
    assert torch.equal(first, build_augmentation(load_config("smoke").train.augment)(batch))  # seeded: reproducible
    off = load_config("smoke", [f"train.augment.{k}={v}" for k, v in [("hflip", "false"), ("vflip", "false"),
        ("rot90", "false"), ("brightness", 0), ("contrast", 0), ("saturation", 0), ("hue", 0)]])
    assert build_augmentation(off.train.augment) is None


@pytest.mark.parametrize("dp", [False, True])
def test_pretrain_command_writes_a_plain_checkpoint_history_and_grid(tmp_path, dp):
    out = tmp_path / "run"
    extra = ["dp.enabled=true", "dp.target_epsilon=10"] if dp else []
    code = main(["pretrain", "--config", "smoke", "--out", str(out), f"data.root={tmp_path / 'data'}",
                 f"data.cache_dir={tmp_path / 'cache'}", *extra])
    assert code == 0
    payload = load_checkpoint(out)
    assert payload["position"]["epoch"] == 1 and payload["config"]["model"]["encoder"] == "convnext_atto"
    assert not any(k.startswith(("_module.", "module.")) for k in [*payload["encoder"], *payload["vae"]])
    backbone = timm.create_model("convnext_atto", num_classes=0)
    backbone.load_state_dict(payload["encoder"], strict=True)
    encoder = load_frozen_encoder(out)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    history = json.loads((out / "history.json").read_text())
    assert 0 < history[0]["steps"] <= 4 and np.isfinite(history[0]["total"])
    assert (history[0]["epsilon"] is not None) == dp
    assert (out / "reconstructions.png").stat().st_size > 0 and (out / "config.yaml").is_file()


def test_pretrain_one_site_only(tmp_path):
    out = tmp_path / "local"
    assert main(["pretrain", "--config", "smoke", "--out", str(out), f"data.root={tmp_path / 'data'}",
                 f"data.cache_dir={tmp_path / 'cache'}", "data.site=hospital_2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arm"] == "local-only" and summary["site"] == "hospital_2"
    assert main(["pretrain", "--config", "smoke", f"data.root={tmp_path / 'data'}", "data.site=nowhere"]) == 2


def test_mixed_precision_choice_per_device(monkeypatch):
    from common.training import autocast_dtype

    assert autocast_dtype(torch.device("cpu"), True) is None  # float32 on the CPU
    assert autocast_dtype(torch.device("cuda"), False) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype(torch.device("cuda"), True) == torch.bfloat16  # no loss scaler needed
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype(torch.device("cuda"), True) == torch.float16  # with a GradScaler kept in SiteState
