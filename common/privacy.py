"""DP-SGD with Opacus, and each site's privacy budget across rounds.

Per-sample gradients: Opacus's `hooks` and `ghost` modes run without error on timm's
ConvNeXt but compute wrong per-sample gradients (LayerNorm2d hands a non-contiguous tensor to
the next Conv2d, and the unfold-based conv sampler mis-reads it). `functorch` computes them
with vmap and is exact; tests/test_privacy.py checks that against a torch.func reference and
shows that the hooks mode fails the same check.

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
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from common.config import DPConfig

log = logging.getLogger("dermfed.privacy")

GRAD_SAMPLE_MODE = "functorch"  # the only mode that is correct on timm ConvNeXt (see module docstring)
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


def make_private(cfg: DPConfig, model: nn.Module, optimizer: Optimizer, loader: DataLoader,
                 noise_multiplier: float, accountant_state: Optional[dict[str, Any]],
                 device: torch.device | str = "cpu"):
    """Wrap model, optimizer and loader for DP-SGD, continuing the site's accountant.

    Poisson sampling and noise draw from fresh OS-seeded generators (see the module docstring).
    """
    with warnings.catch_warnings():  # Opacus warns that its own secure RNG is off; ours is OS-seeded
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=cfg.accountant)
    if accountant_state:
        engine.accountant.load_state_dict(accountant_state)
    poisson_loader = DPDataLoader.from_data_loader(loader, generator=os_seeded_generator("cpu"))
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=poisson_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        poisson_sampling=False,  # the loader above already samples; Opacus would reseed it from torch's global RNG
        noise_generator=os_seeded_generator(device),
        grad_sample_mode=GRAD_SAMPLE_MODE,
    )
    private_model.forbid_grad_accumulation()  # what make_private does itself with poisson_sampling=True
    return private_model, private_optimizer, private_loader, engine


def noise_only_step(optimizer: Optimizer, params: Iterable[nn.Parameter]) -> None:
    """The DP-SGD step of an empty Poisson batch: no gradient, but the Gaussian noise is released.

    The accountant counts every step, empty or not; skipping the update would release less
    than it accounts, but also a different mechanism (the absence of noise tells that the batch
    was empty). Per-sample gradients of zero samples make Opacus add exactly the noise.
    """
    optimizer.zero_grad(set_to_none=True)  # clears the previous step's per-sample and summed gradients
    for param in params:
        if param.requires_grad:
            param.grad_sample = torch.zeros((0, *param.shape), device=param.device, dtype=param.dtype)
    optimizer.step()


def per_sample_gradient_module(model: nn.Module, mode: str = GRAD_SAMPLE_MODE) -> nn.Module:
    """Wrap `model` as PrivacyEngine.make_private does, so tests check the very mode DP uses."""
    from opacus.grad_sample.utils import wrap_model

    return wrap_model(model, grad_sample_mode=mode, batch_first=True, loss_reduction="mean")
