"""DP-SGD with Opacus, and each site's privacy budget across rounds.

Clipping: DermFed uses Opacus's ghost clipping (`GradSampleModuleFastGradientClipping`) with the
per-layer samplers of `common.dp_layers`, which make it exact on timm's ConvNeXt (Opacus's own
hooks and ghost modes are wrong or crash there; `dp_layers` says why). A step is one forward
pass, a backward pass that computes only each sample's gradient norm (no parameter gradients),
and a backward pass of the per-sample-clipped loss: about twice a plain step instead of six
times (functorch), and no per-sample gradient of a whole model is ever held in memory.
`tests/test_privacy.py` checks the norms and the clipped gradient against a torch.func
vmap-of-grad reference, and that the same check fails Opacus's stock samplers.

Randomness: under DP every random draw of the mechanism (the Gaussian noise, the Poisson
sampling, each image's augmentation parameters and latent sample, and any objective's masks)
comes from state drawn from the operating system's entropy, never from the config, the site or
the step, so whoever knows the config (the coordinating server does) can neither replay the
noise nor search its seed. The noise and the Poisson sampling use `secret_generator`, a torch
generator whose whole state is OS entropy (the Mersenne Twister's 19,937 bits on the CPU; a
64-bit Philox key and a 62-bit offset on CUDA). Per-image draws (`ImageDraws`) come from a fresh
128-bit key per step and the image's row, so one image added or removed changes nothing but its
own clipped contribution: the sensitivity the accountant assumes (Poisson inclusion is drawn
for every image in row order, so it has the same property). Without DP everything stays seeded
and reproducible.

Accounting: a site's privacy loss composes over every step it ever trained, across federated
rounds. What the accountant sees is public: the sampling rate and the steps come from a public
data-set size (the hospital's declared count, else N rounded up to a power of two: `public_size`),
never from the exact private N; Poisson inclusion is exactly the accounted rate (float64
uniforms against a rate on the 2^-53 grid: `poisson_rate`). The site reserves a call's steps in
its ledger before the first noisy step (`client.site`), so epsilon after round 10 covers rounds
1-10, failed ones included. With `dp.target_epsilon`, the noise
multiplier is calibrated once for the whole planned run; a site whose next call would end
above its budget, by any margin beyond floating-point rounding, refuses to train. A step
whose Poisson batch is empty still releases a noise-only update, as the accountant assumes.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer

from common.config import DPConfig

if TYPE_CHECKING:
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping

    from common import dp_layers

# Opacus is imported where it is used, not here: importing any of it loads all of it (its package imports its
# privacy engine, which imports torch.distributed.tensor), 40% of a site process's start-up, and a run without DP
# (the default) never needs it.

log = logging.getLogger("dermfed.privacy")

# A planned call may end above dp.target_epsilon by floating-point rounding only (relative).
BUDGET_RELATIVE_TOLERANCE = 1e-9


class PrivacyBudgetExhausted(RuntimeError):
    """The site has spent its (epsilon, delta) budget; training further would exceed it."""


class AccountantError(RuntimeError):
    """The privacy accounting could not be computed, or did not match the steps reserved for a call."""


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

    Under DP, `dataset_size` is the public size (`public_size`), never the exact private count.
    """
    return 1.0 / max(1, math.ceil(dataset_size / batch_size))


def public_size(private_size: int, declared: Optional[int] = None) -> int:
    """The data-set size DP-SGD's sampling rate, steps and batch scale are computed from.

    The hospital's declared count when it declared one (public by its decision), else the private
    count rounded up to a power of two: epsilon then reveals the bucket (N within a factor of 2),
    never N itself.
    """
    if declared is not None:
        return int(declared)
    return 1 << max(0, int(private_size) - 1).bit_length()


def poisson_rate(rate: float) -> float:
    """The rate Poisson sampling draws exactly: `rate` rounded up to the 2^-53 grid of float64 uniforms.

    A float64 uniform from torch is k / 2^53 with k uniform on [0, 2^53), so `u < poisson_rate(q)`
    holds with probability exactly poisson_rate(q): the rate that is sampled is the rate accounted.
    """
    return math.ceil(rate * 2.0 ** 53) / 2.0 ** 53


