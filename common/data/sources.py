"""Loaders for the official dermoscopy data layouts, one function per `data.format`.

Each reads the metadata as published, finds every image by its id anywhere below `data.root`
(downloads split image folders differently), and returns a Catalog with site, lesion group
and canonical label. Nothing is decoded here: image checks happen once, in `cache.scan`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from common.config import DataConfig
from common.data.catalog import Catalog, DataError, make_catalog
from common.data.images import IMAGE_SUFFIXES, display_path, index_image_files, walk_files
from common.data.labels import (
    HAM10000_DX,
    ISIC2019_COLUMNS,
    ISIC2020_TARGET,
    canonical_column_name,
    ordered_classes,
)

HAM10000_CSV = "HAM10000_metadata.csv"
SYNTHETIC_CSV = "synthetic_metadata.csv"
ISIC2019_GT_CSV = "ISIC_2019_Training_GroundTruth.csv"
ISIC2019_META_CSV = "ISIC_2019_Training_Metadata.csv"
ISIC2020_CSV = "train.csv"

# FLamby's Fed-ISIC2019 centres: the lesion_id prefix names the source archive, and the HAM
# archive is split further by HAM10000's own `dataset` column.
FLAMBY_ISIC2019_CENTRES = (
    "BCN",
    "HAM_vidir_molemax",
    "HAM_vidir_modern",
    "HAM_rosendahl",
    "MSK",
    "HAM_vienna_dias",
)

HOW_TO_GET = {
    "ham10000": f"the HAM10000 download: {HAM10000_CSV} and the HAM10000_images* folders",
    "synthetic": f"the output of `dermfed data synth --out DIR` ({SYNTHETIC_CSV} and images/)",
    "isic2019": f"the ISIC 2019 training download: {ISIC2019_GT_CSV}, {ISIC2019_META_CSV} and "
    "ISIC_2019_Training_Input/",
    "isic-gt": "an ISIC ground-truth CSV (column `image` plus one-hot class columns) and its image folder",
    "isic2020": f"the ISIC 2020 training download: {ISIC2020_CSV} and its jpeg/train/ images",
    "folder": "a folder of dermoscopy images (sub-folders become sites)",
}


def _require_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise DataError(
            f"data.root is not set; for data.format={cfg.format} set data.root=DIR, the folder with "
            f"{HOW_TO_GET[cfg.format]}"
        )
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={cfg.root} is not a folder (expected {HOW_TO_GET[cfg.format]})")
    return root


def _find_csv(root: Path, explicit: Optional[str], default_name: str, fmt: str) -> Path:
    if explicit:
        path = Path(explicit).expanduser()
        path = path if path.is_absolute() else root / path
    else:
        matches = sorted(root.rglob(default_name))
        _one_candidate(matches, f"{fmt}: {len(matches)} files named {default_name} below {root}", "data.metadata_csv")
        path = matches[0] if matches else root / default_name
    if not path.is_file():
        raise DataError(
            f"{fmt}: {path} not found; data.root must hold {HOW_TO_GET[fmt]} "
            "(or set data.metadata_csv=PATH)"
        )
    return path


def _one_candidate(candidates: list[Path], what: str, key: str) -> None:
    """Two files that could each be the one meant: refuse to pick one by walk order."""
    if len(candidates) > 1:
        listed = ", ".join(str(c) for c in candidates[:5]) + (", ..." if len(candidates) > 5 else "")
        raise DataError(f"{what}: {listed}; which one is meant is ambiguous: set {key}=PATH, or move the others "
                        "out of data.root")


def _read_csv(path: Path, required: list[str], fmt: str, ids: tuple[str, ...] = ()) -> pd.DataFrame:
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


def _walk_problems(problems: list[tuple[str, str]]) -> list[dict]:
    """What the folder walk could not use, as skipped catalog rows (counted in the summary)."""
    return [{"image_id": Path(path).name, "path": path, "site": None, "label": None, "reason": reason}
            for path, reason in problems]


def _paths(image_ids: pd.Series, index: dict[str, list[Path]], fmt: str, root: Path) -> pd.Series:
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


def _checked_splits(meta: pd.DataFrame, csv_path: Path, fmt: str) -> pd.Series:
    """A metadata `split` column, checked: every value train, val or test, and no lesion on two sides."""
    split = meta["split"]
    bad = split.isna() | ~split.astype(str).isin(SPLIT_VALUES)
    if bad.any():
        rows = [f"row {int(position) + 2} ({'empty' if pd.isna(value) else repr(value)})"
                for position, value in zip(np.flatnonzero(bad.to_numpy()), split[bad])][:5]
        raise DataError(f"{fmt}: {csv_path}: the `split` column must hold train, val or test in every row; "
                        f"{int(bad.sum())} row(s) do not: {', '.join(rows)}")
    groups = _group_or_image(meta["lesion_id"], meta["image_id"])
    counts = split.groupby(groups).nunique()
    crossing = counts[counts > 1].index.tolist()
    if crossing:
        examples = ", ".join(f"{lesion} ({'/'.join(sorted(set(split[groups == lesion])))})" for lesion in crossing[:5])
        raise DataError(f"{fmt}: {csv_path}: {len(crossing)} lesion(s) lie on two sides of the `split` column, e.g. "
                        f"{examples}; one lesion's images must all be in one split (or remove the column to let "
                        "DermFed draw a grouped split)")
    return split.astype(str)


def _group_or_image(groups: pd.Series, image_ids: pd.Series) -> pd.Series:
    """Lesion/patient id where known; an image without one is its own group."""
    return groups.where(groups.notna() & (groups.astype(str).str.len() > 0), image_ids).astype(str)


def _one_hot_labels(frame: pd.DataFrame, columns: list[str], fmt: str, path: Path) -> pd.Series:
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


def load_ham_layout(cfg: DataConfig, csv_name: str, fmt: str) -> Catalog:
    """HAM10000 metadata layout: lesion_id,image_id,dx,...,dataset (the site)."""
    root = _require_root(cfg)
    csv_path = _find_csv(root, cfg.metadata_csv, csv_name, fmt)
    meta = _read_csv(csv_path, ["lesion_id", "image_id", "dx", "dataset"], fmt, ids=("lesion_id", "image_id", "dataset"))
    unknown = sorted(map(str, set(meta["dx"]) - set(HAM10000_DX)))
    if unknown:
        raise DataError(f"{fmt}: {csv_path}: unknown dx codes {unknown}; known: {sorted(HAM10000_DX)}")
    if "split" in meta.columns:  # the data set's own split (the synthetic data's; or a user's), checked
        meta = meta.assign(split=_checked_splits(meta, csv_path, fmt))
    index, problems = index_image_files(root)
    no_site = meta["dataset"].isna() | (meta["dataset"].astype(str).str.strip() == "")
    skipped = [{"image_id": str(i), "path": None, "site": None, "label": HAM10000_DX.get(dx),
                "reason": "no site in the metadata (empty `dataset`)"}
               for i, dx in zip(meta.loc[no_site, "image_id"], meta.loc[no_site, "dx"])]
    meta = meta[~no_site]
    rows = pd.DataFrame(
        {
            "image_id": meta["image_id"].astype(str),
            "path": _paths(meta["image_id"], index, fmt, root),
            "site": meta["dataset"].astype(str),
            "group": _group_or_image(meta["lesion_id"], meta["image_id"]),
            "label": meta["dx"].map(HAM10000_DX),
        }
    )
    # Columns read besides the required ones: `split` (checked above) in both formats; the synthetic data's
    # artefact flags only in its own format. Any other column (dx_type, age, sex, localization, ...) is ignored.
    for extra in ("split", "shortcut_artifact", "artifacts") if fmt == "synthetic" else ("split",):
        if extra in meta.columns:
            rows[extra] = meta[extra].to_numpy()
    catalog = make_catalog(rows, ordered_classes(rows["label"]), fmt, root, skipped + _walk_problems(problems))
    return replace(catalog, predefined_splits="split" in meta.columns)


def load_ham10000(cfg: DataConfig) -> Catalog:
    return load_ham_layout(cfg, HAM10000_CSV, "ham10000")


def load_synthetic(cfg: DataConfig) -> Catalog:
    """The embedded synthetic data: HAM10000's layout plus predefined splits and artefact flags."""
    return load_ham_layout(cfg, SYNTHETIC_CSV, "synthetic")


