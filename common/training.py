"""The local pretraining engine every hospital runs (and the pooled / local-only arms).

One call of `LocalTrainer.train` trains the objective's model (`common.objectives`) on one site's images for `train.epochs`
epochs (or `train.max_steps` steps) and returns per-epoch metrics. What must survive between
calls, across federated rounds, lives in `SiteState`: the global step (which drives the
learning-rate schedule, the objective's schedule such as the VAE's KL warm-up, and the random seed), the optimizer state, the float16
loss scaler, and the DP accountant's history. A resumed site therefore continues exactly where
it stopped.

Devices: float32 on the CPU; on CUDA, bfloat16 autocast where the GPU has it (no loss scaler
needed), else float16 with a GradScaler that starts at a scale suited to a loss summed over
pixels and keeps its scale across rounds in `SiteState`, so a short federated round never
spends its few steps halving an overflowing scale. Steps the scaler skipped are counted in the
epoch metrics and logged. Batches come from `common.data.batches` (uint8 to the device,
augmented there); metrics are summed on the device and read once per epoch.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from common.augment import PER_IMAGE_UNIFORMS, build_augmentation
from common.config import DermFedConfig
from common.data.batches import BatchLoader, ImageRows, plain_batches_per_epoch, poisson_batches, shuffled_batches
from common.objectives import Objective
from common.objectives.base import at_least_float32
from common.privacy import (
    AccountantError,
    ImageDraws,
    PrivacyStatus,
    PrivateTraining,
    check_budget,
    epsilon_of,
    history_of,
    make_private,
    poisson_rate,
    public_size,
    resolve_noise_multiplier,
    sample_rate_of,
    steps_of,
    with_planned_steps,
)
from common.strategies import ClientHook

log = logging.getLogger("dermfed.training")


@dataclass
class SiteState:
    """What a site keeps between training calls (federated rounds)."""

    step: int = 0
    optimizer: Optional[dict[str, Any]] = None
    accountant: Optional[dict[str, Any]] = None
    noise_multiplier: Optional[float] = None
    scaler: Optional[dict[str, Any]] = None  # float16 GradScaler state (CUDA without bfloat16 only)
    residual: Optional[dict[str, torch.Tensor]] = None  # compressed updates: what earlier rounds did not send


@dataclass
class DPPlan:
    """One training call's DP-SGD, known before its first step and computed from public values only."""

    noise_multiplier: float
    sample_rate: float  # exactly the rate Poisson sampling draws
    steps: int
    accountant_after: dict[str, Any]  # the site's accountant once these steps are taken


@dataclass
class EpochMetrics:
    """One epoch's numbers; the loss names are the objective's (`Objective.terms`, e.g. the VAE's reconstruction,
    kl, total), per image, plus its derived metrics and its schedule values (e.g. beta)."""

    epoch: int
    steps: int
    images: int
    losses: dict[str, float]  # the objective's terms per image, then its derived metrics
    schedule: dict[str, float]  # the objective's step-dependent weights at the epoch's last step
    seconds: float
    images_per_second: float
    lr: float
    epsilon: Optional[float] = None
    delta: Optional[float] = None
    skipped_steps: int = 0  # float16 steps the loss scaler skipped (overflow): no update was made

    @property
    def total(self) -> float:
        return self.losses["total"]

    def as_dict(self) -> dict[str, Any]:
        """Flat, as history.json and the report read it: epoch, steps, images, <losses>, <schedule>, seconds, ..."""
        fields = asdict(self)
        losses, schedule = fields.pop("losses"), fields.pop("schedule")
        head = {key: fields.pop(key) for key in ("epoch", "steps", "images")}
        return {**head, **losses, **schedule, **fields}


@dataclass
class TrainResult:
    state: SiteState
    epochs: list[EpochMetrics] = field(default_factory=list)
    privacy: Optional[PrivacyStatus] = None

    @property
    def images(self) -> int:
        return sum(e.images for e in self.epochs)

    @property
    def steps(self) -> int:
        return sum(e.steps for e in self.epochs)


