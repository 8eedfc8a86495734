"""The ConvNeXt VAE: a randomly initialised timm ConvNeXt encoder and a GroupNorm decoder.

The encoder is a plain timm backbone (`timm.create_model(name, num_classes=0)`): its state
dict is what hospitals exchange and what evaluation freezes, so it must load with
`strict=True` into a fresh timm model of the same name. Inputs are images in [0, 1]; the VAE
normalises them with the encoder's own mean and std (ImageNet's, as timm configures
ConvNeXt), exactly as evaluation does for every arm.

The decoder uses GroupNorm, never BatchNorm: BatchNorm mixes samples of a batch, which
breaks per-sample gradients and so DP-SGD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import timm
import torch
import torch.nn.functional as F
from torch import nn

ENCODER_PREFIX = "encoder."
DECODER_STAGES = 5  # ConvNeXt downsamples by 32; the decoder mirrors it


def available_encoders() -> list[str]:
    """timm's ConvNeXt family (convnext_atto ... convnext_xxlarge)."""
    return sorted(name for name in timm.list_models("convnext*") if "." not in name)


def create_encoder(name: str = "convnext_tiny", drop_path_rate: float = 0.0) -> nn.Module:
    """A randomly initialised timm ConvNeXt that outputs pooled features (no classifier)."""
    if name not in available_encoders():
        raise ValueError(f"model.encoder={name!r} is not a timm ConvNeXt; choose one of {available_encoders()}")
    return timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate)


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


class ConvNeXtVAE(nn.Module):
    """Encoder (timm ConvNeXt) -> mean and log-variance of the latent -> decoder."""

    def __init__(self, encoder: str = "convnext_tiny", latent_dim: int = 128, image_size: int = 64,
                 decoder_width: int = 32, drop_path_rate: float = 0.0):
        super().__init__()
        self.encoder_name = encoder
        self.encoder = create_encoder(encoder, drop_path_rate)
        config = self.encoder.pretrained_cfg
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1), persistent=False)
        features = self.encoder.num_features
        self.to_mu = nn.Linear(features, latent_dim)
        self.to_logvar = nn.Linear(features, latent_dim)
        self.decoder = ConvDecoder(latent_dim, image_size, decoder_width)
        self.sample_latent = True  # False: z = mu also in training (deterministic; used by gradient tests)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder((images - self.mean) / self.std)
        return self.to_mu(features), self.to_logvar(features).clamp(-10.0, 10.0)

    def random_streams(self) -> dict[str, tuple[str, int]]:
        """The per-image random draws a training step needs: under DP each image draws them from its own secret
        stream (`common.privacy.ImageDraws`), and they are handed to `forward`.
        An objective with other randomness (e.g. masks) declares it here, e.g. {"mask": ("uniform", patches)}."""
        return {"latent": ("normal", self.to_mu.out_features)} if self.sample_latent else {}

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


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove `_module.` (Opacus GradSampleModule), `module.` (DataParallel/DDP) and
    `_orig_mod.` (torch.compile) prefixes, so checkpoints hold plain state dicts."""
    clean = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in ("_module.", "module.", "_orig_mod."):
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        clean[key] = value
    return clean


def encoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder as a plain timm backbone state dict (loads into create_model(name, num_classes=0))."""
    state = strip_wrapper_prefixes(model.state_dict())
    return {k[len(ENCODER_PREFIX):]: v.detach().clone() for k, v in state.items() if k.startswith(ENCODER_PREFIX)}


def build_vae(model_config, image_size: int) -> ConvNeXtVAE:
    """The VAE described by the `model` config section at `data.image_size`."""
    return ConvNeXtVAE(
        encoder=model_config.encoder,
        latent_dim=model_config.latent_dim,
        image_size=image_size,
        decoder_width=model_config.decoder_width,
        drop_path_rate=model_config.drop_path_rate,
    )


def shared_keys(model: ConvNeXtVAE, scope: str) -> list[str]:
    """State-dict keys that leave a site: the encoder only (default) or the whole VAE."""
    keys = list(strip_wrapper_prefixes(model.state_dict()))
    if scope == "vae":
        return keys
    if scope == "encoder":
        return [k for k in keys if k.startswith(ENCODER_PREFIX)]
    raise ValueError(f"unknown share scope {scope!r}; allowed: encoder, vae")


def shared_state(model: ConvNeXtVAE, scope: str) -> dict[str, torch.Tensor]:
    state = strip_wrapper_prefixes(model.state_dict())
    return {k: state[k].detach().clone() for k in shared_keys(model, scope)}


def private_state(model: ConvNeXtVAE, scope: str) -> dict[str, torch.Tensor]:
    """What stays at the site: the decoder and latent heads when only the encoder is shared."""
    shared = set(shared_keys(model, scope))
    return {k: v.detach().clone() for k, v in strip_wrapper_prefixes(model.state_dict()).items() if k not in shared}


def load_partial_state(model: ConvNeXtVAE, state: Mapping[str, torch.Tensor]) -> None:
    """Load some of the model's keys (shared or private); unknown keys or shapes are errors."""
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            raise KeyError(f"{key!r} is not a parameter of this model")
        if tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(f"{key!r}: shape {tuple(value.shape)} does not match the model's {tuple(own[key].shape)}")
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in state.items()}}, strict=True)