def resolve_noise_multiplier(cfg: DPConfig, sample_rate: float, planned_steps: int) -> float:
    """The fixed sigma, or the sigma that spends `target_epsilon` over `planned_steps` steps."""
    if cfg.noise_multiplier is not None:
        return cfg.noise_multiplier
    assert cfg.target_epsilon is not None
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=cfg.target_epsilon, target_delta=cfg.delta,
                                          sample_rate=sample_rate, steps=planned_steps, accountant=cfg.accountant))
    except Exception as exc:  # noqa: BLE001 - Opacus raises ValueError for budgets it cannot reach
        raise AccountantError(f"no noise multiplier spends dp.target_epsilon={cfg.target_epsilon} at delta={cfg.delta} "
                              f"over {planned_steps} steps at sampling rate {sample_rate}: {exc}") from exc


def restored_accountant(kind: str, state: Optional[dict[str, Any]]):
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism=kind)
    if state:
        accountant.load_state_dict(state)
    return accountant


def epsilon_of(kind: str, state: Optional[dict[str, Any]], delta: float) -> float:
    history = (state or {}).get("history", [])
    if not history:
        return 0.0
    if any(float(entry[0]) == 0.0 and int(entry[2]) > 0 for entry in history):
        return math.inf  # a step without noise: no finite epsilon
    try:
        return float(restored_accountant(kind, {"history": [tuple(entry) for entry in history],
                                                "mechanism": kind}).get_epsilon(delta))
    except Exception as exc:  # noqa: BLE001 - a corrupt history or an accountant failure: say what it is
        raise AccountantError(f"the {kind} accountant could not compute epsilon at delta={delta}: {exc}") from exc


def history_of(state: Optional[dict[str, Any]]) -> list[tuple[float, float, int]]:
    """The accountant's history as comparable tuples (JSON turns them into lists)."""
    return [(float(a), float(b), int(c)) for a, b, c in (state or {}).get("history", [])]


def steps_of(state: Optional[dict[str, Any]]) -> int:
    return int(sum(entry[2] for entry in (state or {}).get("history", [])))


def with_planned_steps(state: Optional[dict[str, Any]], noise_multiplier: float, sample_rate: float,
                        steps: int, kind: str) -> dict[str, Any]:
    """The accountant state after `steps` more steps, merged as Opacus merges consecutive equal steps."""
    history = [tuple(entry) for entry in (state or {}).get("history", [])]
    if history and history[-1][0] == noise_multiplier and history[-1][1] == sample_rate:
        history[-1] = (noise_multiplier, sample_rate, history[-1][2] + steps)
    else:
        history.append((noise_multiplier, sample_rate, steps))
    return {"history": history, "mechanism": kind}


def group_epsilon(state: Optional[dict[str, Any]], delta: float, group_size: int) -> float:
    """Epsilon at `delta` for a group of `group_size` images (e.g. one lesion's), from the accountant's history.

    The smaller of two RDP bounds, each valid on its own, always with the RDP accountant (an
    upper bound whichever accountant the run used):
    - a mixture bound: per step a group of k images enters the Poisson batch with probability
      1 - (1 - q)^k and moves the clipped sum by at most k*C; the step's output is a mixture, over
      which members were drawn, of two-point Gaussian mixtures with shifts of norm at most k*C,
      and the Renyi divergence's integral form is jointly convex, so each step is no more
      revealing than a Poisson-subsampled Gaussian with rate 1 - (1 - q)^k and noise multiplier
      sigma / k; RDP composes over steps;
    - Mironov's group property of RDP (2017, Prop. 2): (alpha, eps)-RDP gives (alpha / 2^c,
      3^c eps)-RDP for groups of 2^c >= k, for alpha / 2^c >= 2.
    Both are far looser than the per-image figure: what DP promises a lesion of several images is
    much weaker than what it promises one image. (k*eps, k*exp((k-1)*eps)*delta) is
    `classical_group_privacy`.
    """
    k = int(group_size)
    if k < 1:
        raise ValueError(f"group size {group_size} must be at least 1")
    entries = history_of(state)
    if not entries:
        return 0.0
    if k == 1:
        return epsilon_of("rdp", state, delta)
    if any(sigma == 0.0 for sigma, _, _ in entries):
        return math.inf
    mixture = epsilon_of("rdp", {"history": [(sigma / k, 1.0 - (1.0 - q) ** k, steps) for sigma, q, steps in entries],
                                 "mechanism": "rdp"}, delta)
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    doublings = math.ceil(math.log2(k))
    orders = [2.0 + x / 4.0 for x in range(41)] + [float(x) for x in range(13, 64)]
    rdp = np.zeros(len(orders))
    for sigma, q, steps in entries:
        rdp += np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=steps,
                                      orders=[order * 2 ** doublings for order in orders]), dtype=float)
    grouped, _ = get_privacy_spent(orders=orders, rdp=3 ** doublings * rdp, delta=delta)
    return float(min(mixture, grouped))


