"""What every format's loader needs: the root, its metadata CSV read safely, each image id's one file.

Loaders find every image by its id anywhere below `data.root` (downloads split image folders
differently) and never resolve an ambiguity by the order of a folder walk. Nothing here decodes
or writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import pandas as pd

from common.data.catalog import DataError
from common.data.formats import get_format
from common.data.images import display_path

if TYPE_CHECKING:
    from common.config import DataConfig


def require_root(cfg: DataConfig) -> Path:
    """data.root as a folder that exists; a message naming what it must hold otherwise."""
    if not cfg.root:
        raise DataError(
            f"data.root is not set; for data.format={cfg.format} set data.root=DIR, the folder with "
            f"{get_format(cfg.format).holds}"
        )
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={cfg.root} is not a folder (expected {get_format(cfg.format).holds})")
    return root


def find_csv(root: Path, explicit: Optional[str], default_name: str, fmt: str) -> Path:
    """data.metadata_csv if set (relative to root), else the one file named `default_name` below root."""
    if explicit:
        path = Path(explicit).expanduser()
        path = path if path.is_absolute() else root / path
    else:
        matches = sorted(root.rglob(default_name))
        one_candidate(matches, f"{fmt}: {len(matches)} files named {default_name} below {root}", "data.metadata_csv")
        path = matches[0] if matches else root / default_name
    if not path.is_file():
        raise DataError(
            f"{fmt}: {path} not found; data.root must hold {get_format(fmt).holds} "
            "(or set data.metadata_csv=PATH)"
        )
    return path


def one_candidate(candidates: list[Path], what: str, key: str) -> None:
    """Two files that could each be the one meant: refuse to pick one by walk order."""
    if len(candidates) > 1:
        listed = ", ".join(str(c) for c in candidates[:5]) + (", ..." if len(candidates) > 5 else "")
        raise DataError(f"{what}: {listed}; which one is meant is ambiguous: set {key}=PATH, or move the others "
                        "out of data.root")


def read_csv(path: Path, required: list[str], fmt: str, ids: tuple[str, ...] = ()) -> pd.DataFrame:
    """The CSV with id columns read as text (an image named 0001 stays 0001) and text cells trimmed."""
    try:
        header = list(pd.read_csv(path, nrows=0).columns)
        frame = pd.read_csv(path, dtype={column: str for column in ids})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{fmt}: cannot read {path}: {exc}") from None
    repeated = sorted({_unmangled(c) for c in header if _unmangled(c) != c and _unmangled(c) in header})
    if repeated:  # pandas would rename the second to `dataset.1` and silently use the first
        raise DataError(f"{fmt}: {path} names column(s) {repeated} twice; keep one of each")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{fmt}: {path} lacks column(s) {missing}; it has {list(frame.columns)}")
    if frame.empty:
        raise DataError(f"{fmt}: {path} has a header but no rows; is it the complete file?")
    for column in frame.columns:  # " rosendahl" and "rosendahl " are the site rosendahl (README, "Data")
        if pd.api.types.is_string_dtype(frame[column]):  # and one Unicode form: "rösendahl" typed two ways is one
            frame[column] = frame[column].str.strip().str.normalize("NFC")
    return frame


def _unmangled(column: str) -> str:
    """pandas' name for a repeated header column is NAME.N; NAME it is."""
    name, dot, number = str(column).rpartition(".")
    return name if dot and number.isdigit() else str(column)


def walk_problems(problems: list[tuple[str, str]]) -> list[dict]:
    """What the folder walk could not use, as skipped catalog rows (counted in the summary)."""
    return [{"image_id": Path(path).name, "path": path, "site": None, "label": None, "reason": reason}
            for path, reason in problems]


