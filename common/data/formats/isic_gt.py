"""Any ISIC ground-truth CSV (e.g. ISIC 2018 Task 3), with an optional lesion-grouping CSV."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import pandas as pd

from common.data.catalog import Catalog, DataError, make_catalog
from common.data.formats import register_format
from common.data.formats.reading import (
    find_csv,
    group_or_image,
    image_paths,
    one_candidate,
    one_hot_labels,
    read_csv,
    require_root,
    walk_problems,
)
from common.data.images import index_image_files
from common.data.labels import canonical_column_name, ordered_classes

if TYPE_CHECKING:
    from common.config import DataConfig


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
    one_candidate(found, f"isic-gt: {len(found)} lesion-grouping CSVs (columns image, lesion_id) below {root}",
                   "a single one in data.root")
    if not found:
        return None
    groups = pd.read_csv(found[0], usecols=["image", "lesion_id"], dtype=str)
    return groups.assign(image=groups["image"].str.strip()).drop_duplicates("image").set_index("image")["lesion_id"]


@register_format("isic-gt", holds="an ISIC ground-truth CSV (column `image` plus one-hot class columns) and its image folder")
def load_isic_gt(cfg: DataConfig) -> Catalog:
    """Any ISIC ground-truth CSV: `image` column plus one-hot class columns (e.g. 2018 Task 3)."""
    root = require_root(cfg)
    if cfg.metadata_csv:
        csv_path = find_csv(root, cfg.metadata_csv, "", "isic-gt")
    else:
        candidates = sorted(root.rglob("*GroundTruth*.csv"))
        if not candidates:
            raise DataError(f"isic-gt: no *GroundTruth*.csv under {root}; set data.metadata_csv=PATH")
        one_candidate(candidates, f"isic-gt: {len(candidates)} *GroundTruth*.csv files below {root}",
                       "data.metadata_csv")
        csv_path = candidates[0]
    gt = read_csv(csv_path, ["image"], "isic-gt", ids=("image",))
    class_columns = [c for c in gt.columns if c not in {"image", "score_weight", "validation_weight"}]
    if not class_columns:
        raise DataError(f"isic-gt: {csv_path} has no class columns besides `image`")
    labels = one_hot_labels(gt, class_columns, "isic-gt", csv_path).map(canonical_column_name)
    groups = _lesion_groups(root, csv_path)
    lesion = gt["image"].map(groups) if groups is not None else pd.Series(None, index=gt.index)
    index, problems = index_image_files(root)
    rows = pd.DataFrame(
        {
            "image_id": gt["image"].astype(str),
            "path": image_paths(gt["image"], index, "isic-gt", root),
            "site": root.name,
            "group": group_or_image(lesion, gt["image"]),
            "label": labels,
        }
    )
    classes = ordered_classes(canonical_column_name(c) for c in class_columns)
    return make_catalog(rows, classes, "isic-gt", root, walk_problems(problems))