def _isic2019_centres(meta: pd.DataFrame, ham_meta: Optional[pd.DataFrame]) -> pd.Series:
    has_lesion = meta["lesion_id"].notna().to_numpy()
    prefix = meta["lesion_id"].fillna("").astype(str).str.split("_").str[0]
    centre = pd.Series(None, index=meta.index, dtype=object)
    centre[prefix == "BCN"] = "BCN"
    centre[prefix.str.startswith("MSK")] = "MSK"
    is_ham = prefix == "HAM"
    if ham_meta is not None:
        ham_site = meta["image"].map(ham_meta.set_index("image_id")["dataset"])
        centre[is_ham] = "HAM_" + ham_site[is_ham].astype(str)
        centre[is_ham & ham_site.isna()] = None
    else:
        centre[is_ham] = "HAM"
    centre[~has_lesion] = None
    return centre


def load_isic2019(cfg: DataConfig) -> Catalog:
    """ISIC 2019 training set with FLamby's six-centre split (rows without a centre are skipped)."""
    root = _require_root(cfg)
    gt_path = _find_csv(root, cfg.metadata_csv, ISIC2019_GT_CSV, "isic2019")
    gt = _read_csv(gt_path, ["image", *ISIC2019_COLUMNS], "isic2019", ids=("image",))
    meta_path = _find_csv(root, None, ISIC2019_META_CSV, "isic2019")
    meta = _read_csv(meta_path, ["image", "lesion_id"], "isic2019", ids=("image", "lesion_id"))
    ham_meta = None
    ham_path = Path(cfg.ham_metadata_csv).expanduser() if cfg.ham_metadata_csv else root / HAM10000_CSV
    if ham_path.is_file():
        ham_meta = _read_csv(ham_path, ["image_id", "dataset"], "isic2019", ids=("image_id", "dataset"))
    elif cfg.ham_metadata_csv:
        raise DataError(f"isic2019: data.ham_metadata_csv={cfg.ham_metadata_csv} not found")
    for frame, path in ((gt, gt_path), (meta, meta_path)):
        twice = frame["image"][frame["image"].duplicated()].astype(str).unique().tolist()
        if twice:
            raise DataError(f"isic2019: {path} lists {len(twice)} image(s) more than once, e.g. {twice[:5]}; "
                            "keep one row per image")
    merged = gt.merge(meta[["image", "lesion_id"]], on="image", how="left", validate="one_to_one")
    labels = _one_hot_labels(merged, list(ISIC2019_COLUMNS), "isic2019", gt_path).map(canonical_column_name)
    centre = _isic2019_centres(merged, ham_meta)
    index, problems = index_image_files(root)
    rows = pd.DataFrame(
        {
            "image_id": merged["image"].astype(str),
            "path": _paths(merged["image"], index, "isic2019", root),
            "site": centre,
            "group": _group_or_image(merged["lesion_id"], merged["image"]),
            "label": labels,
        }
    )
    no_centre = rows["site"].isna()
    skipped = rows[no_centre].assign(reason="no centre (FLamby split: lesion_id missing)")
    skipped = skipped[["image_id", "path", "site", "label"]].assign(reason=skipped["reason"])
    rows = rows[~no_centre]
    classes = [c for c in ordered_classes(ISIC2019_COLUMNS.values()) if c in set(rows["label"])]
    return make_catalog(rows, classes, "isic2019", root, skipped.to_dict("records") + _walk_problems(problems))


