"""Checking every image once and keeping it decoded: the preprocessing cache.

Two steps, so that reading data never writes it. `build_cache` (the writing step, called by the
commands: `common.data.pipeline.ensure_cache`) decodes each catalogued file once (in threads: PIL
releases the GIL while decoding) and, with `data.use_cache`, writes the resized uint8 arrays to
one `.npy` file keyed by the source files and the size. `scan` (the reading step) drops the
unusable files with a reason and reads pixels from that file, memory-mapped, when it is there and
sound; otherwise it decodes the files and writes nothing. Later epochs, rounds and runs read pixels
from the cache instead of decoding JPEGs again.

A full disk is a message, never a crash: the free space is checked before building, the file is
written with plain writes (a write into a memory map on a full disk is a SIGBUS), and a failed or
interrupted build leaves nothing behind. A cache folder whose files do not match what it must
hold (a truncated `images.npy`, a torn `status.json`) is rebuilt with a warning that names it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from common.config import DataConfig
from common.data.catalog import SKIP_COLUMNS, Catalog, DataError
from common.data.images import DecodeResult, decode_image
from common.data.stores import DecodingStore, ImageStore, IndexedArray, MemmapStore

log = logging.getLogger("dermfed.data")

CACHE_FORMAT_VERSION = 1
MAX_WARNINGS_LISTED = 10
IMAGES_NAME = "images.npy"
STATUS_NAME = "status.json"


def cache_key(paths: list[str], size: int, min_side: int, non_rgb: str) -> str:
    """Key by the source files (path, size in bytes, mtime) and the preprocessing settings."""
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_FORMAT_VERSION, size, min_side, non_rgb]).encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _decode_all(paths: list[str], cfg: DataConfig, desc: str,
                sink: Optional[Callable[[Optional[np.ndarray]], None]] = None) -> list[Optional[str]]:
    """Decode every path (in threads); hand each result to `sink` in path order; return per-path skip reasons."""

    def work(path: str) -> DecodeResult:
        return decode_image(path, cfg.image_size, cfg.min_image_side, cfg.non_rgb)

    reasons: list[Optional[str]] = []
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for result in tqdm(pool.map(work, paths), total=len(paths), desc=desc, unit="img", leave=False,
                               disable=None):
                if sink is not None:
                    sink(result.array)
                reasons.append(result.reason)
        except BaseException:  # an interrupt or a full disk: do not decode the rest before stopping
            pool.shutdown(wait=False, cancel_futures=True)
            raise
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


class CacheUnusable(Exception):
    """A cache folder that cannot be trusted (torn or truncated files); it is rebuilt."""


def _read_cache(folder: Path, paths: list[str], size: int) -> tuple[np.ndarray, list[Optional[str]]]:
    """The cache in `folder`, checked against what it must hold: its status, its array's shape and its file size."""
    try:
        status = json.loads((folder / STATUS_NAME).read_text())
    except FileNotFoundError:
        raise CacheUnusable(f"{STATUS_NAME} is missing") from None
    except (ValueError, UnicodeDecodeError):
        raise CacheUnusable(f"{STATUS_NAME} is not valid JSON (torn by a crash?)") from None
    if not isinstance(status, dict) or status.get("paths") != paths or len(status.get("reasons") or ()) != len(paths):
        raise CacheUnusable(f"{STATUS_NAME} does not describe these {len(paths)} images")
    expected = (len(paths), size, size, 3)
    try:
        pixels = np.load(folder / IMAGES_NAME, mmap_mode="r")
    except FileNotFoundError:
        raise CacheUnusable(f"{IMAGES_NAME} is missing") from None
    except (ValueError, EOFError) as exc:  # a truncated file: "mmap length is greater than file size"
        raise CacheUnusable(f"{IMAGES_NAME} is truncated or damaged ({exc})") from None
    if pixels.shape != expected or pixels.dtype != np.uint8:
        raise CacheUnusable(f"{IMAGES_NAME} holds {pixels.dtype} {pixels.shape}, not uint8 {expected}")
    return pixels, status["reasons"]


_CACHE_PROBLEMS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                   errno.EEXIST: "a file is in the way: it, or a folder above it, is a file",
                   errno.ENOTDIR: "a file is in the way: a folder above it is a file",
                   errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                   errno.EROFS: "read-only file system"}


def _cache_error(cfg: DataConfig, folder: Path, exc: OSError) -> DataError:
    problem = _CACHE_PROBLEMS.get(exc.errno, exc.strerror or str(exc))
    return DataError(f"data.cache_dir={cfg.cache_dir}: cannot write the preprocessing cache in {folder} ({problem}); "
                     "free space there, set data.cache_dir to a writable folder on a disk with room, or set "
                     "data.use_cache=false")


