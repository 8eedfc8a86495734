"""PyTorch views of checked images: label-free for pretraining, labelled for evaluation.

Both read pixels from an ImageStore (the memory-mapped cache, or decoding on the fly) and
return float tensors in [0, 1], channels first; normalisation belongs to each model.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from common.data.cache import ImageStore

Transform = Callable[[torch.Tensor], torch.Tensor]


def to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)


class PretrainView(Dataset):
    """Images only: what self-supervised pretraining sees (no labels leave the catalog)."""

    def __init__(self, store: ImageStore, indices: Sequence[int], transform: Optional[Transform] = None):
        self.store, self.indices, self.transform = store, np.asarray(indices, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = to_tensor(self.store.get(int(self.indices[i])))
        return self.transform(image) if self.transform else image


class LabelledView(Dataset):
    """(image, class index) pairs for training and scoring classifier heads."""

    def __init__(self, store: ImageStore, indices: Sequence[int], labels: Sequence[int],
                 transform: Optional[Transform] = None):
        self.store, self.indices, self.transform = store, np.asarray(indices, dtype=np.int64), transform
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(self.indices):
            raise ValueError("one label per index is required")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = to_tensor(self.store.get(int(self.indices[i])))
        return (self.transform(image) if self.transform else image), int(self.labels[i])
