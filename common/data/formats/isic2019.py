"""ISIC 2019 training set, split into FLamby's six Fed-ISIC2019 centres."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import pandas as pd

from common.data.catalog import Catalog, DataError, make_catalog
from common.data.formats import register_format
from common.data.formats.ham10000 import HAM10000_CSV
from common.data.formats.reading import (
    find_csv,
    group_or_image,
    image_paths,
    one_hot_labels,
    read_csv,
    require_root,
    walk_problems,
)
from common.data.images import index_image_files
from common.data.labels import ISIC2019_COLUMNS, canonical_column_name, ordered_classes

if TYPE_CHECKING:
    from common.config import DataConfig


ISIC2019_GT_CSV = "ISIC_2019_Training_GroundTruth.csv"
ISIC2019_META_CSV = "ISIC_2019_Training_Metadata.csv"

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


@register_format("isic2019", holds=f"the ISIC 2019 training download: {ISIC2019_GT_CSV}, {ISIC2019_META_CSV} and "
                 "ISIC_2019_Training_Input/")
def load_isic2019(cfg: DataConfig) -> Catalog:
    """ISIC 2019 training set with FLamby's six-centre split (rows without a centre are skipped)."""
    root = require_root(cfg)
    gt_path = find_csv(root, cfg.metadata_csv, ISIC2019_GT_CSV, "isic2019")
    gt = read_csv(gt_path, ["image", *ISIC2019_COLUMNS], "isic2019", ids=("image",))
    meta_path = find_csv(root, None, ISIC2019_META_CSV, "isic2019")
    meta = read_csv(meta_path, ["image", "lesion_id"], "isic2019", ids=("image", "lesion_id"))
    ham_meta = None
    ham_path = Path(cfg.ham_metadata_csv).expanduser() if cfg.ham_metadata_csv else root / HAM10000_CSV
    if ham_path.is_file():
        ham_meta = read_csv(ham_path, ["image_id", "dataset"], "isic2019", ids=("image_id", "dataset"))
    elif cfg.ham_metadata_csv:
        raise DataError(f"isic2019: data.ham_metadata_csv={cfg.ham_metadata_csv} not found")
    for frame, path in ((gt, gt_path), (meta, meta_path)):
        twice = frame["image"][frame["image"].duplicated()].astype(str).unique().tolist()
        if twice:
            raise DataError(f"isic2019: {path} lists {len(twice)} image(s) more than once, e.g. {twice[:5]}; "
                            "keep one row per image")
    merged = gt.merge(meta[["image", "lesion_id"]], on="image", how="left", validate="one_to_one")
    labels = one_hot_labels(merged, list(ISIC2019_COLUMNS), "isic2019", gt_path).map(canonical_column_name)
    centre = _isic2019_centres(merged, ham_meta)
    index, problems = index_image_files(root)
    rows = pd.DataFrame(
        {
            "image_id": merged["image"].astype(str),
            "path": image_paths(merged["image"], index, "isic2019", root),
            "site": centre,
            "group": group_or_image(merged["lesion_id"], merged["image"]),
            "label": labels,
        }
    )
    no_centre = rows["site"].isna()
    skipped = rows[no_centre].assign(reason="no centre (FLamby split: lesion_id missing)")
    skipped = skipped[["image_id", "path", "site", "label"]].assign(reason=skipped["reason"])
    rows = rows[~no_centre]
    classes = [c for c in ordered_classes(ISIC2019_COLUMNS.values()) if c in set(rows["label"])]
    return make_catalog(rows, classes, "isic2019", root, skipped.to_dict("records") + walk_problems(problems))
