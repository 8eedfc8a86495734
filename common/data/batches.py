"""Batches that keep a GPU busy: one indexed read from the uint8 cache, sent as uint8, converted on the device.

A batch is a set of row positions. `BatchLoader` reads all of them from the image store in one
indexed read (the memory-mapped cache: no decoding), pins the uint8 array when the target is a
GPU, copies it there without blocking, and converts and augments it there (`common.augment`),
so the CPU only gathers bytes. With `prefetch` > 0 a background thread prepares the next batches
while the device computes. The same path serves training, the monitor and evaluation.

Row positions come from `shuffled_batches` (seeded by torch's global generator: a seeded run is
reproducible) or, under DP-SGD, `poisson_batches` (each image independently with probability
exactly q, from a secret generator: `common.privacy.secret_generator`).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from common.data.stores import ImageStore, read_batch

Augment = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ImageRows:
    """The rows of a store one job reads (e.g. a site's pretraining images), in order."""

    store: ImageStore
    rows: np.ndarray

    def __post_init__(self) -> None:
        self.rows = np.asarray(self.rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, positions: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) of rows[positions], in that order, in one read."""
        return read_batch(self.store, self.rows[np.asarray(positions, dtype=np.int64)])


def to_device_float(pixels: np.ndarray, device: torch.device, channels_last: bool = False,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1] on `device`; the bytes travel, the floats are made there."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixels))
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    images = tensor.permute(0, 3, 1, 2).to(dtype).div_(255.0)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images.contiguous()


def shuffled_batches(n: int, batch_size: int, min_size: int = 1) -> Iterator[np.ndarray]:
    """An epoch in random order (torch's global generator: seeded by the training loop); a last batch of fewer
    than `min_size` images is dropped (a hospital's min-batch-size: no plain step sees fewer images)."""
    order = torch.randperm(n).numpy()
    for start in range(0, n, batch_size):
        batch = order[start:start + batch_size]
        if len(batch) >= min_size:
            yield batch


def plain_batches_per_epoch(n: int, batch_size: int, min_size: int = 1) -> int:
    """How many batches `shuffled_batches` yields."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest and rest >= min_size else 0)


def poisson_batches(n: int, sample_rate: float, steps: int, generator: torch.Generator) -> Iterator[np.ndarray]:
    """DP-SGD's sampling: each batch takes every image independently with probability `sample_rate` (may be empty).

    float64 uniforms are k / 2^53: with `sample_rate` on that grid (`common.privacy.poisson_rate`) the
    inclusion probability is exactly `sample_rate`. Image i's draw is the i-th of the step's n draws
    whatever n is, so an image appended to the data set changes no other image's inclusion.
    """
    for _ in range(steps):
        yield torch.nonzero(torch.rand(n, generator=generator, dtype=torch.float64) < sample_rate).flatten().numpy()


def ordered_batches(n: int, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, n, batch_size):
        yield np.arange(start, min(n, start + batch_size))


class BatchLoader:
    """Row positions -> float image batches on the device, augmented there when asked."""

    def __init__(self, images: ImageRows, device: torch.device, augment: Optional[Augment] = None,
                 channels_last: bool = False, prefetch: int = 0, dtype: torch.dtype = torch.float32):
        self.images, self.device, self.augment = images, device, augment
        self.channels_last, self.prefetch, self.dtype = channels_last, prefetch, dtype

    def load(self, positions: np.ndarray) -> torch.Tensor:
        batch = to_device_float(self.images.read(positions), self.device, self.channels_last, self.dtype)
        return self.augment(batch) if self.augment is not None and len(batch) else batch

    def __call__(self, batches: Iterable[np.ndarray]) -> Iterator[torch.Tensor]:
        """Load each batch of positions; with `prefetch`, read the next ones in a background thread.

        Augmentation draws its random parameters in the consuming thread, in batch order, so that
        a seeded run is the same with and without prefetching.
        """
        batches = list(batches)  # drawn here, before any augmentation draws: one RNG order with or without prefetch
        if self.prefetch <= 0:
            for positions in batches:
                yield self.load(positions)
            return
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        done = object()
        stop = threading.Event()

        def produce() -> None:
            try:
                for positions in batches:
                    if stop.is_set():
                        return
                    pixels = self.images.read(positions)
                    ready.put(to_device_float(pixels, self.device, self.channels_last, self.dtype))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
                ready.put(exc)
            finally:
                ready.put(done)

        worker = threading.Thread(target=produce, name="dermfed-batches", daemon=True)
        worker.start()
        try:
            while (item := ready.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield self.augment(item) if self.augment is not None and len(item) else item
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)
