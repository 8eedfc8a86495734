"""Augmentations for dermoscopy, applied to whole batches on the device the model trains on.

Lesions have no up and no left: flips and 90-degree rotations are exact symmetries of a
dermoscopic image. Colour is a clinical feature, so the colour jitter is mild. Each image of a
batch gets its own random parameters, drawn on the CPU from torch's global generator (which the
training loop seeds), so an augmented epoch is reproducible and the same on every device; the
pixels never leave the device.
"""

from __future__ import annotations

from typing import Optional

import torch
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

from common.config import AugmentConfig


def _uniform(n: int, spread: float) -> torch.Tensor:
    return 1.0 + (torch.rand(n) * 2.0 - 1.0) * spread


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).view(-1, 1, 1, 1)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


class BatchAugment:
    """Random flips, 90-degree rotations and colour jitter, independently per image of a (B, 3, H, W) batch in [0, 1]."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        cfg, n = self.cfg, images.shape[0]
        if n == 0:
            return images
        if cfg.hflip:
            images = torch.where(_per_image(torch.rand(n) < 0.5, images).bool(), images.flip(-1), images)
        if cfg.vflip:
            images = torch.where(_per_image(torch.rand(n) < 0.5, images).bool(), images.flip(-2), images)
        if cfg.rot90 and images.shape[-1] == images.shape[-2]:
            turns = _per_image(torch.randint(0, 4, (n,)), images).long()
            rotated = images
            for k in (1, 2, 3):
                rotated = torch.where(turns == k, torch.rot90(images, k, dims=(-2, -1)), rotated)
            images = rotated
        if cfg.brightness:
            images = (images * _per_image(_uniform(n, cfg.brightness), images)).clamp(0, 1)
        if cfg.contrast:
            mean = _grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
            images = ((images - mean) * _per_image(_uniform(n, cfg.contrast), images) + mean).clamp(0, 1)
        if cfg.saturation:
            gray = _grayscale(images)
            images = ((images - gray) * _per_image(_uniform(n, cfg.saturation), images) + gray).clamp(0, 1)
        if cfg.hue:
            shift = ((torch.rand(n) * 2.0 - 1.0) * cfg.hue).to(images.device, images.dtype).view(-1, 1, 1)
            hsv = _rgb_to_hsv(images)
            hue = torch.remainder(hsv[:, 0] + shift, 1.0)
            images = _hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1))
        return images


def build_augmentation(cfg: AugmentConfig) -> Optional[BatchAugment]:
    """The configured batch augmentation, or None when everything is off."""
    active = cfg.hflip or cfg.vflip or cfg.rot90 or any((cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
    return BatchAugment(cfg) if active else None
