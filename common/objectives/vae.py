"""The ConvNeXt VAE: a randomly initialised timm ConvNeXt encoder and a GroupNorm decoder.

The decoder uses GroupNorm, never BatchNorm: BatchNorm mixes samples of a batch, which breaks
per-sample gradients and so DP-SGD. Loss per sample: squared error summed over pixels and
channels plus beta times the KL divergence; beta ramps up over `model.vae.kl_warmup_steps`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from common.objectives import register_objective
from common.objectives.base import Objective, ObjectiveSettings, at_least_float32, create_encoder

DECODER_STAGES = 5  # ConvNeXt downsamples by 32; the decoder mirrors it


class VAESettings(ObjectiveSettings):
    """`model.vae`: the VAE's latent, decoder and KL weight."""

    latent_dim: int = Field(128, ge=2, le=4096)
    decoder_width: int = Field(32, ge=4, le=256, description="channels of the last decoder stage (x2 per stage)")
    beta: float = Field(1.0, ge=0.0, description="weight of the KL term")
    kl_warmup_steps: int = Field(0, ge=0, description="beta ramps linearly from 0 over this many steps")


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(8, channels), num_channels=channels)


class UpBlock(nn.Module):
    """Double the resolution: nearest upsampling, then conv-GroupNorm-GELU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = _norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.norm(self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))))


class ConvDecoder(nn.Module):
    """Latent vector -> image in [0, 1] of side `image_size` (a multiple of 32)."""

    def __init__(self, latent_dim: int, image_size: int, base_width: int = 32):
        super().__init__()
        if image_size % 32:
            raise ValueError(f"image size {image_size} must be a multiple of 32 (64, 128, 224, ...)")
        self.start = image_size // 32
        widths = [base_width * 2 ** (DECODER_STAGES - 1 - i) for i in range(DECODER_STAGES)]  # 512..32 for 32
        self.project = nn.Linear(latent_dim, widths[0] * self.start * self.start)
        self.widths0 = widths[0]
        self.blocks = nn.Sequential(*[UpBlock(widths[i - 1] if i else widths[0], widths[i]) for i in range(DECODER_STAGES)])
        self.to_rgb = nn.Conv2d(widths[-1], 3, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(z.shape[0], self.widths0, self.start, self.start)
        return torch.sigmoid(self.to_rgb(self.blocks(F.gelu(x))))


@dataclass
class VAEOutput:
    reconstruction: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor


def vae_loss_per_sample(images: torch.Tensor, out: VAEOutput, beta: float) -> dict[str, torch.Tensor]:
    """Per-sample terms, each of shape (batch,).

    reconstruction: squared error summed over channels and pixels (Gaussian log-likelihood up
    to constants); kl: KL(q(z|x) || N(0, I)) summed over latent dimensions; total:
    reconstruction + beta * kl. The batch loss is the mean of `total` over samples, the
    reduction Opacus assumes (loss_reduction="mean").
    """
    reconstruction = (out.reconstruction - images).pow(2).flatten(1).sum(dim=1)
    kl = -0.5 * (1 + out.logvar - out.mu.pow(2) - out.logvar.exp()).sum(dim=1)
    return {"reconstruction": reconstruction, "kl": kl, "total": reconstruction + beta * kl}


@register_objective("vae")
class ConvNeXtVAE(Objective):
    """Encoder (timm ConvNeXt) -> mean and log-variance of the latent -> decoder."""

    title = "VAE"
    Settings = VAESettings
    terms = ("reconstruction", "kl", "total")
    locked = ("latent_dim", "decoder_width")  # they shape the weights; beta and its warm-up may change on resume
    monitors = ("reconstruction",)  # the global model's validation loss: needs the decoder, so federation.share=all

    def __init__(self, encoder: str = "convnext_tiny", latent_dim: int = 128, image_size: int = 64,
                 decoder_width: int = 32, drop_path_rate: float = 0.0, beta: float = 1.0, kl_warmup_steps: int = 0):
        super().__init__()
        self.encoder_name = encoder
        self.encoder = create_encoder(encoder, drop_path_rate)
        self._normalisation()
        features = self.encoder.num_features
        self.to_mu = nn.Linear(features, latent_dim)
        self.to_logvar = nn.Linear(features, latent_dim)
        self.decoder = ConvDecoder(latent_dim, image_size, decoder_width)
        self.sample_latent = True  # False: z = mu also in training (deterministic; used by gradient tests)
        self.beta, self.kl_warmup_steps = beta, kl_warmup_steps

    @classmethod
    def from_config(cls, model_config: Any, image_size: int) -> "ConvNeXtVAE":
        settings: VAESettings = model_config.settings("vae")
        return cls(encoder=model_config.encoder, latent_dim=settings.latent_dim, image_size=image_size,
                   decoder_width=settings.decoder_width, drop_path_rate=model_config.drop_path_rate,
                   beta=settings.beta, kl_warmup_steps=settings.kl_warmup_steps)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder((images - self.mean) / self.std)
        return self.to_mu(features), self.to_logvar(features).clamp(-10.0, 10.0)

    def random_streams(self) -> dict[str, tuple[str, int]]:
        return {"latent": ("normal", self.to_mu.out_features)} if self.sample_latent else {}

    def schedule(self, step: Optional[int]) -> dict[str, float]:
        """beta, ramped linearly from 0 over kl_warmup_steps (the full beta for evaluation)."""
        warmup = self.kl_warmup_steps
        if step is None:
            return {"beta": self.beta}
        return {"beta": self.beta * (min(1.0, step / warmup) if warmup else 1.0)}

    def forward(self, images: torch.Tensor, draws: Optional[Mapping[str, torch.Tensor]] = None) -> VAEOutput:
        """Without `draws` the latent sample comes from torch's global generator (seeded runs); under DP from
        `draws["latent"]`, one standard normal row per image."""
        mu, logvar = self.encode(images)
        if self.training and self.sample_latent:
            noise = torch.randn_like(mu) if draws is None else draws["latent"].to(mu.device, mu.dtype)
            z = mu + noise * torch.exp(0.5 * logvar)
        else:
            z = mu
        return VAEOutput(self.decoder(z), mu, logvar)

    def loss_terms(self, images: torch.Tensor, output: VAEOutput, schedule: Mapping[str, float]) -> dict[str, torch.Tensor]:
        return vae_loss_per_sample(images, output, schedule["beta"])

    def as_float(self, output: VAEOutput) -> VAEOutput:
        return VAEOutput(at_least_float32(output.reconstruction), at_least_float32(output.mu),
                         at_least_float32(output.logvar))

    def derived_metrics(self, per_image: Mapping[str, float], image_shape: tuple[int, ...]) -> dict[str, float]:
        pixels = 1.0
        for side in image_shape:
            pixels *= side
        return {"mse_per_pixel": per_image["reconstruction"] / pixels}

    @torch.no_grad()
    def preview(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Inputs, then their reconstructions (z = mean of the posterior)."""
        self.eval()
        device = next(self.parameters()).device
        return [images, self(images.to(device)).reconstruction.cpu()]
