"""The CUDA paths: they run where a GPU is present (`pytest -m gpu`) and skip, saying so, elsewhere.

The same engine runs on the CPU in the rest of the suite; these tests cover what only a GPU
exercises: bfloat16 autocast, float16 with a loss scaler kept across rounds, channels-last,
uint8 batches converted and augmented on the device, DP-SGD on CUDA, and a federated run that
must lower the loss (the bug that made federated training on a GPU skip every step).
"""

import json

import numpy as np
import pytest
import torch

from common.augment import build_augmentation
from common.config import load_config
from common.data.batches import BatchLoader, ImageRows, ordered_batches
from common.data.pipeline import prepare_data
from common.data.splits import split_indices
from common.model import build_model
from common.training import FP16_INIT_SCALE, LocalTrainer, SiteState
from tests.conftest import random_image_rows

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


def _trainer(synthetic_root, tmp_path, *overrides, seed=0):
    config = load_config("smoke", [f"data.root={synthetic_root}", f"data.cache_dir={tmp_path / 'cache'}",
                                   "train.device=cuda", *overrides])
    prepared = prepare_data(config)
    torch.manual_seed(seed)
    model = build_model(config.model, config.data.image_size)
    return LocalTrainer(config, model, ImageRows(prepared.store, split_indices(prepared.catalog, "train")))


def test_bfloat16_where_the_gpu_has_it_and_the_loss_falls(synthetic_root, tmp_path):
    trainer = _trainer(synthetic_root, tmp_path, "train.max_steps=30", "train.epochs=30", "train.scheduler=constant")
    assert trainer.amp_dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    result = trainer.train(SiteState())
    assert sum(e.skipped_steps for e in result.epochs) == 0
    assert result.epochs[-1].total < 0.8 * result.epochs[0].total
    assert next(trainer.model.parameters()).is_cuda


def test_float16_keeps_its_loss_scale_across_rounds_and_skips_no_step(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    trainer = _trainer(synthetic_root, tmp_path, "train.max_steps=3")
    assert trainer.uses_scaler
    first = trainer.train(SiteState())
    assert first.state.scaler is not None and first.state.scaler["scale"] >= FP16_INIT_SCALE / 2
    second = trainer.train(first.state)  # a new round continues the scale instead of starting over
    assert sum(e.skipped_steps for e in first.epochs + second.epochs) == 0
    assert second.state.optimizer["state"]


def test_batches_travel_as_uint8_and_are_augmented_on_the_device():
    images = random_image_rows(n=20, size=32)
    loader = BatchLoader(images, torch.device("cuda"), build_augmentation(load_config("smoke").train.augment),
                         channels_last=True, prefetch=2)
    batches = list(loader(ordered_batches(len(images), 8)))
    assert [b.shape[0] for b in batches] == [8, 8, 4]
    assert all(b.is_cuda and b.dtype == torch.float32 and b.is_contiguous(memory_format=torch.channels_last)
               for b in batches)
    plain = BatchLoader(images, torch.device("cuda"))
    first = plain.load(np.arange(8))
    expected = torch.from_numpy(images.read(np.arange(8))).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(first.cpu(), expected)


def test_dp_on_cuda_trains_and_accounts(synthetic_root, tmp_path):
    trainer = _trainer(synthetic_root, tmp_path, "dp.enabled=true", "dp.noise_multiplier=1.0", "train.max_steps=4")
    assert trainer.amp_dtype is None  # DP-SGD runs in float32
    result = trainer.train(SiteState())
    assert result.privacy.steps == 4 and result.privacy.epsilon > 0
    assert next(trainer.model.parameters()).is_cuda


@pytest.mark.slow
def test_a_three_round_federated_smoke_run_on_the_gpu_lowers_the_loss(tmp_path):
    from simulations.runner import run_simulation

    config = load_config("smoke", [f"data.root={tmp_path / 'data'}", f"data.cache_dir={tmp_path / 'cache'}",
                                   "federation.num_rounds=3", "train.max_steps=8", "train.epochs=8"])
    run = run_simulation(config, tmp_path / "run")
    history = json.loads((run / "history.json").read_text())
    losses = [entry["train"]["reconstruction"] for entry in history]
    assert losses[-1] < losses[0], losses
    assert all(site.get("skipped-steps", 0) == 0 for entry in history for site in entry["sites"])


def test_virtual_hospitals_sharing_a_gpu_hold_it_only_while_they_train(synthetic_root, tmp_path):
    """Several virtual hospitals in one worker process (one Ray actor) share the GPU: between rounds each keeps its
    model and optimizer state in host memory, and its next round continues exactly as if it had stayed there."""
    from client.site import SiteRunner, simulation_site_data
    from server.federation import initial_shared_weights

    config = load_config("smoke", [f"data.root={synthetic_root}", f"data.cache_dir={tmp_path / 'cache'}",
                                   "train.device=cuda", "train.max_steps=2"])
    weights = initial_shared_weights(config)
    idle = torch.cuda.memory_allocated()
    sites = [SiteRunner(config, simulation_site_data(config, i, 3), tmp_path / f"site{i}") for i in range(3)]
    assert torch.cuda.memory_allocated() - idle < 2**20
    for round_number in (1, 2):
        for site in sites:
            site.train_round(round_number, weights)
            assert torch.cuda.memory_allocated() - idle < 2**20, "a site that is not training still holds the GPU"
            assert not next(site.model.parameters()).is_cuda
    assert all(site.state.step == 4 for site in sites)  # round 2 continued round 1's optimizer state
