"""Frozen-encoder features: computed once per arm and split when images are not augmented."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from common.data.batches import BatchLoader, ImageRows, ordered_batches
from common.data.stores import ImageStore


class FeatureExtractor:
    """Images of the store -> pooled features of a frozen encoder, normalised as the encoder expects.

    Reads and converts batches as training does (`common.data.batches`: uint8 to the device,
    converted and, with `transform`, augmented there).
    """

    def __init__(self, encoder: nn.Module, store: ImageStore, batch_size: int = 64, device: Optional[torch.device] = None):
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder = encoder.to(self.device).eval()
        config = getattr(encoder, "pretrained_cfg", {}) or {}
        self.mean = torch.tensor(config.get("mean", (0.485, 0.456, 0.406)), device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(config.get("std", (0.229, 0.224, 0.225)), device=self.device).view(1, 3, 1, 1)
        self.store, self.batch_size = store, batch_size

    @torch.no_grad()
    def __call__(self, rows: np.ndarray, transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 desc: str = "features") -> np.ndarray:
        loader = BatchLoader(ImageRows(self.store, rows), self.device, transform,
                             prefetch=2 if self.device.type == "cuda" else 0)
        chunks = []
        batches = ordered_batches(len(rows), self.batch_size)
        for batch in tqdm(loader(batches), total=-(-len(rows) // self.batch_size), desc=desc, unit="batch",
                          leave=False, disable=None):
            chunks.append(self.encoder((batch - self.mean) / self.std).float().cpu())
        return torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), dtype=np.float32)
