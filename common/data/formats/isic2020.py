"""ISIC 2020 training set: binary melanoma target, grouped by patient."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from common.data.catalog import Catalog, DataError, make_catalog
from common.data.formats import register_format
from common.data.formats.reading import find_csv, group_or_image, image_paths, read_csv, require_root, walk_problems
from common.data.images import index_image_files
from common.data.labels import ISIC2020_TARGET, ordered_classes

if TYPE_CHECKING:
    from common.config import DataConfig


ISIC2020_CSV = "train.csv"


@register_format("isic2020", holds=f"the ISIC 2020 training download: {ISIC2020_CSV} and its jpeg/train/ images")
def load_isic2020(cfg: DataConfig) -> Catalog:
    """ISIC 2020 train.csv: binary `target` (1 = melanoma), grouped by patient."""
    root = require_root(cfg)
    csv_path = find_csv(root, cfg.metadata_csv, ISIC2020_CSV, "isic2020")
    meta = read_csv(csv_path, ["image_name", "patient_id", "target"], "isic2020", ids=("image_name", "patient_id"))
    bad = sorted(set(meta["target"].unique()) - set(ISIC2020_TARGET))
    if bad:
        raise DataError(f"isic2020: {csv_path}: target must be 0 or 1, found {bad}")
    index, problems = index_image_files(root)
    rows = pd.DataFrame(
        {
            "image_id": meta["image_name"].astype(str),
            "path": image_paths(meta["image_name"], index, "isic2020", root),
            "site": "ISIC2020",
            "group": group_or_image(meta["patient_id"], meta["image_name"]),
            "label": meta["target"].map(ISIC2020_TARGET),
        }
    )
    return make_catalog(rows, ordered_classes(ISIC2020_TARGET.values()), "isic2020", root, walk_problems(problems))