def _lesion_groups(root: Path, csv_path: Path) -> Optional[pd.Series]:
    """ISIC challenges publish lesion groupings in a separate CSV (image, lesion_id); two such files are ambiguous."""
    found = []
    for candidate in sorted(root.rglob("*.csv")):
        if candidate == csv_path:
            continue
        try:
            head = pd.read_csv(candidate, nrows=0)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError):
            continue
        if {"image", "lesion_id"} <= set(head.columns):
            found.append(candidate)
        elif "lesiongrouping" in candidate.name.lower().replace("_", ""):  # its groups would be silently lost
            raise DataError(f"isic-gt: {candidate} looks like a lesion-grouping file but has columns "
                            f"{list(head.columns)}; it needs `image` and `lesion_id` (rename them, or move the file "
                            "out of data.root)")
    _one_candidate(found, f"isic-gt: {len(found)} lesion-grouping CSVs (columns image, lesion_id) below {root}",
                   "a single one in data.root")
    if not found:
        return None
    groups = pd.read_csv(found[0], usecols=["image", "lesion_id"], dtype=str)
    return groups.assign(image=groups["image"].str.strip()).drop_duplicates("image").set_index("image")["lesion_id"]


def load_isic_gt(cfg: DataConfig) -> Catalog:
    """Any ISIC ground-truth CSV: `image` column plus one-hot class columns (e.g. 2018 Task 3)."""
    root = _require_root(cfg)
    if cfg.metadata_csv:
        csv_path = _find_csv(root, cfg.metadata_csv, "", "isic-gt")
    else:
        candidates = sorted(root.rglob("*GroundTruth*.csv"))
        if not candidates:
            raise DataError(f"isic-gt: no *GroundTruth*.csv under {root}; set data.metadata_csv=PATH")
        _one_candidate(candidates, f"isic-gt: {len(candidates)} *GroundTruth*.csv files below {root}",
                       "data.metadata_csv")
        csv_path = candidates[0]
    gt = _read_csv(csv_path, ["image"], "isic-gt", ids=("image",))
    class_columns = [c for c in gt.columns if c not in {"image", "score_weight", "validation_weight"}]
    if not class_columns:
        raise DataError(f"isic-gt: {csv_path} has no class columns besides `image`")
    labels = _one_hot_labels(gt, class_columns, "isic-gt", csv_path).map(canonical_column_name)
    groups = _lesion_groups(root, csv_path)
    lesion = gt["image"].map(groups) if groups is not None else pd.Series(None, index=gt.index)
    index, problems = index_image_files(root)
    rows = pd.DataFrame(
        {
            "image_id": gt["image"].astype(str),
            "path": _paths(gt["image"], index, "isic-gt", root),
            "site": root.name,
            "group": _group_or_image(lesion, gt["image"]),
            "label": labels,
        }
    )
    classes = ordered_classes(canonical_column_name(c) for c in class_columns)
    return make_catalog(rows, classes, "isic-gt", root, _walk_problems(problems))


