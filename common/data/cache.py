"""Checking every image once and keeping it decoded: the preprocessing cache.

`scan` decodes each catalogued file once (in threads: PIL releases the GIL while decoding),
drops the unusable ones with a reason, and, with `data.use_cache`, writes the resized uint8
arrays to one memory-mapped `.npy` file keyed by the source files and the size. Later epochs,
rounds and runs read pixels from that file instead of decoding JPEGs again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional, Protocol

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from common.config import DataConfig
from common.data.catalog import SKIP_COLUMNS, Catalog, DataError
from common.data.images import decode_image

log = logging.getLogger("dermfed.data")

CACHE_FORMAT_VERSION = 1
MAX_WARNINGS_LISTED = 10


class ImageStore(Protocol):
    """Row i of the catalog -> RGB uint8 array (size, size, 3)."""

    def __len__(self) -> int: ...

    def get(self, index: int) -> np.ndarray: ...


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
    """Pixels decoded from the source files each time (data.use_cache=false)."""

    paths: list[str]
    size: int
    non_rgb: Literal["skip", "convert"]

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, index: int) -> np.ndarray:
        result = decode_image(self.paths[index], self.size, min_side=1, non_rgb=self.non_rgb)
        if result.array is None:  # the file changed after scan()
            raise DataError(f"{self.paths[index]} became unreadable after it was checked: {result.reason}")
        return result.array


def cache_key(paths: list[str], size: int, min_side: int, non_rgb: str) -> str:
    """Key by the source files (path, size in bytes, mtime) and the preprocessing settings."""
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_FORMAT_VERSION, size, min_side, non_rgb]).encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _decode_all(paths: list[str], cfg: DataConfig, sink: Optional[np.ndarray], desc: str) -> list[Optional[str]]:
    """Decode every path, write good ones into `sink[i]`, return per-path skip reasons."""

    def work(item: tuple[int, str]) -> tuple[int, Optional[str]]:
        i, path = item
        result = decode_image(path, cfg.image_size, cfg.min_image_side, cfg.non_rgb)
        if result.array is not None and sink is not None:
            sink[i] = result.array
        return i, result.reason

    reasons: list[Optional[str]] = [None] * len(paths)
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, reason in tqdm(pool.map(work, enumerate(paths)), total=len(paths), desc=desc, unit="img", leave=False,
                                  disable=None):
            reasons[i] = reason
    return reasons


def _warn_skipped(skipped: pd.DataFrame, source: str) -> None:
    for row in skipped.head(MAX_WARNINGS_LISTED).itertuples():
        log.warning("%s: skipped %s: %s", source, row.path, row.reason)
    if len(skipped) > MAX_WARNINGS_LISTED:
        log.warning("%s: ... and %d more skipped files", source, len(skipped) - MAX_WARNINGS_LISTED)


def _require_every_site(usable: pd.DataFrame, before: pd.DataFrame, skipped: pd.DataFrame, source: str) -> None:
    for site in sorted(set(before["site"]) - set(usable["site"])):
        reasons = skipped[skipped["site"] == site]["reason"].value_counts().to_dict()
        raise DataError(f"{source}: site {site!r} has no usable image ({reasons}); fix or remove its files")


def _load_or_build_cache(paths: list[str], cfg: DataConfig, source: str) -> tuple[np.ndarray, list[Optional[str]]]:
    key = cache_key(paths, cfg.image_size, cfg.min_image_side, cfg.non_rgb)
    folder = Path(cfg.cache_dir).expanduser() / f"{source}-{cfg.image_size}px-{key}"
    if (folder / "images.npy").is_file() and (folder / "status.json").is_file():
        reasons = json.loads((folder / "status.json").read_text())["reasons"]
        log.info("%s: using preprocessing cache %s", source, folder)
        return np.load(folder / "images.npy", mmap_mode="r"), reasons
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    try:
        sink = np.lib.format.open_memmap(
            staging / "images.npy", mode="w+", dtype=np.uint8, shape=(len(paths), cfg.image_size, cfg.image_size, 3)
        )
        reasons = _decode_all(paths, cfg, sink, desc=f"caching {source} at {cfg.image_size}px")
        sink.flush()
        del sink
        (staging / "status.json").write_text(json.dumps({"paths": paths, "reasons": reasons}))
        try:
            staging.rename(folder)
        except OSError:  # another process built the same cache meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return np.load(folder / "images.npy", mmap_mode="r"), reasons


def scan(catalog: Catalog, cfg: DataConfig) -> tuple[Catalog, ImageStore]:
    """Check every image once; return the usable catalog and where its pixels come from.

    Unusable files are moved to `catalog.skipped` with a reason and a warning; a site left
    with no usable image is an error, raised now rather than in the middle of training.
    """
    paths = catalog.frame["path"].tolist()
    if cfg.use_cache:
        pixels, reasons = _load_or_build_cache(paths, cfg, catalog.source)
    else:
        pixels, reasons = None, _decode_all(paths, cfg, None, desc=f"checking {catalog.source}")
    bad = np.array([reason is not None for reason in reasons], dtype=bool)
    frame = catalog.frame
    skipped = frame[bad].assign(reason=[r for r in reasons if r is not None])[SKIP_COLUMNS]
    _warn_skipped(skipped, catalog.source)
    usable = frame[~bad].reset_index(drop=True)
    _require_every_site(usable, frame, skipped, catalog.source)
    checked = replace(catalog, frame=usable).with_skipped(skipped)
    if pixels is not None:
        keep = np.flatnonzero(~bad)
        store: ImageStore = MemmapStore(pixels if len(keep) == len(paths) else _IndexedArray(pixels, keep))
    else:
        store = DecodingStore(usable["path"].tolist(), cfg.image_size, cfg.non_rgb)
    return checked, store


@dataclass
class _IndexedArray:
    """A view of the cache's rows `keep`, without copying the memory map."""

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
        from common.data.batches import read_batch

        return read_batch(self.base, self.rows[rows])