def _remove_abandoned_builds(parent: Path) -> None:
    """Staging folders of builds whose process is gone (killed outright) would fill the disk over time."""
    for staging in parent.glob(".building-*-*"):
        pid = staging.name.split("-")[1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _build_cache(paths: list[str], cfg: DataConfig, source: str, parent: Path, folder: Path) -> None:
    """Decode every image into a staging folder, written with plain writes (a memory map turns a full disk
    into SIGBUS), and rename it into place; on any failure the staging folder is removed."""
    shape = (len(paths), cfg.image_size, cfg.image_size, 3)
    needed = int(np.prod(shape)) + len(json.dumps(paths)) + 2 * len(paths) + 2**16
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_builds(parent)
        free = shutil.disk_usage(parent).free
        if free < needed:
            raise DataError(f"data.cache_dir={cfg.cache_dir}: the preprocessing cache of {len(paths)} images needs "
                            f"{needed / 2**20:.1f} MiB in {parent}, but only {free / 2**20:.1f} MiB are free; free "
                            "space there, set data.cache_dir to a folder on a disk with room, or set data.use_cache=false")
        staging = Path(tempfile.mkdtemp(prefix=f".building-{os.getpid()}-", dir=parent))
    except OSError as exc:
        raise _cache_error(cfg, parent, exc) from None
    try:
        blank = bytes(cfg.image_size * cfg.image_size * 3)
        with open(staging / IMAGES_NAME, "wb") as stream:
            np.lib.format.write_array_header_1_0(
                stream, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                         "shape": shape})

            def write(array: Optional[np.ndarray]) -> None:
                stream.write(blank if array is None else np.ascontiguousarray(array, dtype=np.uint8).tobytes())

            reasons = _decode_all(paths, cfg, f"caching {source} at {cfg.image_size}px", write)
            stream.flush()
            os.fsync(stream.fileno())
        (staging / STATUS_NAME).write_text(json.dumps({"paths": paths, "reasons": reasons}))
        try:
            staging.rename(folder)
        except OSError:  # another process built the same cache meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise _cache_error(cfg, parent, exc) from None
    except BaseException:  # an interrupt, or a decoding failure: nothing half-built stays behind
        shutil.rmtree(staging, ignore_errors=True)
        raise


def cache_folder(paths: list[str], cfg: DataConfig, source: str) -> Path:
    """Where the cache of these files at these settings lives (its name carries the key)."""
    key = cache_key(paths, cfg.image_size, cfg.min_image_side, cfg.non_rgb)
    return Path(cfg.cache_dir).expanduser() / f"{source}-{cfg.image_size}px-{key}"


def _existing_cache(folder: Path, paths: list[str], cfg: DataConfig) -> tuple[Optional[tuple[np.ndarray, list]], str]:
    """The cache in `folder` when it is there and sound, else None and why not ("" when there is none)."""
    if not folder.is_dir():
        return None, ""
    try:
        return _read_cache(folder, paths, cfg.image_size), ""
    except CacheUnusable as why:
        return None, str(why)


def build_cache(catalog: Catalog, cfg: DataConfig) -> Optional[Path]:
    """The writing step: make sure the preprocessing cache of `catalog` exists and is sound, building it (or
    rebuilding a damaged one) when not; its folder, or None with `data.use_cache=false`. `scan` then reads it."""
    if not cfg.use_cache:
        return None
    paths = catalog.frame["path"].tolist()
    source = catalog.source
    folder = cache_folder(paths, cfg, source)
    cached, damage = _existing_cache(folder, paths, cfg)
    if cached is not None:
        log.info("%s: using preprocessing cache %s", source, folder)
        return folder
    if damage:
        log.warning("%s: the preprocessing cache %s is unusable (%s); rebuilding it", source, folder, damage)
        shutil.rmtree(folder, ignore_errors=True)
    _build_cache(paths, cfg, source, folder.parent, folder)
    try:
        _read_cache(folder, paths, cfg.image_size)
    except CacheUnusable as why:  # only if another process wrote a bad one between our rename and this read
        raise DataError(f"the preprocessing cache {folder} is unusable right after it was built ({why}); remove it "
                        "and run again") from None
    return folder


def scan(catalog: Catalog, cfg: DataConfig) -> tuple[Catalog, ImageStore]:
    """Check every image once; return the usable catalog and where its pixels come from. Writes nothing.

    With `data.use_cache` and a sound cache (`build_cache`), its checks and pixels are read; without one
    every file is decoded here and again when read. Unusable files are moved to `catalog.skipped` with a
    reason and a warning; a site left with no usable image is an error, raised now rather than in the
    middle of training.
    """
    paths = catalog.frame["path"].tolist()
    cached, damage = _existing_cache(cache_folder(paths, cfg, catalog.source), paths, cfg) if cfg.use_cache else (None, "")
    if cached is not None:
        pixels, reasons = cached
    else:
        if cfg.use_cache:
            log.info("%s: %s; decoding the images instead (the commands build it first: "
                     "common.data.pipeline.ensure_cache)", catalog.source,
                     f"the preprocessing cache is unusable ({damage})" if damage else
                     f"no preprocessing cache in {cfg.cache_dir}")
        pixels, reasons = None, _decode_all(paths, cfg, desc=f"checking {catalog.source}")
    bad = np.array([reason is not None for reason in reasons], dtype=bool)
    frame = catalog.frame
    skipped = frame[bad].assign(reason=[r for r in reasons if r is not None])[SKIP_COLUMNS]
    _warn_skipped(skipped, catalog.source)
    usable = frame[~bad].reset_index(drop=True)
    _require_every_site(usable, frame, skipped, catalog.source)
    checked = replace(catalog, frame=usable).with_skipped(skipped)
    if pixels is not None:
        keep = np.flatnonzero(~bad)
        store: ImageStore = MemmapStore(pixels if len(keep) == len(paths) else IndexedArray(pixels, keep))
    else:
        store = DecodingStore(usable["path"].tolist(), cfg.image_size, cfg.non_rgb)
    return checked, store
