"""Masked image modelling for ConvNeXt, in the spirit of FCMAE (ConvNeXt V2, Woo et al. 2023).

Each image gets a random mask on a grid of `patch_size` patches (a fraction `mask_ratio` of them);
the masked pixels are zeroed at the encoder's input (after normalisation: dense masking, no sparse
convolutions, so a convolution can still carry some context across a patch border: a weaker task
than FCMAE's sparse one, but exact under DP-SGD with the same per-layer samplers as the VAE). The
encoder's last feature map (stride 32), normalised by the encoder's own head norm, goes through a
light decoder (1x1 conv, 3x3 conv, GroupNorm, then one 1x1 conv to every pixel of its 32x32 cell);
the per-sample loss is the mean squared error over the masked patches only, against the pixels
normalised per patch (`norm_pix_loss`, as FCMAE and MAE) or the plain pixels in [0, 1].

The masks are a per-image random stream ({"mask": ("uniform", patches)}): under DP every image
draws them from its own secret generator; without DP from torch's seeded generator. No BatchNorm.
Shared by default: the encoder only; the decoder stays at the site (`federation.share=all` shares
it too, and enables the server's `reconstruction` monitor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from common.objectives import register_objective
from common.objectives.base import Objective, ObjectiveSettings, at_least_float32, create_encoder

CELL = 32  # ConvNeXt's stride: the decoder predicts every pixel of each 32x32 cell
EVAL_MASK_SEED = 0  # evaluation masks (no draws, eval mode): the same for every round, so losses compare


class MaskedSettings(ObjectiveSettings):
    """`model.masked`: the mask and the decoder."""

    mask_ratio: float = Field(0.6, gt=0.0, lt=1.0, description="fraction of patches masked per image")
    patch_size: Literal[8, 16, 32] = Field(32, description="side of a masked patch (FCMAE: 32, the encoder's stride)")
    decoder_width: int = Field(64, ge=8, le=1024, description="channels of the light decoder")
    norm_pix_loss: bool = Field(True, description="targets are each patch's pixels normalised by its mean and std")


@dataclass
class MaskedOutput:
    prediction: torch.Tensor  # (batch, 3, H, W): the decoder's pixels (normalised per patch with norm_pix_loss)
    mask: torch.Tensor  # (batch, patches): 1 where the patch was masked


@register_objective("masked")
class MaskedConvNeXt(Objective):
    """Encoder (timm ConvNeXt) on masked images -> light decoder -> the masked patches' pixels."""

    title = "masked image modelling"
    Settings = MaskedSettings
    terms = ("masked_mse", "total")
    locked = ("decoder_width", "patch_size")  # the decoder's shape; the task the weights were trained on
    monitors = ("reconstruction",)

    def __init__(self, encoder: str = "convnext_tiny", image_size: int = 64, mask_ratio: float = 0.6,
                 patch_size: int = 32, decoder_width: int = 64, norm_pix_loss: bool = True, drop_path_rate: float = 0.0):
        super().__init__()
        if image_size % CELL or CELL % patch_size:
            raise ValueError(f"image size {image_size} must be a multiple of 32 and patch size {patch_size} divide 32")
        self.encoder_name = encoder
        self.encoder = create_encoder(encoder, drop_path_rate)
        self._normalisation()
        self.image_size, self.patch_size = image_size, patch_size
        self.grid = image_size // patch_size
        self.masked_patches = max(1, round(mask_ratio * self.grid * self.grid))
        self.norm_pix_loss = norm_pix_loss
        width, groups = decoder_width, min(8, decoder_width // 4)  # >= 4 channels a group: a 1x1 map (32 px) normalises
        self.decoder = nn.Sequential(
            nn.Conv2d(self.encoder.num_features, width, kernel_size=1), nn.GroupNorm(groups, width), nn.GELU(),
            nn.Conv2d(width, width, kernel_size=3, padding=1), nn.GroupNorm(groups, width), nn.GELU(),
            nn.Conv2d(width, 3 * CELL * CELL, kernel_size=1))

    @classmethod
    def from_config(cls, model_config: Any, image_size: int) -> "MaskedConvNeXt":
        s: MaskedSettings = model_config.settings("masked")
        return cls(encoder=model_config.encoder, image_size=image_size, mask_ratio=s.mask_ratio,
                   patch_size=s.patch_size, decoder_width=s.decoder_width, norm_pix_loss=s.norm_pix_loss,
                   drop_path_rate=model_config.drop_path_rate)

    @property
    def patches(self) -> int:
        return self.grid * self.grid

    def random_streams(self) -> dict[str, tuple[str, int]]:
        return {"mask": ("uniform", self.patches)}

    def _mask(self, batch: int, device: torch.device, draws: Optional[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """(batch, patches), 1 on the `masked_patches` patches with the smallest uniforms of each image."""
        if draws is not None:
            uniforms = draws["mask"].to(device, torch.float32)
        elif self.training:
            uniforms = torch.rand(batch, self.patches, device=device)  # seeded runs: torch's global generator
        else:
            uniforms = torch.rand(batch, self.patches, generator=torch.Generator().manual_seed(EVAL_MASK_SEED)).to(device)
        ranks = uniforms.argsort(dim=1).argsort(dim=1)
        return (ranks < self.masked_patches).float()

    def _pixel_mask(self, mask: torch.Tensor) -> torch.Tensor:
        grid = mask.view(-1, 1, self.grid, self.grid)
        return grid.repeat_interleave(self.patch_size, dim=2).repeat_interleave(self.patch_size, dim=3)

    def forward(self, images: torch.Tensor, draws: Optional[Mapping[str, torch.Tensor]] = None) -> MaskedOutput:
        mask = self._mask(images.shape[0], images.device, draws)
        visible = (1.0 - self._pixel_mask(mask)).to(images.dtype)
        x = (images - self.mean) / self.std * visible  # masked pixels: 0, the encoder's mean colour
        features = self.encoder.head.norm(self.encoder.forward_features(x))  # per position; every encoder weight used
        prediction = F.pixel_shuffle(self.decoder(features), CELL)
        return MaskedOutput(prediction, mask)

    def _patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, 3, H, W) -> (batch, patches, 3 * patch_size**2)."""
        p, g = self.patch_size, self.grid
        x = images.reshape(images.shape[0], 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(images.shape[0], g * g, 3 * p * p)

    def _unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        p, g = self.patch_size, self.grid
        x = patches.reshape(patches.shape[0], g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(patches.shape[0], 3, g * p, g * p)

    def _targets(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        target = self._patchify(images)
        if not self.norm_pix_loss:
            return target, torch.zeros_like(target[..., :1]), torch.ones_like(target[..., :1])
        mean, std = target.mean(dim=-1, keepdim=True), (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        return (target - mean) / std, mean, std

    def loss_terms(self, images: torch.Tensor, output: MaskedOutput, schedule: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """masked_mse: mean squared error per pixel over the image's masked patches (the same count in every image)."""
        target, _, _ = self._targets(images)
        per_patch = (self._patchify(output.prediction) - target).pow(2).mean(dim=-1)
        mask = output.mask.to(per_patch.dtype)
        masked_mse = (per_patch * mask).sum(dim=1) / mask.sum(dim=1)
        return {"masked_mse": masked_mse, "total": masked_mse}

    def as_float(self, output: MaskedOutput) -> MaskedOutput:
        return MaskedOutput(at_least_float32(output.prediction), output.mask)

    @torch.no_grad()
    def preview(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The masked inputs, the prediction (masked patches predicted, visible ones as given), the target (the input)."""
        self.eval()
        device = next(self.parameters()).device
        output = self(images.to(device))
        pixel_mask = self._pixel_mask(output.mask).cpu()
        _, mean, std = self._targets(images)
        predicted = self._unpatchify(self._patchify(output.prediction.float().cpu()) * std + mean).clamp(0, 1)
        return [images * (1 - pixel_mask), images * (1 - pixel_mask) + predicted * pixel_mask, images]
