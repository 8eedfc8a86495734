"""DP-SGD with Opacus, and each site's privacy budget across rounds.

Per-sample gradients: Opacus's `hooks` and `ghost` modes run without error on timm's
ConvNeXt but compute wrong per-sample gradients (LayerNorm2d hands a non-contiguous tensor to
the next Conv2d, and the unfold-based conv sampler mis-reads it). `functorch` computes them
with vmap and is exact; tests/test_privacy.py checks that against a torch.func reference and
shows that the hooks mode fails the same check.

Accounting: a site's privacy loss composes over every step it ever trained, across federated
rounds. The accountant's history is saved after each training call and restored before the
next, so epsilon after round 10 covers rounds 1-10. With `dp.target_epsilon`, the noise
multiplier is calibrated once for the whole planned run; a site whose next call would
exceed its budget refuses to train.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from common.config import DPConfig

log = logging.getLogger("dermfed.privacy")

GRAD_SAMPLE_MODE = "functorch"  # the only mode that is correct on timm ConvNeXt (see module docstring)
BUDGET_TOLERANCE = 1e-6


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


def check_budget(cfg: DPConfig, state: Optional[dict[str, Any]], noise_multiplier: float,
                 sample_rate: float, steps: int, site: str = "this site") -> None:
    """Refuse before training when `steps` more steps would push epsilon past the budget."""
    if cfg.target_epsilon is None:
        return
    spent = epsilon_of(cfg.accountant, state, cfg.delta)
    planned = {"history": [*(state or {}).get("history", []), (noise_multiplier, sample_rate, steps)],
               "mechanism": cfg.accountant}
    after = epsilon_of(cfg.accountant, planned, cfg.delta)
    if after > cfg.target_epsilon * (1 + 0.02) + BUDGET_TOLERANCE:
        raise PrivacyBudgetExhausted(
            f"{site}: privacy budget spent: epsilon={spent:.3f} of dp.target_epsilon={cfg.target_epsilon} "
            f"(delta={cfg.delta}) after {steps_of(state)} steps; {steps} more steps would reach "
            f"epsilon={after:.3f}. This site refuses to train further. Raise dp.target_epsilon only with "
            "the data owner's consent, or stop the run."
        )


def make_private(cfg: DPConfig, model: nn.Module, optimizer: Optimizer, loader: DataLoader,
                 noise_multiplier: float, accountant_state: Optional[dict[str, Any]]):
    """Wrap model, optimizer and loader for DP-SGD, continuing the site's accountant."""
    engine = PrivacyEngine(accountant=cfg.accountant, secure_mode=cfg.secure_mode)
    if accountant_state:
        engine.accountant.load_state_dict(accountant_state)
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        poisson_sampling=cfg.poisson_sampling,
        grad_sample_mode=GRAD_SAMPLE_MODE,
    )
    return private_model, private_optimizer, private_loader, engine


def per_sample_gradient_module(model: nn.Module, mode: str = GRAD_SAMPLE_MODE) -> nn.Module:
    """Wrap `model` as PrivacyEngine.make_private does, so tests check the very mode DP uses."""
    from opacus.grad_sample.utils import wrap_model

    return wrap_model(model, grad_sample_mode=mode, batch_first=True, loss_reduction="mean")