def image_paths(image_ids: pd.Series, index: dict[str, list[Path]], fmt: str, root: Path) -> pd.Series:
    """The one file of each image id; an id that matches two files (a copy in thumbs/, a .png beside the .jpg)
    is an error listing them, never resolved by the order of the folder walk."""
    ids = image_ids.astype(str)
    ambiguous = sorted({i for i in ids if len(index.get(i, ())) > 1})
    if ambiguous:
        examples = "; ".join(f"{i}: {', '.join(display_path(p.relative_to(root)) for p in index[i])}"
                             for i in ambiguous[:3])
        raise DataError(f"{fmt}: {len(ambiguous)} image id(s) match more than one file below {root}, e.g. {examples}. "
                        "Keep one file per image (move copies, thumbnails and conversions out of data.root)")
    return ids.map(lambda image_id: index[image_id][0] if image_id in index else None)


SPLIT_VALUES = ("train", "val", "test")


def checked_splits(meta: pd.DataFrame, csv_path: Path, fmt: str) -> pd.Series:
    """A metadata `split` column, checked: every value train, val or test, and no lesion on two sides."""
    split = meta["split"]
    bad = split.isna() | ~split.astype(str).isin(SPLIT_VALUES)
    if bad.any():
        rows = [f"row {int(position) + 2} ({'empty' if pd.isna(value) else repr(value)})"
                for position, value in zip(np.flatnonzero(bad.to_numpy()), split[bad])][:5]
        raise DataError(f"{fmt}: {csv_path}: the `split` column must hold train, val or test in every row; "
                        f"{int(bad.sum())} row(s) do not: {', '.join(rows)}")
    groups = group_or_image(meta["lesion_id"], meta["image_id"])
    counts = split.groupby(groups).nunique()
    crossing = counts[counts > 1].index.tolist()
    if crossing:
        examples = ", ".join(f"{lesion} ({'/'.join(sorted(set(split[groups == lesion])))})" for lesion in crossing[:5])
        raise DataError(f"{fmt}: {csv_path}: {len(crossing)} lesion(s) lie on two sides of the `split` column, e.g. "
                        f"{examples}; one lesion's images must all be in one split (or remove the column to let "
                        "DermFed draw a grouped split)")
    return split.astype(str)


def group_or_image(groups: pd.Series, image_ids: pd.Series) -> pd.Series:
    """Lesion/patient id where known; an image without one is its own group."""
    return groups.where(groups.notna() & (groups.astype(str).str.len() > 0), image_ids).astype(str)


def one_hot_labels(frame: pd.DataFrame, columns: list[str], fmt: str, path: Path) -> pd.Series:
    """The class column holding 1 in each row (column `image` names the row in messages); anything else is an error."""
    numeric = frame[columns].apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna() & frame[columns].notna() | frame[columns].isna()
    if bad.to_numpy().any():
        row, column = next((r, c) for r, c in zip(*np.nonzero(bad.to_numpy())))
        raise DataError(f"{fmt}: {path}: the class columns must hold numbers (1 for the image's class, 0 otherwise); "
                        f"row {int(row) + 2} (image {frame['image'].iloc[row]!r}) has {frame[columns[column]].iloc[row]!r} "
                        f"in column {columns[column]!r}")
    values = numeric.to_numpy(dtype=float)
    not_binary = ~np.isin(values, (0.0, 1.0))
    if not_binary.any():  # 0.7/0.3 or -1/2 is not a label: never read as the larger one
        row, column = next((r, c) for r, c in zip(*np.nonzero(not_binary)))
        raise DataError(f"{fmt}: {path}: the class columns must hold 1 for the image's class and 0 otherwise; "
                        f"row {int(row) + 2} (image {frame['image'].iloc[row]!r}) has {values[row, column]:g} "
                        f"in column {columns[column]!r}")
    hot = (values == 1.0).sum(axis=1)
    if (hot != 1).any():
        bad = frame.loc[hot != 1, "image"].head(5).tolist()
        raise DataError(f"{fmt}: {path}: {int((hot != 1).sum())} rows are not one-hot, e.g. {bad}")
    return pd.Series([columns[i] for i in values.argmax(axis=1)], index=frame.index)
