"""The local pretraining engine every hospital runs (and the pooled / local-only arms).

One call of `LocalTrainer.train` trains the VAE on one site's images for `train.epochs`
epochs (or `train.max_steps` steps) and returns per-epoch metrics. What must survive between
calls, across federated rounds, lives in `SiteState`: the global step (which drives the
learning-rate schedule, the KL warm-up and the random seed), the optimizer state, and the
DP accountant's history. A resumed site therefore continues exactly where it stopped.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from common.config import DermFedConfig
from common.model import ConvNeXtVAE, VAEOutput, vae_loss_per_sample
from common.privacy import (
    PrivacyStatus,
    check_budget,
    epsilon_of,
    make_private,
    noise_only_step,
    resolve_noise_multiplier,
    sample_rate_of,
    steps_of,
)

log = logging.getLogger("dermfed.training")


@dataclass
class SiteState:
    """What a site keeps between training calls (federated rounds)."""

    step: int = 0
    optimizer: Optional[dict[str, Any]] = None
    accountant: Optional[dict[str, Any]] = None
    noise_multiplier: Optional[float] = None


@dataclass
class EpochMetrics:
    epoch: int
    steps: int
    images: int
    reconstruction: float  # per image, summed over pixels and channels
    kl: float  # per image, summed over latent dimensions
    total: float
    mse_per_pixel: float
    beta: float
    seconds: float
    images_per_second: float
    lr: float
    epsilon: Optional[float] = None
    delta: Optional[float] = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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


class LocalTrainer:
    """Trains a ConvNeXtVAE on one site's images; optional DP-SGD through Opacus."""

    def __init__(self, config: DermFedConfig, model: ConvNeXtVAE, dataset: Dataset, *, site: str = "site",
                 site_index: int = 0, planned_steps: Optional[int] = None):
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError(f"{site}: no images to train on")
        self.config, self.model, self.dataset = config, model, dataset
        self.site, self.site_index = site, site_index
        self.device = resolve_device(config.train.device)
        self.model.to(self.device)
        self.steps_per_epoch = math.ceil(len(dataset) / config.train.batch_size)  # type: ignore[arg-type]
        self.sample_rate = sample_rate_of(len(dataset), config.train.batch_size)  # type: ignore[arg-type]
        self.planned_steps = planned_steps or config.dp.planned_steps or self.steps_per_call()
        self.use_amp = config.train.amp and self.device.type == "cuda" and not config.dp.enabled
        if config.train.channels_last and self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)

    def steps_per_call(self) -> int:
        steps = self.config.train.epochs * self.steps_per_epoch
        return min(steps, self.config.train.max_steps) if self.config.train.max_steps else steps

    def _loader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.config.train.batch_size, shuffle=True,
                          num_workers=self.config.train.num_workers, drop_last=False,
                          pin_memory=self.device.type == "cuda")

    def _beta(self, step: int) -> float:
        warmup = self.config.model.kl_warmup_steps
        return self.config.model.beta * (min(1.0, step / warmup) if warmup else 1.0)

    def privacy_status(self, state: SiteState) -> Optional[PrivacyStatus]:
        dp = self.config.dp
        if not dp.enabled:
            return None
        return PrivacyStatus(epsilon=epsilon_of(dp.accountant, state.accountant, dp.delta), delta=dp.delta,
                             noise_multiplier=state.noise_multiplier or 0.0, sample_rate=self.sample_rate,
                             steps=steps_of(state.accountant), target_epsilon=dp.target_epsilon)

    def train(self, state: Optional[SiteState] = None,
              on_epoch_end: Optional[Callable[[EpochMetrics, SiteState], None]] = None,
              prox_mu: float = 0.0, prox_reference: Optional[dict[str, torch.Tensor]] = None) -> TrainResult:
        """Train for one call's worth of steps, continuing `state`; returns the new state and metrics.

        With `prox_mu` > 0 (FedProx), each step is followed by a decoupled proximal step
        w <- w - lr * mu * (w - w_global) on the parameters in `prox_reference`: the gradient of
        (mu/2)||w - w_global||^2, applied outside the loss so that it holds unchanged under
        DP-SGD (it depends on no sample, so it costs no privacy).
        """
        state = state or SiteState()
        cfg, dp = self.config, self.config.dp
        seed_everything(cfg.seed, self.site_index, state.step)
        model = self.model
        model.train()
        optimizer = build_optimizer(cfg, model)
        if state.optimizer:
            optimizer.load_state_dict(state.optimizer)
        loader = self._loader()
        engine = None
        steps_this_call = self.steps_per_call()
        if dp.enabled:
            if state.noise_multiplier is None:
                state.noise_multiplier = resolve_noise_multiplier(dp, self.sample_rate, self.planned_steps)
                log.info("%s: DP-SGD noise multiplier %.4f (sample rate %.4f, %d planned steps)", self.site,
                         state.noise_multiplier, self.sample_rate, self.planned_steps)
            check_budget(dp, state.accountant, state.noise_multiplier, self.sample_rate, steps_this_call, self.site)
            model, optimizer, loader, engine = make_private(dp, model, optimizer, loader, state.noise_multiplier,
                                                            state.accountant, self.device)
        scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        total_steps = cfg.train.total_steps or self.planned_steps
        result = TrainResult(state=state)
        bar = tqdm(total=steps_this_call, desc=f"{self.site} training", unit="step", leave=False,
                   disable=None if cfg.train.progress else True)
        done = 0
        try:
            for epoch in range(cfg.train.epochs):
                if done >= steps_this_call:
                    break
                sums = {"reconstruction": 0.0, "kl": 0.0, "total": 0.0}
                images, steps, pixels, started = 0, 0, 1.0, time.perf_counter()
                for batch in loader:
                    if done >= steps_this_call:
                        break
                    lr = cfg.train.lr * lr_factor(state.step, cfg.train.warmup_steps, total_steps, cfg.train.scheduler)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    beta = self._beta(state.step)
                    if _is_empty(batch):  # Poisson sampling drew nobody: the accounted step still releases noise
                        noise_only_step(optimizer, model.parameters())
                    else:
                        terms = self._step(model, optimizer, scaler, batch, beta)
                        if prox_mu and prox_reference:
                            self._proximal_step(lr * prox_mu, prox_reference)
                        for key in sums:
                            sums[key] += float(terms[key].sum())
                        images += len(batch)
                        pixels = float(np.prod(batch.shape[1:]))
                    steps += 1
                    done += 1
                    state.step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{sums['total'] / max(images, 1):.1f}")
                seconds = time.perf_counter() - started
                metrics = EpochMetrics(
                    epoch=epoch + 1, steps=steps, images=images,
                    reconstruction=sums["reconstruction"] / max(images, 1), kl=sums["kl"] / max(images, 1),
                    total=sums["total"] / max(images, 1), mse_per_pixel=sums["reconstruction"] / max(images, 1) / pixels,
                    beta=beta if steps else self._beta(state.step), seconds=seconds,
                    images_per_second=images / seconds if seconds > 0 else 0.0, lr=lr if steps else cfg.train.lr,
                )
                if engine is not None:
                    metrics.epsilon = float(engine.accountant.get_epsilon(dp.delta))
                    metrics.delta = dp.delta
                result.epochs.append(metrics)
                state.optimizer = _original_optimizer(optimizer).state_dict()
                if engine is not None:
                    state.accountant = engine.accountant.state_dict()
                if on_epoch_end is not None:
                    on_epoch_end(metrics, state)
        finally:
            bar.close()
            if engine is not None and hasattr(model, "to_standard_module"):
                model.to_standard_module()  # drop Opacus hooks: self.model is a plain VAE again
        result.privacy = self.privacy_status(state)
        return result

    @torch.no_grad()
    def _proximal_step(self, rate: float, reference: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        for name, anchor in reference.items():
            if name in params:
                param = params[name]
                param.sub_(rate * (param - anchor.to(param.device, param.dtype)))

    def _step(self, model, optimizer, scaler, batch: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
        batch = batch.to(self.device, non_blocking=True)
        if self.device.type == "cuda" and self.config.train.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=self.use_amp):
            out = model(batch)
        terms = vae_loss_per_sample(batch.float(), _as_float(out), beta)
        loss = terms["total"].mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.site}: non-finite loss at step; lower train.lr or check the data")
        if self.config.dp.enabled:
            loss.backward()  # Opacus clips each sample's gradient and adds noise in step()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            if self.config.train.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.config.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        return {k: v.detach() for k, v in terms.items()}


def _is_empty(batch: Any) -> bool:
    """An empty Poisson batch: Opacus hands a 0-row tensor, or a list of empty tensors when the first batch is empty."""
    if torch.is_tensor(batch):
        return batch.shape[0] == 0
    return all(torch.is_tensor(part) and part.numel() == 0 for part in batch)


def _as_float(out: VAEOutput) -> VAEOutput:
    """Mixed precision produces half-precision outputs; the loss is computed in float32."""
    return VAEOutput(out.reconstruction.float(), out.mu.float(), out.logvar.float())


def _original_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Opacus's DPOptimizer wraps the real one; save the real one's state."""
    return getattr(optimizer, "original_optimizer", optimizer)
