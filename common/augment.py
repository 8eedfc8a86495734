"""Augmentations for dermoscopy: lesions have no up, no left, and mild colour variation.

Flips and 90-degree rotations are exact symmetries of a dermoscopic image; colour jitter is
kept mild because colour is a clinical feature. Random draws come from torch's global RNG,
which the training loop seeds, so an augmented epoch is reproducible.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.transforms import v2

from common.config import AugmentConfig


class RandomRot90(nn.Module):
    """Rotate by 0, 90, 180 or 270 degrees (exact, no interpolation)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.rot90(image, int(torch.randint(0, 4, ()).item()), dims=(-2, -1))


def build_augmentation(cfg: AugmentConfig) -> v2.Compose | None:
    """The configured augmentation for float images in [0, 1], or None when all are off."""
    steps: list[nn.Module] = []
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if cfg.vflip:
        steps.append(v2.RandomVerticalFlip())
    if cfg.rot90:
        steps.append(RandomRot90())
    if any((cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)):
        steps.append(v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
    return v2.Compose(steps) if steps else None
