"""DP-SGD: exact per-sample gradients on real timm ConvNeXt, composable accounting, budgets."""

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

from common.config import load_config
from common.objectives.vae import ConvNeXtVAE, vae_loss_per_sample
from common.privacy import PrivacyBudgetExhausted, make_private
from common.training import LocalTrainer, SiteState
from tests.conftest import random_image_rows


def _reference(model, images):
    """Per-sample gradients from torch.func (vmap of grad): the judge."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss_of_one(p, image):
        out = functional_call(model, (p, buffers), (image[None],))
        return vae_loss_per_sample(image[None], out, beta=1.0)["total"].mean()

    reference = vmap(grad(loss_of_one), in_dims=(None, 0))(params, images)
    return torch.cat([reference[k].flatten(1) for k, _ in model.named_parameters()], dim=1)


def _model(encoder, size=32):
    torch.manual_seed(0)
    model = ConvNeXtVAE(encoder, latent_dim=8, image_size=size, decoder_width=4).double()
    model.sample_latent = False  # z = mu: the forward pass is a deterministic function of the input
    return model


@pytest.mark.parametrize("encoder", ["convnext_atto", "convnext_tiny"])
@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e6])  # every sample clipped / none clipped
def test_the_dp_step_clips_exactly_the_reference_per_sample_gradients(encoder, max_grad_norm):
    """The mode DP uses (ghost clipping with DermFed's samplers), through make_private itself, in float64:
    each sample's gradient norm and the clipped gradient sum equal torch.func's."""
    model, batch = _model(encoder), 4
    images = torch.rand(batch, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    per_sample = _reference(model, images)
    norms = per_sample.norm(dim=1)
    clipped = (per_sample * (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)[:, None]).sum(dim=0)
    config = load_config("smoke", ["dp.enabled=true", "dp.noise_multiplier=1.0", f"dp.max_grad_norm={max_grad_norm}"])
    private = make_private(config.dp, model, torch.optim.SGD(model.parameters(), lr=0.0), batch, batch, 1.0, None)
    inputs = images.clone().requires_grad_(True)
    private.backward(vae_loss_per_sample(images, private.module(inputs), beta=1.0)["total"], inputs)
    assert float(((private.module.per_sample_gradient_norms - norms).abs() / norms).max()) < 1e-9
    private.close()
    assert list(model.state_dict()) == list(_model(encoder).state_dict())  # the layout change is undone
    summed = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float((summed - clipped).norm() / clipped.norm()) < 1e-9


def test_the_same_check_catches_opacus_stock_samplers_on_convnext(monkeypatch):
    """Opacus's own conv sampler mis-reads LayerNorm2d's non-contiguous output: the check can fail."""
    from opacus.grad_sample import GradSampleModule
    from opacus.grad_sample.conv import compute_conv_grad_sample
    from opacus.grad_sample.utils import wrap_model

    def per_sample_errors():
        model = _model("convnext_atto")
        images = torch.rand(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        reference = _reference(model, images)
        wrapped = wrap_model(model, grad_sample_mode="hooks", batch_first=True, loss_reduction="mean")
        vae_loss_per_sample(images, wrapped(images), beta=1.0)["total"].mean().backward()
        opacus = torch.cat([p.grad_sample.flatten(1) for p in model.parameters()], dim=1)
        return float(((opacus - reference).norm(dim=1) / reference.norm(dim=1)).max())

    assert per_sample_errors() < 1e-9  # hooks mode with DermFed's samplers is exact too
    monkeypatch.setitem(GradSampleModule.GRAD_SAMPLERS, torch.nn.Conv2d, compute_conv_grad_sample)
    assert per_sample_errors() > 1e-2


def _Images(n=40, size=32, seed=1):
    return random_image_rows(n, size, seed)


def _trainer(steps, *overrides):
    config = load_config("smoke", [f"train.max_steps={steps}", "train.epochs=10", "dp.enabled=true", *overrides])
    model = ConvNeXtVAE("convnext_atto", latent_dim=4, image_size=32, decoder_width=4)
    return LocalTrainer(config, model, _Images(), site="hospital_a")


def test_epsilon_after_two_calls_of_k_steps_equals_one_call_of_2k_steps():
    split = _trainer(3, "dp.noise_multiplier=1.1")
    state = split.train(SiteState()).state
    first_epsilon = split.privacy_status(state).epsilon
    result = split.train(state)
    assert result.privacy.steps == 6
    joined = _trainer(6, "dp.noise_multiplier=1.1").train(SiteState())
    assert joined.privacy.steps == 6
    assert math.isclose(result.privacy.epsilon, joined.privacy.epsilon, rel_tol=1e-9)
    assert result.privacy.epsilon > first_epsilon > 0


def test_target_epsilon_is_spent_over_the_planned_steps_and_then_refused():
    trainer = _trainer(2, "dp.target_epsilon=3.0", "dp.planned_steps=4")
    state = trainer.train(SiteState()).state
    state = trainer.train(state).state
    spent = trainer.privacy_status(state)
    assert spent.steps == 4
    assert spent.epsilon == pytest.approx(3.0, rel=0.02)
    weights_before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(PrivacyBudgetExhausted, match="refuses to train further"):
        trainer.train(state)
    assert all(torch.equal(a, b) for a, b in zip(weights_before, trainer.model.parameters()))


def test_dp_training_leaves_a_plain_model_and_a_clean_state_dict():
    trainer = _trainer(2, "dp.noise_multiplier=1.0")
    trainer.train(SiteState())
    keys = list(trainer.model.state_dict())
    assert not any(k.startswith("_module.") for k in keys)
    assert not hasattr(trainer.model, "_module")
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in trainer.model.parameters())


def test_planned_sample_rate_is_the_one_opacus_accounts():
    """9 images (public size bucket 16), batches of 8: Opacus samples with q = 1/2 (two batches per epoch), not 8/9."""
    config = load_config("smoke", ["train.max_steps=2", "train.epochs=1", "dp.enabled=true", "dp.target_epsilon=3"])
    model = ConvNeXtVAE("convnext_atto", latent_dim=4, image_size=32, decoder_width=4)
    trainer = LocalTrainer(config, model, _Images(n=9), site="small")
    state = trainer.train(SiteState()).state
    noise, rate, steps = state.accountant["history"][-1]
    assert rate == pytest.approx(trainer.sample_rate) == pytest.approx(0.5)
    assert steps == trainer.steps_per_call() == 2
    assert trainer.privacy_status(state).epsilon == pytest.approx(3.0, rel=0.02)  # the planned budget, exactly spent


@pytest.mark.parametrize("tokens", [3, 40])  # few tokens: Gram matrices; many: the per-sample gradient itself
def test_linear_and_conv_norm_samplers_take_either_branch_exactly(tokens):
    from common.dp_layers import conv2d_norm_sample, linear_norm_sample

    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 8)  # 2 x tokens positions: 6 (36 <= 6 x 8: Gram) or 80 (6400 > 48: per-sample)
    a, g = torch.randn(5, 2, tokens, 6, dtype=torch.float64), torch.randn(5, 2, tokens, 8, dtype=torch.float64)
    norms = linear_norm_sample(linear.double(), [a], g)
    weight = torch.einsum("n...i,n...j->nij", g, a).flatten(1).norm(dim=1)
    assert torch.allclose(norms[linear.weight], weight) and torch.allclose(norms[linear.bias], g.sum(dim=(1, 2)).norm(dim=1))
    conv = torch.nn.Conv2d(3, 16, 3, padding=1).double()  # 9 positions (81 <= 27 x 16: Gram) or 1600
    x = torch.randn(5, 3, tokens, tokens, dtype=torch.float64, requires_grad=True)
    out = conv(x)
    backprops = torch.randn_like(out)
    per_sample = torch.stack([torch.autograd.grad((conv(x[i:i + 1]) * backprops[i:i + 1]).sum(), conv.weight)[0]
                              for i in range(5)])
    norms = conv2d_norm_sample(conv, [x.detach()], backprops)
    assert torch.allclose(norms[conv.weight], per_sample.flatten(1).norm(dim=1))


def test_group_privacy_bounds_hold_where_the_truth_is_known_and_reach_the_report():
    """A lesion of k images: without subsampling (q = 1) a group of k is exactly a Gaussian mechanism with
    sensitivity k C, so the bound must equal its epsilon (a bound below it would be false); with subsampling it
    exceeds the per-image epsilon and grows with k. The report shows the textbook conversion for k = 2 and the
    data set's maximum."""
    from common.privacy import classical_group_privacy, epsilon_of, group_epsilon
    from server.evaluation.report import privacy_table

    for sigma in (2.0, 8.0):
        for k in (2, 3, 6):
            exact = epsilon_of("rdp", {"history": [(sigma / k, 1.0, 10)]}, 1e-5)
            assert group_epsilon({"history": [(sigma, 1.0, 10)]}, 1e-5, k) == pytest.approx(exact, rel=1e-9)
    state = {"history": [(1.067, 1 / 32, 1600)]}
    per_image = epsilon_of("rdp", state, 1e-5)
    assert group_epsilon(state, 1e-5, 1) == per_image
    assert per_image < group_epsilon(state, 1e-5, 2) < group_epsilon(state, 1e-5, 6)
    assert classical_group_privacy(2.0, 1e-5, 3) == (6.0, pytest.approx(3 * math.exp(4.0) * 1e-5))
    history = [{"round": 1, "sites": [{"site": "hospital_1", "epsilon": 0.5, "delta": 1e-5},
                                      {"site": "hospital_2", "epsilon": 8.0, "delta": 1e-5}]}]
    table = privacy_table(history, 6)
    assert "lesion of 2 images" in table and "lesion of 6 images" in table
    assert "1 at delta 3.3e-05" in table  # hospital_1, k = 2: (1.0, 2 e^0.5 1e-5)
    assert "none (delta" in table  # hospital_2, k = 6: delta far above 1
