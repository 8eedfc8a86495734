"""Augmentations for dermoscopy, applied to whole batches on the device the model trains on.

Lesions have no up and no left: flips and 90-degree rotations are exact symmetries of a
dermoscopic image. Colour is a clinical feature, so the colour jitter is mild. Each image of a
batch gets its own random parameters, drawn on the CPU, so an augmented epoch is the same on
every device; the pixels never leave the device. Without DP the parameters come from torch's
global generator (which the training loop seeds): an augmented epoch is reproducible. Under DP
they come from `PER_IMAGE_UNIFORMS` uniforms per image that the caller draws from the image's own
secret stream (`common.privacy.ImageDraws`), so no image's augmentation depends on the seed, the
step or the other images of its batch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

from common.config import AugmentConfig


# Under DP, the uniforms of one image, one column each: hflip, vflip, rot90, brightness, contrast, saturation, hue.
PER_IMAGE_UNIFORMS = 7


def _uniform(n: int, spread: float) -> torch.Tensor:
    return 1.0 + (torch.rand(n) * 2.0 - 1.0) * spread


class _GlobalDraws:
    """Parameters from torch's global generator, in the order the seeded (non-DP) path has always drawn them."""

    def __init__(self, n: int):
        self.n = n

    def coin(self, _column: int) -> torch.Tensor:
        return torch.rand(self.n) < 0.5

    def turns(self, _column: int) -> torch.Tensor:
        return torch.randint(0, 4, (self.n,))

    def factor(self, _column: int, spread: float) -> torch.Tensor:
        return _uniform(self.n, spread)

    def signed(self, _column: int, spread: float) -> torch.Tensor:
        return (torch.rand(self.n) * 2.0 - 1.0) * spread


class _GivenDraws:
    """Parameters from uniforms drawn for each image by the caller (DP): column j is parameter j."""

    def __init__(self, uniforms: torch.Tensor):
        self.uniforms = uniforms

    def coin(self, column: int) -> torch.Tensor:
        return self.uniforms[:, column] < 0.5

    def turns(self, column: int) -> torch.Tensor:
        return (self.uniforms[:, column] * 4).long().clamp(max=3)

    def factor(self, column: int, spread: float) -> torch.Tensor:
        return 1.0 + (self.uniforms[:, column] * 2.0 - 1.0) * spread

    def signed(self, column: int, spread: float) -> torch.Tensor:
        return (self.uniforms[:, column] * 2.0 - 1.0) * spread


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).view(-1, 1, 1, 1)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


class BatchAugment:
    """Random flips, 90-degree rotations and colour jitter, independently per image of a (B, 3, H, W) batch in [0, 1]."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    def __call__(self, images: torch.Tensor, uniforms: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Augment `images`; under DP, `uniforms` (one row of PER_IMAGE_UNIFORMS per image) gives every parameter."""
        cfg, n = self.cfg, images.shape[0]
        if n == 0:
            return images
        if uniforms is not None and tuple(uniforms.shape) != (n, PER_IMAGE_UNIFORMS):
            raise ValueError(f"augmentation needs {PER_IMAGE_UNIFORMS} uniforms per image, got {tuple(uniforms.shape)}")
        draws = _GlobalDraws(n) if uniforms is None else _GivenDraws(uniforms)
        if cfg.hflip:
            images = torch.where(_per_image(draws.coin(0), images).bool(), images.flip(-1), images)
        if cfg.vflip:
            images = torch.where(_per_image(draws.coin(1), images).bool(), images.flip(-2), images)
        if cfg.rot90 and images.shape[-1] == images.shape[-2]:
            turns = _per_image(draws.turns(2), images).long()
            rotated = images
            for k in (1, 2, 3):
                rotated = torch.where(turns == k, torch.rot90(images, k, dims=(-2, -1)), rotated)
            images = rotated
        if cfg.brightness:
            images = (images * _per_image(draws.factor(3, cfg.brightness), images)).clamp(0, 1)
        if cfg.contrast:
            mean = _grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
            images = ((images - mean) * _per_image(draws.factor(4, cfg.contrast), images) + mean).clamp(0, 1)
        if cfg.saturation:
            gray = _grayscale(images)
            images = ((images - gray) * _per_image(draws.factor(5, cfg.saturation), images) + gray).clamp(0, 1)
        if cfg.hue:
            shift = draws.signed(6, cfg.hue).to(images.device, images.dtype).view(-1, 1, 1)
            hsv = _rgb_to_hsv(images)
            hue = torch.remainder(hsv[:, 0] + shift, 1.0)
            images = _hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1))
        return images


def build_augmentation(cfg: AugmentConfig) -> Optional[BatchAugment]:
    """The configured batch augmentation, or None when everything is off."""
    active = cfg.hflip or cfg.vflip or cfg.rot90 or any((cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
    return BatchAugment(cfg) if active else None
