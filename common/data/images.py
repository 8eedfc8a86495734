"""Decoding one image file safely: every way a real image folder goes wrong becomes a reason.

Hospitals' folders hold truncated JPEGs, grayscale scans, RGBA PNG exports, CMYK TIFFs, 16-bit
files, thumbnails and stray non-image files. None of them may crash training half-way, so each
file is checked once, up front, and either yields an RGB uint8 array or a short skip reason.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}

GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
ALPHA_OR_PALETTE_MODES = {"RGBA", "RGBa", "P", "PA", "La"}


@dataclass(frozen=True)
class DecodeResult:
    """Either an RGB uint8 array (H, W, 3) or why the file cannot be used."""

    array: Optional[np.ndarray]
    reason: Optional[str] = None
    converted_from: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.array is not None


def _colour_problem(image: Image.Image) -> Optional[str]:
    """Name what is not plain 8-bit RGB about an image, or None when it is."""
    if image.mode in GRAYSCALE_MODES:
        return "16-bit grayscale" if image.mode.startswith("I") else "grayscale"
    if image.mode in ALPHA_OR_PALETTE_MODES:
        return "RGBA/palette"
    if image.mode == "CMYK":
        return "CMYK"
    if image.mode != "RGB":
        return f"unsupported mode {image.mode}"
    raw_modes = [getattr(tile, "args", None) for tile in (image.tile or [])]
    if any(isinstance(raw, str) and ";16" in raw for raw in raw_modes):
        return "16-bit RGB"
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16") or image.mode == "I":
        wide = np.asarray(image, dtype=np.float64)
        top = 65535.0 if wide.max() > 255 else 255.0
        image = Image.fromarray(np.clip(wide / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode in {"RGBA", "LA", "PA", "P", "RGBa", "La"}:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def decode_image(
    path: str | Path,
    size: Optional[int] = None,
    min_side: int = 32,
    non_rgb: Literal["skip", "convert"] = "skip",
) -> DecodeResult:
    """Fully decode `path`; resize (shorter side, centre crop) to `size` when given."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                problem = _colour_problem(image)
                image.load()  # a truncated or corrupt file raises here, not later in training
                if min(image.size) < min_side:
                    return DecodeResult(None, f"too small ({image.size[0]}x{image.size[1]} < {min_side})")
                converted_from = None
                if problem is not None:
                    if non_rgb == "skip":
                        return DecodeResult(None, problem)
                    converted_from = problem
                    image = _to_rgb(image)
                image = ImageOps.exif_transpose(image)
                if size is not None:
                    image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
                array = np.asarray(image.convert("RGB"), dtype=np.uint8)
                return DecodeResult(np.ascontiguousarray(array), None, converted_from)
    except UnidentifiedImageError:
        return DecodeResult(None, "not an image")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return DecodeResult(None, "image too large (decompression bomb guard)")
    except FileNotFoundError:
        return DecodeResult(None, "image file missing")
    except PermissionError:
        return DecodeResult(None, "permission denied (the file is not readable for this user)")
    except (OSError, SyntaxError, ValueError) as exc:
        text = str(exc).lower()
        if "truncated" in text:
            return DecodeResult(None, "truncated")
        return DecodeResult(None, "corrupt")


def display_path(path: str | Path) -> str:
    """A path as text that can always be printed and written (undecodable bytes shown as \\xNN escapes)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _valid_name(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # bytes that are not UTF-8, carried by Python as surrogate escapes
        return False


def walk_files(root: str | Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every file below `root` (hidden ones aside), symbolic links followed once.

    Returns the files, in name order, and the (path, reason) of what could not be used: a link
    that leads nowhere or loops, a link to a folder that holds `root` (e.g. `/`: it would read the
    whole file system), a folder reached twice through links (read once), a second link to a file
    already found, a name that is not UTF-8, an unreadable folder.
    """
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    real_root = Path(os.path.realpath(root))
    seen_dirs: set[str] = set()
    seen_files: set[str] = set()

    def visit(directory: Path) -> None:
        real = os.path.realpath(directory)
        if real in seen_dirs:
            problems.append((display_path(directory), "symbolic link loop (folder already read)"))
            return
        seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: os.fsencode(entry.name))
        except OSError as exc:
            problems.append((display_path(directory), f"unreadable folder ({exc.strerror or type(exc).__name__})"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if not _valid_name(entry.name):
                problems.append((display_path(path), "name is not valid UTF-8: rename it"))
                continue
            if entry.is_symlink() and not os.path.exists(entry.path):
                problems.append((display_path(path), "broken symbolic link (it leads nowhere, or loops)"))
                continue
            try:
                if entry.is_dir(follow_symlinks=True):
                    if entry.is_symlink() and real_root.is_relative_to(os.path.realpath(path)):
                        problems.append((display_path(path), "link leads outside data.root"))  # to `/` or a parent
                        continue
                    visit(path)
                elif entry.is_file(follow_symlinks=True):
                    real_file = os.path.realpath(path)
                    if real_file in seen_files:
                        problems.append((display_path(path), "the same file as another path (symbolic link)"))
                        continue
                    seen_files.add(real_file)
                    files.append(path)
            except OSError:
                problems.append((display_path(path), "broken symbolic link (it leads nowhere, or loops)"))

    visit(Path(root))
    return files, problems


def index_image_files(root: str | Path) -> tuple[dict[str, list[Path]], list[tuple[str, str]]]:
    """Map file stem -> every image-suffixed file of that stem below `root` (any sub-folder, links followed).

    Official downloads split folders differently (HAM10000_images_part_1/_part_2,
    ISIC_2019_Training_Input/, jpeg/train/), so loaders find images by id, not by folder; an id
    with two files is the loader's to refuse. Also returns what `walk_files` could not use.
    """
    files, problems = walk_files(root)
    found: dict[str, list[Path]] = {}
    for path in files:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            found.setdefault(path.stem, []).append(path)
    return found, problems
