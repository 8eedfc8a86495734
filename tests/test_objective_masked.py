"""The masked-image-modelling objective: exact per-sample gradients under DP, and it learns with and without DP."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

from common.config import load_config
from common.data.batches import ImageRows, read_batch, to_device_float
from common.data.pipeline import prepare_data
from common.data.splits import split_indices
from common.model import build_model
from common.objectives.masked import MaskedConvNeXt
from common.privacy import make_private
from common.training import LocalTrainer, SiteState, seed_everything


def _model() -> MaskedConvNeXt:
    torch.manual_seed(0)
    return MaskedConvNeXt("convnext_atto", image_size=32, patch_size=8, decoder_width=16).double()


def test_the_dp_step_clips_exactly_the_reference_per_sample_gradients():
    """As for the VAE (tests/test_privacy.py): each image's gradient norm under DP-SGD equals torch.func's, with the
    masks handed in as that image's draws."""
    model, batch = _model(), 4
    images = torch.rand(batch, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    masks = torch.rand(batch, model.patches, generator=torch.Generator().manual_seed(1))
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss_of_one(p, image, uniforms):
        out = functional_call(model, (p, buffers), (image[None],), {"draws": {"mask": uniforms[None]}})
        return model.loss_terms(image[None], out, {})["total"].mean()

    reference = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, images, masks)
    norms = torch.cat([reference[k].flatten(1) for k, _ in model.named_parameters()], dim=1).norm(dim=1)
    config = load_config("smoke", ["dp.enabled=true", "dp.noise_multiplier=1.0", "dp.max_grad_norm=1e-3"])
    private = make_private(config.dp, model, torch.optim.SGD(model.parameters(), lr=0.0), batch, batch, 1.0, None)
    inputs = images.clone().requires_grad_(True)
    private.backward(model.loss_terms(images, private.module(inputs, draws={"mask": masks}), {})["total"], inputs)
    assert float(((private.module.per_sample_gradient_norms - norms).abs() / norms).max()) < 1e-9
    private.close()


def test_masks_come_from_the_draws_and_cover_the_ratio():
    model = _model().float()
    uniforms = torch.rand(3, model.patches)
    out = model(torch.rand(3, 3, 32, 32), draws={"mask": uniforms})
    assert torch.equal(out.mask.sum(dim=1), torch.full((3,), float(round(0.6 * 16))))
    assert torch.equal(out.mask, model(torch.rand(3, 3, 32, 32), draws={"mask": uniforms}).mask)
    assert model.random_streams() == {"mask": ("uniform", 16)}
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("dp", [False, True], ids=["no-dp", "dp"])
def test_it_trains_and_its_loss_falls_on_convnext_atto_at_32px(dp, synthetic_root, tmp_path):
    # Under DP: the real DP-SGD path (Opacus, per-sample gradients, secret mask draws, Poisson sampling) with a noise
    # and a clipping norm that leave the signal to 15 steps: this checks that the path learns, not the privacy/utility
    # trade-off (noise 0.3 at clip 1 with 8 images a batch drowns 15 steps' signal under AdamW). The noise's standard
    # deviation is noise_multiplier * max_grad_norm / batch: both stay small.
    privacy = ["dp.enabled=true", "dp.noise_multiplier=0.0001", "dp.max_grad_norm=10"] if dp else []
    config = load_config("smoke", [f"data.root={synthetic_root}", f"data.cache_dir={tmp_path / 'cache'}",
                                   "train.device=cpu", "model.objective=masked", "train.max_steps=15", "train.epochs=15",
                                   "train.lr=0.003", "train.scheduler=constant", *privacy])
    prepared = prepare_data(config)
    held_out = to_device_float(read_batch(prepared.store, split_indices(prepared.catalog, "val")[:16]), torch.device("cpu"))
    seed_everything(0)
    model = build_model(config.model, config.data.image_size)
    assert isinstance(model, MaskedConvNeXt) and model.patch_size == 8  # the smoke preset's model.masked section

    @torch.no_grad()
    def held_out_loss() -> float:
        model.eval()  # evaluation masks are fixed: the two numbers compare the same task
        return float(model.loss_terms(held_out, model(held_out), {})["total"].mean())

    before = held_out_loss()
    result = LocalTrainer(config, model, ImageRows(prepared.store, split_indices(prepared.catalog, "train"))).train(SiteState())
    assert result.steps == 15 and set(result.epochs[0].losses) == {"masked_mse", "total"}
    assert (result.privacy is not None) == dp
    assert held_out_loss() < 0.95 * before