def load_isic2020(cfg: DataConfig) -> Catalog:
    """ISIC 2020 train.csv: binary `target` (1 = melanoma), grouped by patient."""
    root = _require_root(cfg)
    csv_path = _find_csv(root, cfg.metadata_csv, ISIC2020_CSV, "isic2020")
    meta = _read_csv(csv_path, ["image_name", "patient_id", "target"], "isic2020", ids=("image_name", "patient_id"))
    bad = sorted(set(meta["target"].unique()) - set(ISIC2020_TARGET))
    if bad:
        raise DataError(f"isic2020: {csv_path}: target must be 0 or 1, found {bad}")
    index, problems = index_image_files(root)
    rows = pd.DataFrame(
        {
            "image_id": meta["image_name"].astype(str),
            "path": _paths(meta["image_name"], index, "isic2020", root),
            "site": "ISIC2020",
            "group": _group_or_image(meta["patient_id"], meta["image_name"]),
            "label": meta["target"].map(ISIC2020_TARGET),
        }
    )
    return make_catalog(rows, ordered_classes(ISIC2020_TARGET.values()), "isic2020", root, _walk_problems(problems))


def load_folder(cfg: DataConfig) -> Catalog:
    """A hospital's plain, unlabelled image folder; first-level sub-folders become sites.

    Symbolic links are followed once (`walk_files`); an image's id is its path below the root,
    suffix included, so `a.jpg` and `a.png` are two images.
    """
    root = _require_root(cfg)
    files, problems = walk_files(root)
    rows, skipped = [], _walk_problems(problems)
    for path in files:
        relative = path.relative_to(root)
        site = relative.parts[0] if len(relative.parts) > 1 else root.name
        image_id = str(relative)
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append({"image_id": image_id, "path": str(path), "site": site, "label": None, "reason": "not an image"})
            continue
        rows.append({"image_id": image_id, "path": path, "site": site, "group": image_id, "label": None})
    frame = pd.DataFrame(rows, columns=["image_id", "path", "site", "group", "label"])
    return make_catalog(frame, [], "folder", root, skipped)


LOADERS: dict[str, Callable[[DataConfig], Catalog]] = {
    "ham10000": load_ham10000,
    "isic2019": load_isic2019,
    "isic-gt": load_isic_gt,
    "isic2020": load_isic2020,
    "folder": load_folder,
    "synthetic": load_synthetic,
}


def load_catalog(cfg: DataConfig) -> Catalog:
    """The whole catalog for `data.format` at `data.root` (every site: `data.site` is applied after splitting)."""
    catalog = LOADERS[cfg.format](cfg)
    if len(catalog) == 0:
        reasons = ", ".join(f"{n} {reason}" for reason, n in catalog.skipped["reason"].value_counts().items())
        found = "no image file was found under" if cfg.format == "folder" else "no image of the metadata was found under"
        raise DataError(f"{cfg.format}: {found} {catalog.root} (skipped: {reasons or 'nothing'}); "
                        f"expected {HOW_TO_GET[cfg.format]}")
    return catalog
