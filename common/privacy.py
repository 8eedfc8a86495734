"""DP-SGD with Opacus, and each site's privacy budget across rounds.

Clipping: DermFed uses Opacus's ghost clipping (`GradSampleModuleFastGradientClipping`) with the
per-layer samplers of `common.dp_layers`, which make it exact on timm's ConvNeXt (Opacus's own
hooks and ghost modes are wrong or crash there; `dp_layers` says why). A step is one forward
pass, a backward pass that computes only each sample's gradient norm (no parameter gradients),
and a backward pass of the per-sample-clipped loss: about twice a plain step instead of six
times (functorch), and no per-sample gradient of a whole model is ever held in memory.
`tests/test_privacy.py` checks the norms and the clipped gradient against a torch.func
vmap-of-grad reference, and that the same check fails Opacus's stock samplers.

Randomness: the Gaussian noise and the Poisson sampling come from generators seeded with 64
bits from the operating system at every training call, never from the config, the site or
the step. Whoever knows the config (the coordinating server does) cannot replay them and
subtract the noise. Everything else (model init, augmentation, the latent samples) stays
seeded, so a DP run is reproducible in all but its privacy mechanism.

Accounting: a site's privacy loss composes over every step it ever trained, across federated
rounds. The accountant's history is saved after each training call and restored before the
next, so epsilon after round 10 covers rounds 1-10. With `dp.target_epsilon`, the noise
multiplier is calibrated once for the whole planned run; a site whose next call would end
above its budget, by any margin beyond floating-point rounding, refuses to train. A step
whose Poisson batch is empty still releases a noise-only update, as the accountant assumes.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass
from typing import Any, Optional

import torch
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn
from torch.optim import Optimizer

from common import dp_layers
from common.config import DPConfig

log = logging.getLogger("dermfed.privacy")

GRAD_SAMPLE_MODE = "ghost"  # exact on timm ConvNeXt with common.dp_layers (see the module docstring)
# A planned call may end above dp.target_epsilon by floating-point rounding only (relative).
BUDGET_RELATIVE_TOLERANCE = 1e-9


class PrivacyBudgetExhausted(RuntimeError):
    """The site has spent its (epsilon, delta) budget; training further would exceed it."""


@dataclass
class PrivacyStatus:
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    target_epsilon: Optional[float]


def sample_rate_of(dataset_size: int, batch_size: int) -> float:
    """The sampling rate Opacus accounts for: 1 / batches per epoch (DPDataLoader's definition).

    Poisson sampling then draws ceil(N / B) batches per epoch, each sample with this probability.
    """
    return 1.0 / max(1, math.ceil(dataset_size / batch_size))


def resolve_noise_multiplier(cfg: DPConfig, sample_rate: float, planned_steps: int) -> float:
    """The fixed sigma, or the sigma that spends `target_epsilon` over `planned_steps` steps."""
    if cfg.noise_multiplier is not None:
        return cfg.noise_multiplier
    assert cfg.target_epsilon is not None
    return float(get_noise_multiplier(target_epsilon=cfg.target_epsilon, target_delta=cfg.delta,
                                      sample_rate=sample_rate, steps=planned_steps, accountant=cfg.accountant))


def restored_accountant(kind: str, state: Optional[dict[str, Any]]):
    accountant = create_accountant(mechanism=kind)
    if state:
        accountant.load_state_dict(state)
    return accountant


def epsilon_of(kind: str, state: Optional[dict[str, Any]], delta: float) -> float:
    accountant = restored_accountant(kind, state)
    return float(accountant.get_epsilon(delta)) if accountant.history else 0.0


def steps_of(state: Optional[dict[str, Any]]) -> int:
    return int(sum(entry[2] for entry in (state or {}).get("history", [])))


def _with_planned_steps(state: Optional[dict[str, Any]], noise_multiplier: float, sample_rate: float,
                        steps: int, kind: str) -> dict[str, Any]:
    """The accountant state after `steps` more steps, merged as Opacus merges consecutive equal steps."""
    history = [tuple(entry) for entry in (state or {}).get("history", [])]
    if history and history[-1][0] == noise_multiplier and history[-1][1] == sample_rate:
        history[-1] = (noise_multiplier, sample_rate, history[-1][2] + steps)
    else:
        history.append((noise_multiplier, sample_rate, steps))
    return {"history": history, "mechanism": kind}


def check_budget(cfg: DPConfig, state: Optional[dict[str, Any]], noise_multiplier: float,
                 sample_rate: float, steps: int, site: str = "this site") -> None:
    """Refuse before training when `steps` more steps would end above the budget, by any margin."""
    if cfg.target_epsilon is None:
        return
    spent = epsilon_of(cfg.accountant, state, cfg.delta)
    after = epsilon_of(cfg.accountant, _with_planned_steps(state, noise_multiplier, sample_rate, steps, cfg.accountant),
                       cfg.delta)
    if after > cfg.target_epsilon * (1 + BUDGET_RELATIVE_TOLERANCE):
        raise PrivacyBudgetExhausted(
            f"{site}: privacy budget spent: epsilon={spent:.3f} of dp.target_epsilon={cfg.target_epsilon} "
            f"(delta={cfg.delta}) after {steps_of(state)} steps; {steps} more steps would reach "
            f"epsilon={after:.4f}. This site refuses to train further. Raise dp.target_epsilon only with "
            "the data owner's consent, or stop the run."
        )


def os_seeded_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with 64 bits from the operating system: no config, site or step can replay it."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(64))
    return generator


@dataclass
class PrivateTraining:
    """One training call's DP-SGD: the hooked model, the noising optimizer, the Poisson sampler's generator,
    the accountant."""

    module: GradSampleModuleFastGradientClipping
    optimizer: DPOptimizerFastGradientClipping
    sampling: torch.Generator  # Poisson sampling (common.data.batches.poisson_batches), seeded by the OS
    accountant: Any
    layout: dp_layers.Relayout

    def backward(self, loss_per_sample: torch.Tensor, inputs: torch.Tensor) -> None:
        """Ghost clipping: per-sample norms from a backward to the inputs only, then the clipped loss's backward.

        `inputs` must require grad: the first pass asks autograd for the gradient of the inputs,
        so that every layer's hook sees its output gradient while no parameter gradient is computed.
        """
        torch.autograd.grad(loss_per_sample.mean(), [inputs], retain_graph=True)
        coefficients = self.module.get_clipping_coef()
        self.module.disable_hooks()
        try:
            (coefficients.to(loss_per_sample.device) * loss_per_sample).sum().backward()
        finally:
            self.module.enable_hooks()

    def noise_only_step(self) -> None:
        """The DP-SGD step of an empty Poisson batch: no gradient, but the Gaussian noise is released.

        The accountant counts every step, empty or not; skipping the update would release less
        than it accounts, and a different mechanism (the absence of noise tells that the batch
        was empty). A zero clipped gradient makes Opacus add exactly the noise.
        """
        self.optimizer.zero_grad(set_to_none=True)
        for param in self.optimizer.params:
            param.grad = torch.zeros_like(param)
        self.optimizer.step()

    def close(self) -> nn.Module:
        """Remove Opacus's hooks and DermFed's layout change: the plain model, as it was."""
        model = self.module.to_standard_module()
        self.layout.undo()
        return model


def make_private(cfg: DPConfig, model: nn.Module, optimizer: Optimizer, dataset_size: int, batch_size: int,
                 noise_multiplier: float, accountant_state: Optional[dict[str, Any]],
                 device: torch.device | str = "cpu") -> PrivateTraining:
    """Wrap model and optimizer for DP-SGD over `dataset_size` images, continuing the site's accountant.

    Poisson sampling and noise draw from fresh OS-seeded generators (see the module docstring).
    The optimizer must be built on `model` before this call (it keeps the standard parameter order).
    """
    accountant = create_accountant(mechanism=cfg.accountant)
    if accountant_state:
        accountant.load_state_dict(accountant_state)
    sample_rate = sample_rate_of(dataset_size, batch_size)
    layout = dp_layers.Relayout(model)
    module = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                  max_grad_norm=cfg.max_grad_norm, use_ghost_clipping=True)
    module.forbid_grad_accumulation()
    private_optimizer = DPOptimizerFastGradientClipping(
        optimizer, noise_multiplier=noise_multiplier, max_grad_norm=cfg.max_grad_norm,
        expected_batch_size=int(dataset_size * sample_rate), loss_reduction="mean",
        generator=os_seeded_generator(device))
    private_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return PrivateTraining(module, private_optimizer, os_seeded_generator("cpu"), accountant, layout)


def per_sample_gradient_module(model: nn.Module, mode: str = "hooks") -> nn.Module:
    """Wrap `model` for per-sample gradients in one of Opacus's modes (tests compare modes with a reference)."""
    from opacus.grad_sample.utils import wrap_model

    return wrap_model(model, grad_sample_mode=mode, batch_first=True, loss_reduction="mean")