def classical_group_privacy(epsilon: float, delta: float, group_size: int) -> tuple[float, float]:
    """(epsilon, delta)-DP for one image gives (k*epsilon, k*exp((k-1)*epsilon)*delta) for a group of k."""
    k = int(group_size)
    try:
        group_delta = k * math.exp((k - 1) * epsilon) * delta
    except OverflowError:
        group_delta = math.inf
    return k * epsilon, group_delta


def check_budget(cfg: DPConfig, state: Optional[dict[str, Any]], noise_multiplier: float,
                 sample_rate: float, steps: int, site: str = "this site") -> None:
    """Refuse before training when `steps` more steps would end above the budget, by any margin."""
    if cfg.target_epsilon is None:
        return
    spent = epsilon_of(cfg.accountant, state, cfg.delta)
    after = epsilon_of(cfg.accountant, with_planned_steps(state, noise_multiplier, sample_rate, steps, cfg.accountant),
                       cfg.delta)
    if after > cfg.target_epsilon * (1 + BUDGET_RELATIVE_TOLERANCE):
        raise PrivacyBudgetExhausted(
            f"{site}: privacy budget spent: epsilon={spent:.3f} of dp.target_epsilon={cfg.target_epsilon} "
            f"(delta={cfg.delta}) after {steps_of(state)} steps; {steps} more steps would reach "
            f"epsilon={after:.4f}. This site refuses to train further. Raise dp.target_epsilon only with "
            "the data owner's consent, or stop the run."
        )


def entropy(size: int) -> bytes:
    """Bytes from the operating system's CSPRNG: every secret generator's state comes from here (tests stub it)."""
    return os.urandom(size)


# torch's CPU generator state (aten/src/ATen/CPUGeneratorImpl.cpp, CPUGeneratorImplState): the initial
# seed (u64), left (i32), seeded (i32), next (u64), the Mersenne Twister's 624 words (each in a u64),
# the legacy cached normal (3 doubles, i32 valid, padding), the cached float normal (f32, bool, padding).
_MT_WORDS = 624
_CPU_STATE_BYTES = 5056
_MT_OFFSET, _NORMAL_OFFSET, _FLOAT_NORMAL_OFFSET = 24, 24 + 8 * _MT_WORDS, 5048


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator whose whole state comes from the operating system's entropy.

    CPU: the Mersenne Twister's 19,937-bit state is filled with OS bytes (a `manual_seed` would
    keep only 32 bits: two seeds that differ in their high bits give the same stream). CUDA:
    Philox's 64-bit seed and a 62-bit offset (a multiple of 4, as torch requires). Nothing of the
    config, the site or the step enters it, and its state is never released.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device)
    if device.type == "cuda":
        seed, offset = struct.unpack("<QQ", entropy(16))
        generator.set_state(torch.frombuffer(bytearray(struct.pack("<QQ", seed, offset & ~3)), dtype=torch.uint8))
        return generator
    if device.type != "cpu":
        raise ValueError(f"no secret generator for device type {device.type!r}")
    state = bytearray(generator.get_state().numpy().tobytes())
    if len(state) != _CPU_STATE_BYTES:
        raise RuntimeError(f"torch's CPU generator state has {len(state)} bytes, not {_CPU_STATE_BYTES}: its layout "
                           "changed; DermFed refuses to guess how to fill it")
    words = list(struct.unpack(f"<{_MT_WORDS}I", entropy(4 * _MT_WORDS)))
    words[0] |= 0x80000000  # only the top bit of word 0 enters the recurrence: never the all-zero state
    struct.pack_into("<QiiQ", state, 0, int.from_bytes(entropy(8), "little"), 1, 1, 0)  # left=1: twist first
    struct.pack_into(f"<{_MT_WORDS}Q", state, _MT_OFFSET, *words)
    struct.pack_into("<dddi", state, _NORMAL_OFFSET, 0.0, 0.0, 0.0, 0)  # no cached normal sample
    struct.pack_into("<f?", state, _FLOAT_NORMAL_OFFSET, 0.0, False)
    generator.set_state(torch.frombuffer(state, dtype=torch.uint8).clone())
    if generator.get_state().numpy().tobytes()[_MT_OFFSET:_NORMAL_OFFSET] != bytes(state[_MT_OFFSET:_NORMAL_OFFSET]):
        raise RuntimeError("torch did not take the secret generator state as written; refusing to train with DP")
    return generator


