"""One image, one identity, whatever format read it and whatever name a copy carries: what the
evaluation's leak guard compares.

By name. Each format names an image its own way: HAM10000 and the ISIC CSVs by id
(`ISIC_0024308`), the folder format by its path below the root (`HAM10000_images/ISIC_0024308.jpg`),
a copy may carry another case (`isic_0024308.JPG`). An image's name identity is its file stem,
case-insensitive: the last path component, without an image suffix (`.jpg`, `.png`, ...) and
without ISIC 2019's `_downsampled` tag, lower-cased. Two images of one data set that differ only in
suffix or folder (`a/x.jpg`, `b/x.png`) share an identity; for a leak check that errs on the side of
refusing.

By content, for copies under another name (`Copy of ISIC_0024308.jpg`, `17.jpg`):
- the SHA-256 of the file's bytes (a byte-identical copy, whatever its name);
- a 64-bit perceptual hash of its decoded pixels (`perceptual_hash`, the DCT hash of imagehash's
  `phash`): the image, turned upright by its EXIF orientation, converted to 8-bit grayscale (PIL's
  "L"), reduced to 32 x 32 pixels by area averaging (PIL's BOX filter), its 2-D DCT (type II,
  orthonormal), and one bit per coefficient of the lowest 8 x 8 frequencies, 1 where it exceeds
  their median; written as 16 hexadecimal digits. Two images match when their hashes differ in at
  most `PIXEL_MATCH_BITS` bits. On the HAM10000 sample (705 images) this finds every copy resized
  to 224 x 224 and saved as PNG, and 645 of 705 copies resized to a third and re-encoded as JPEG
  at quality 60; 1 of 248,000 pairs of images of different lesions was that close. A copy that
  is cropped, rotated or edited is not found: the guard catches copies, not adversarial edits.

Both are computed once per file and kept in `<data.cache_dir>/content-identity.json`, keyed by the
file's absolute path, size and modification time (as the preprocessing cache is).

Lesion and patient ids (the catalog's `group`) are normalised like names (stripped, lower-cased)
where a data set has them; an image without one (its group is its own id) has no group identity,
so two such images are only ever compared by image identity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from scipy.fft import dctn

from common.data.images import IMAGE_SUFFIXES
from common.run_files import atomic_write_text

log = logging.getLogger("dermfed.data")

IDENTITY_RULE = "file stem, case-insensitive (folders, image suffix and ISIC's _downsampled tag dropped)"
PIXEL_MATCH_BITS = 2  # a perceptual hash within this many bits of another is the same picture
CONTENT_RULE = ("file content: equal SHA-256 of the bytes, or 64-bit DCT perceptual hashes of the pixels within "
                f"{PIXEL_MATCH_BITS} bits (a resized or re-encoded copy)")
CONTENT_CACHE = "content-identity.json"
HASH_SIZE = 8  # the lowest 8 x 8 DCT frequencies: 64 bits
HASH_SCALE = 4  # of a 32 x 32 image
_SUFFIX = re.compile("(" + "|".join(re.escape(s) for s in sorted(IMAGE_SUFFIXES)) + r")$", re.IGNORECASE)
_DOWNSAMPLED = re.compile(r"_downsampled$", re.IGNORECASE)


def image_identity(image_id: str) -> str:
    """`HAM10000_images/ISIC_0024308.jpg`, `ISIC_0024308` and `isic_0024308.JPG` -> `isic_0024308`."""
    name = str(image_id).strip().replace("\\", "/").rsplit("/", 1)[-1]
    name = _SUFFIX.sub("", name)
    return _DOWNSAMPLED.sub("", name).lower()


def group_identity(group: str) -> str:
    return str(group).strip().lower()


def image_identities(frame: pd.DataFrame) -> pd.Series:
    """The identity of every catalog row."""
    return frame["image_id"].astype(str).map(image_identity)


def group_identities(frame: pd.DataFrame) -> pd.Series:
    """The lesion/patient identity of every catalog row; None where the row has no lesion or patient id
    (the loaders then make the image its own group)."""
    groups, images = frame["group"].astype(str), frame["image_id"].astype(str)
    return pd.Series([group_identity(g) if g != i else None for g, i in zip(groups, images)], index=frame.index, dtype=object)


def has_group_ids(frame: pd.DataFrame) -> bool:
    """Whether any row has a lesion or patient id (a format without them gives every image its own group)."""
    return bool(group_identities(frame).notna().any())


def perceptual_hash(image: Image.Image) -> str:
    """The 64-bit DCT perceptual hash of an image (see the module docstring), as 16 hexadecimal digits."""
    side = HASH_SIZE * HASH_SCALE
    gray = ImageOps.exif_transpose(image).convert("L").resize((side, side), Image.Resampling.BOX)
    low = dctn(np.asarray(gray, dtype=np.float64), type=2, norm="ortho")[:HASH_SIZE, :HASH_SIZE]
    bits = (low > np.median(low)).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def pixel_matches(hashes: Sequence[Optional[str]], known: Iterable[str], max_bits: int = PIXEL_MATCH_BITS) -> np.ndarray:
    """Per hash: whether one of `known` is within `max_bits` bits of it (False for None: an undecodable file)."""
    reference = np.array(sorted({int(h, 16) for h in known}), dtype=np.uint64)
    result = np.zeros(len(hashes), dtype=bool)
    present = [i for i, h in enumerate(hashes) if h is not None and isinstance(h, str)]
    if not len(reference) or not present:
        return result
    values = np.array([int(hashes[i], 16) for i in present], dtype=np.uint64)
    chunk = max(1, 4_000_000 // len(reference))  # bounded memory: chunk x reference bit counts at a time
    found = np.concatenate([(np.bitwise_count(values[i:i + chunk, None] ^ reference[None, :]) <= max_bits).any(axis=1)
                            for i in range(0, len(values), chunk)])
    result[present] = found
    return result


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_content(path: str | Path) -> tuple[str, Optional[str]]:
    """(SHA-256 of the bytes, difference hash of the pixels); the hash is None where the file does not decode."""
    digest = file_sha256(path)
    try:
        with Image.open(path) as image:
            return digest, perceptual_hash(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return digest, None


def _key(path: str) -> str:
    stat = os.stat(path)
    return f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}"


def content_identities(paths: list[str], cache_dir: Optional[str | Path]) -> pd.DataFrame:
    """`sha256` and `phash` of every path (rows in order), computed once per file and kept in the cache folder."""
    cache = Path(cache_dir).expanduser() / CONTENT_CACHE if cache_dir else None
    known: dict[str, list] = {}
    if cache is not None and cache.is_file():
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError):
            known = {}  # a torn or foreign file: computed again
    keys = [_key(p) for p in paths]
    missing = sorted({(k, p) for k, p in zip(keys, paths) if k not in known})
    if missing:
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            for (key, _), content in zip(missing, pool.map(lambda item: file_content(item[1]), missing)):
                known[key] = list(content)
        if cache is not None:
            _write_atomically(cache, known)
    return pd.DataFrame({"sha256": [known[k][0] for k in keys], "phash": [known[k][1] for k in keys]})


def _write_atomically(path: Path, content: dict) -> None:
    try:
        atomic_write_text(path, json.dumps(content))
    except OSError as exc:  # a read-only cache folder costs time, not correctness
        log.warning("could not keep content hashes in %s (%s); they are computed again next time", path, exc)


def with_content(frame: pd.DataFrame, cache_dir: Optional[str | Path]) -> pd.DataFrame:
    """The catalog frame with `sha256` and `phash` columns (kept if already there)."""
    if {"sha256", "phash"} <= set(frame.columns):
        return frame
    content = content_identities(frame["path"].astype(str).tolist(), cache_dir)
    return frame.assign(sha256=content["sha256"].to_numpy(), phash=content["phash"].to_numpy())