FP16_INIT_SCALE = 2.0 ** 8  # GradScaler's default 2**16 overflows at once with a loss summed over ~10^4 pixels
FINITE_CHECK_EVERY = 16  # steps between reads of the device-side sums (a NaN loss stops training within this)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available; use train.device=auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(*parts: int) -> int:
    """Seed torch and numpy from several integers (run seed, site, step)."""
    seed = int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return seed


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Linear warm-up, then constant or cosine decay to zero at `total` steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(config: DermFedConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    cfg = config.train
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def autocast_dtype(device: torch.device, amp: bool) -> Optional[torch.dtype]:
    """bfloat16 on a CUDA GPU that has it, float16 on one that does not, None (float32) otherwise."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class LocalTrainer:
    """Trains an objective's model on one site's images; optional DP-SGD through Opacus.

    Under DP, the sampling rate, the steps per call and the scale of the released update come from
    a public data-set size (`public_size`: the hospital's declared count, else N rounded up to a
    power of two), never from the exact number of images, and every per-image random draw comes
    from secret generators (`common.privacy.ImageDraws`).
    """

    def __init__(self, config: DermFedConfig, model: Objective, images: ImageRows, *, site: str = "site",
                 site_index: int = 0, planned_steps: Optional[int] = None, augment: bool = True,
                 declared_size: Optional[int] = None, min_batch: int = 1):
        if len(images) == 0:
            raise ValueError(f"{site}: no images to train on")
        self.min_batch = min_batch  # without DP, no step uses fewer images (a hospital's min-batch-size)
        self.config, self.model, self.images = config, model, images
        self.site, self.site_index = site, site_index
        self.device = resolve_device(config.train.device)
        self.model.to(self.device)
        dp = config.dp.enabled
        # Under DP: the size the accounting may see; without DP the exact count, as always.
        self.accounted_size = public_size(len(images), declared_size) if dp else len(images)
        self.steps_per_epoch = math.ceil(self.accounted_size / config.train.batch_size) if dp else \
            plain_batches_per_epoch(len(images), config.train.batch_size, min_batch)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{site}: fewer images than the minimum batch of {min_batch}")
        rate = sample_rate_of(self.accounted_size, config.train.batch_size)
        self.sample_rate = poisson_rate(rate) if dp else rate
        self.planned_steps = planned_steps or config.dp.planned_steps or self.steps_per_call()
        self.amp_dtype = None if dp else autocast_dtype(self.device, config.train.amp)
        channels_last = config.train.channels_last and self.device.type == "cuda"
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        prefetch = config.train.num_workers if config.train.num_workers is not None else (
            2 if self.device.type == "cuda" else 0)
        self.augment = build_augmentation(config.train.augment) if augment else None
        dtype = next(model.parameters()).dtype if self.amp_dtype is None else torch.float32
        # Under DP the trainer augments each batch itself, with each image's own secret draws.
        self.loader = BatchLoader(images, self.device, None if dp else self.augment, channels_last=channels_last,
                                  prefetch=prefetch, dtype=dtype if dtype == torch.float64 else torch.float32)

    @property
    def uses_scaler(self) -> bool:
        return self.amp_dtype == torch.float16

    def steps_per_call(self) -> int:
        steps = self.config.train.epochs * self.steps_per_epoch
        return min(steps, self.config.train.max_steps) if self.config.train.max_steps else steps

    def privacy_status(self, state: SiteState) -> Optional[PrivacyStatus]:
        dp = self.config.dp
        if not dp.enabled:
            return None
        return PrivacyStatus(epsilon=epsilon_of(dp.accountant, state.accountant, dp.delta), delta=dp.delta,
                             noise_multiplier=state.noise_multiplier or 0.0, sample_rate=self.sample_rate,
                             steps=steps_of(state.accountant), target_epsilon=dp.target_epsilon)

    def dp_plan(self, state: SiteState) -> DPPlan:
        """The next call's noise, sampling rate and steps (calibrating the noise once, into `state`)."""
        dp = self.config.dp
        if state.noise_multiplier is None:
            state.noise_multiplier = resolve_noise_multiplier(dp, self.sample_rate, self.planned_steps)
            log.info("%s: DP-SGD noise multiplier %.4f (sample rate %.6g, %d planned steps)", self.site,
                     state.noise_multiplier, self.sample_rate, self.planned_steps)
        steps = self.steps_per_call()
        after = with_planned_steps(state.accountant, state.noise_multiplier, self.sample_rate, steps, dp.accountant)
        return DPPlan(state.noise_multiplier, self.sample_rate, steps, after)

    def random_streams(self) -> dict[str, tuple[str, int]]:
        """Under DP, every per-image random draw of a step: the augmentation's and the objective's."""
        streams = {"augment": ("uniform", PER_IMAGE_UNIFORMS)} if self.augment is not None else {}
        return {**streams, **self.model.random_streams()}

    def train(self, state: Optional[SiteState] = None,
              on_epoch_end: Optional[Callable[[EpochMetrics, SiteState], None]] = None,
              hooks: Sequence[ClientHook] = (),
              before_noisy_steps: Optional[Callable[[DPPlan], None]] = None) -> TrainResult:
        """Train for one call's worth of steps, continuing `state`; returns the new state and metrics.

        `hooks`: a strategy's client hooks (FedProx's proximal term), already bound to `self.model`
        (the plain model: DP-SGD wraps it only inside this call). Each one's `before_update` runs
        inside every optimizer step, after DP-SGD's clipping and noise; each is released when the
        call ends.

        Under DP, `before_noisy_steps` gets the call's plan after the budget check and before the
        first noisy step (a site reserves the steps in its ledger there: a call that fails half-way
        has spent them); when the call ends, the accountant must hold exactly the planned steps.
        """
        state = state or SiteState()
        cfg, dp = self.config, self.config.dp
        seed_everything(cfg.seed, self.site_index, state.step)
        model = self.model
        model.train()
        optimizer = build_optimizer(cfg, model)
        if state.optimizer:
            optimizer.load_state_dict(state.optimizer)
        private: Optional[PrivateTraining] = None
        draws: Optional[ImageDraws] = None
        plan: Optional[DPPlan] = None
        steps_this_call = self.steps_per_call()
        if dp.enabled:
            plan = self.dp_plan(state)
            check_budget(dp, state.accountant, plan.noise_multiplier, plan.sample_rate, plan.steps, self.site)
            if before_noisy_steps is not None:
                before_noisy_steps(plan)
            private = make_private(dp, model, optimizer, self.accounted_size, cfg.train.batch_size,
                                   plan.noise_multiplier, state.accountant, self.device)
            assert private.sample_rate == plan.sample_rate
            draws = ImageDraws(len(self.images), self.random_streams())
            model, optimizer = private.module, private.optimizer
        scaler = torch.amp.GradScaler("cuda", init_scale=FP16_INIT_SCALE, enabled=self.uses_scaler)
        if self.uses_scaler and state.scaler:
            scaler.load_state_dict(state.scaler)
        total_steps = cfg.train.total_steps or self.planned_steps
        result = TrainResult(state=state)
        bar = tqdm(total=steps_this_call, desc=f"{self.site} training", unit="step", leave=False,
                   disable=None if cfg.train.progress else True)
        done = 0
        # On the plain optimizer: under DP, Opacus's step clips and noises, then calls this one's step.
        hooked = [_original_optimizer(optimizer).register_step_pre_hook(_before_update(hooks))] if hooks else []
        try:
            for epoch in range(cfg.train.epochs):
                if done >= steps_this_call:
                    break
                if private is not None:
                    batches = list(poisson_batches(len(self.images), private.sample_rate, self.steps_per_epoch,
                                                   private.sampling))
                else:
                    batches = list(shuffled_batches(len(self.images), cfg.train.batch_size, self.min_batch))
                loss_keys = self.model.terms
                sums = torch.zeros(len(loss_keys), device=self.device, dtype=torch.float64)
                images, steps, skipped, image_shape, started = 0, 0, 0, (), time.perf_counter()
                lr, schedule = cfg.train.lr, self.model.schedule(state.step)
                for positions, batch in zip(batches, self.loader(batches)):
                    if done >= steps_this_call:
                        break
                    lr = cfg.train.lr * lr_factor(state.step, cfg.train.warmup_steps, total_steps, cfg.train.scheduler)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    schedule = self.model.schedule(state.step)
                    step_draws = draws.for_batch(positions) if draws is not None else None  # every step, even empty
                    if len(batch) == 0:  # Poisson sampling drew nobody: the accounted step still releases noise
                        private.noise_only_step()
                    else:
                        if step_draws is not None and self.augment is not None:
                            batch = self.augment(batch, step_draws["augment"])
                        terms, was_skipped = self._step(model, optimizer, scaler, batch, schedule, private, step_draws)
                        sums += torch.stack([terms[key].sum() for key in loss_keys]).double()
                        images += len(batch)
                        skipped += was_skipped
                        image_shape = tuple(batch.shape[1:])
                    steps += 1
                    done += 1
                    state.step += 1
                    bar.update(1)
                    if steps % FINITE_CHECK_EVERY == 0:
                        self._require_finite(sums)
                self._require_finite(sums)
                values = dict(zip(loss_keys, sums.tolist()))  # the epoch's one read of the device
                seconds = time.perf_counter() - started
                per_image = {key: value / max(images, 1) for key, value in values.items()}
                bar.set_postfix(loss=f"{per_image['total']:.1f}")
                metrics = EpochMetrics(
                    epoch=epoch + 1, steps=steps, images=images,
                    losses={**per_image, **self.model.derived_metrics(per_image, image_shape)}, schedule=schedule,
                    seconds=seconds, images_per_second=images / seconds if seconds > 0 else 0.0, lr=lr,
                    skipped_steps=skipped,
                )
                if skipped:
                    log.warning("%s: the float16 loss scaler skipped %d of %d steps in epoch %d (overflow); "
                                "their batches made no update", self.site, skipped, steps, epoch + 1)
                if private is not None:
                    metrics.epsilon = epsilon_of(dp.accountant, private.accountant.state_dict(), dp.delta)
                    metrics.delta = dp.delta
                result.epochs.append(metrics)
                state.optimizer = _original_optimizer(optimizer).state_dict()
                state.scaler = scaler.state_dict() if self.uses_scaler else None
                if private is not None:
                    state.accountant = private.accountant.state_dict()
                if on_epoch_end is not None:
                    with private.layout.standard() if private is not None else nullcontext():
                        on_epoch_end(metrics, state)  # e.g. a checkpoint: it must see the standard layout
            if plan is not None and history_of(state.accountant) != history_of(plan.accountant_after):
                log.error("%s: the accountant counted %s but the call reserved %s", self.site,
                          history_of(state.accountant), history_of(plan.accountant_after))
                raise AccountantError(f"{self.site}: the accountant's steps do not match the steps reserved for this call")
        finally:
            bar.close()
            for handle in hooked:
                handle.remove()
            for hook in hooks:
                hook.release()
            if private is not None:
                private.close()  # drop Opacus hooks and the layout change: self.model is the plain model again
        result.privacy = self.privacy_status(state)
        return result

    def _require_finite(self, sums: torch.Tensor) -> None:
        if not bool(torch.isfinite(sums).all()):
            raise FloatingPointError(f"{self.site}: the loss became NaN or infinite; lower train.lr or check the data")

    def _step(self, model, optimizer, scaler, batch: torch.Tensor, schedule: dict[str, float],
              private: Optional[PrivateTraining] = None,
              draws: Optional[dict[str, torch.Tensor]] = None) -> tuple[dict[str, torch.Tensor], int]:
        """One optimisation step; returns the per-sample loss terms (on the device) and 1 if the scaler skipped it."""
        optimizer.zero_grad(set_to_none=True)
        inputs = batch.detach().requires_grad_(True) if private is not None else batch
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = model(inputs) if draws is None else model(inputs, draws=draws)
        terms = self.model.loss_terms(at_least_float32(batch), self.model.as_float(out), schedule)
        if private is not None:
            private.backward(terms["total"], inputs)  # each sample's gradient clipped; noise added in step()
            optimizer.step()
            return {k: v.detach() for k, v in terms.items()}, 0
        scaler.scale(terms["total"].mean()).backward()
        if self.config.train.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.config.train.grad_clip)
        if not self.uses_scaler:
            optimizer.step()
            return {k: v.detach() for k, v in terms.items()}, 0
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        return {k: v.detach() for k, v in terms.items()}, int(scaler.get_scale() < scale)



def _before_update(hooks: Sequence[ClientHook]) -> Callable[..., None]:
    """An optimizer step pre-hook that runs the strategy hooks' `before_update`."""

    def run(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for hook in hooks:
            hook.before_update()

    return run


def _original_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Opacus's DPOptimizer wraps the real one; save the real one's state."""
    return getattr(optimizer, "original_optimizer", optimizer)
