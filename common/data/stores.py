"""Where a catalog's pixels come from: row i -> RGB uint8 array, read from the cache or decoded.

Kept apart from the cache that builds them and the batches that read them, so that neither
imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from common.data.catalog import DataError
from common.data.images import decode_image


class ImageStore(Protocol):
    """Row i of the catalog -> RGB uint8 array (size, size, 3)."""

    def __len__(self) -> int: ...

    def get(self, index: int) -> np.ndarray: ...


def read_batch(store: ImageStore, rows: np.ndarray) -> np.ndarray:
    """uint8 pixels of `rows`: the store's own batched read when it has one, image by image otherwise."""
    if hasattr(store, "get_batch"):
        return store.get_batch(rows)
    return np.stack([store.get(int(i)) for i in rows]) if len(rows) else np.zeros((0, 0, 0, 3), dtype=np.uint8)


@dataclass
class MemmapStore:
    """Pixels read from the memory-mapped cache file; no decoding."""

    array: np.ndarray

    def __len__(self) -> int:
        return len(self.array)

    def get(self, index: int) -> np.ndarray:
        return np.asarray(self.array[index])

    def get_batch(self, rows: np.ndarray) -> np.ndarray:
        """Many rows in one read, in increasing file order (memory-mapped pages are read sequentially)."""
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self.array.shape[1:]), dtype=np.uint8)
        out[order] = self.array[rows[order]]
        return out


@dataclass
class DecodingStore:
    """Pixels decoded from the source files each time (no cache, or data.use_cache=false)."""

    paths: list[str]
    size: int
    non_rgb: Literal["skip", "convert"]

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, index: int) -> np.ndarray:
        result = decode_image(self.paths[index], self.size, min_side=1, non_rgb=self.non_rgb)
        if result.array is None:  # the file changed after it was checked
            raise DataError(f"{self.paths[index]} became unreadable after it was checked: {result.reason}")
        return result.array


@dataclass
class IndexedArray:
    """A view of an array's rows `keep`, without copying it (the usable rows of a memory-mapped cache)."""

    base: np.ndarray
    keep: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.keep), *self.base.shape[1:])

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, index):  # an int or an array of rows
        return self.base[self.keep[index]]


@dataclass
class SubsetStore:
    """Rows `rows` of another store, in that order (a catalog restricted after splitting)."""

    base: ImageStore
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, index: int) -> np.ndarray:
        return self.base.get(int(self.rows[index]))

    def get_batch(self, rows: np.ndarray) -> np.ndarray:
        return read_batch(self.base, self.rows[rows])