# What an image's randomness is: ("uniform", width) or ("normal", width) values per image and step.
RandomStreams = Mapping[str, tuple[str, int]]


class ImageDraws:
    """Under DP, each image's random draws (augmentation, latent sample, masks) at each step.

    Every stream gets a fresh 128-bit key from the operating system's entropy at every step, and
    image i (its row in the site's data set) draws its values from its own counter-based stream
    under that key: Philox4x64 (Random123, numpy's `Philox`) at counter i * 2^128. An image's
    draws depend on the key and its row only, never on the seed, the step, the batch or how many
    images the site holds, so one image added or removed changes nothing but its own clipped
    contribution. The cost is per batch row, not per image of the data set. Objectives declare
    their streams (`random_streams()`); a new one (e.g. a mask's uniforms) is one more entry.
    """

    def __init__(self, rows: int, streams: RandomStreams):
        for name, (kind, width) in streams.items():
            if kind not in ("uniform", "normal") or width < 1:
                raise ValueError(f"random stream {name!r}: {kind!r} x {width} is not ('uniform' | 'normal', width >= 1)")
        self.rows, self.streams = rows, dict(streams)

    def for_batch(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        """This step's draws for the rows at `positions`, float32, one row per image (keys drawn even for an empty batch)."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) and (positions.min() < 0 or positions.max() >= self.rows):
            raise IndexError(f"row positions outside 0..{self.rows - 1}")
        draws = {}
        for name, (kind, width) in self.streams.items():
            key = int.from_bytes(entropy(16), "little")
            values = np.empty((len(positions), width), dtype=np.float32)
            for i, row in enumerate(positions):
                stream = np.random.Generator(np.random.Philox(key=key, counter=int(row) << 128))
                values[i] = stream.random(width, dtype=np.float32) if kind == "uniform" else \
                    stream.standard_normal(width, dtype=np.float32)
            draws[name] = torch.from_numpy(values)
        return draws


@dataclass
class PrivateTraining:
    """One training call's DP-SGD: the hooked model, the noising optimizer, the Poisson sampler's generator,
    the accountant."""

    module: GradSampleModuleFastGradientClipping
    optimizer: DPOptimizerFastGradientClipping
    sampling: torch.Generator  # Poisson sampling (common.data.batches.poisson_batches): a secret generator
    accountant: Any
    layout: dp_layers.Relayout
    sample_rate: float  # exactly the rate Poisson sampling draws and the accountant counts

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
    """Wrap model and optimizer for DP-SGD, continuing the site's accountant.

    `dataset_size` is the public size (`public_size`): the sampling rate and the scale of the
    released update (Opacus divides the noisy sum by the expected batch size) depend on it alone.
    Poisson sampling and noise draw from secret generators (see the module docstring). The
    optimizer must be built on `model` before this call (it keeps the standard parameter order).
    """
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping

    from common import dp_layers

    accountant = restored_accountant(cfg.accountant, accountant_state)
    sample_rate = poisson_rate(sample_rate_of(dataset_size, batch_size))
    layout = dp_layers.Relayout(model)
    module = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                  max_grad_norm=cfg.max_grad_norm, use_ghost_clipping=True)
    module.forbid_grad_accumulation()
    private_optimizer = DPOptimizerFastGradientClipping(
        optimizer, noise_multiplier=noise_multiplier, max_grad_norm=cfg.max_grad_norm,
        expected_batch_size=max(1, round(dataset_size * sample_rate)), loss_reduction="mean",
        generator=secret_generator(device))
    private_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return PrivateTraining(module, private_optimizer, secret_generator("cpu"), accountant, layout, sample_rate)
