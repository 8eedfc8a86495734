"""HAM10000 (Harvard Dataverse): `HAM10000_metadata.csv` (lesion_id, image_id, dx, ..., dataset = the site)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import pandas as pd

from common.data.catalog import Catalog, DataError, make_catalog
from common.data.formats import register_format
from common.data.formats.reading import (
    checked_splits,
    find_csv,
    group_or_image,
    image_paths,
    read_csv,
    require_root,
    walk_problems,
)
from common.data.images import index_image_files
from common.data.labels import HAM10000_DX, ordered_classes

if TYPE_CHECKING:
    from common.config import DataConfig


HAM10000_CSV = "HAM10000_metadata.csv"


def load_ham_layout(cfg: DataConfig, csv_name: str, fmt: str, extra_columns: tuple[str, ...] = ("split",)) -> Catalog:
    """HAM10000's metadata layout: lesion_id,image_id,dx,...,dataset (the site). A `split` column is the data set's
    own split (checked); `extra_columns` are carried into the catalog; any other column is ignored."""
    root = require_root(cfg)
    csv_path = find_csv(root, cfg.metadata_csv, csv_name, fmt)
    meta = read_csv(csv_path, ["lesion_id", "image_id", "dx", "dataset"], fmt, ids=("lesion_id", "image_id", "dataset"))
    unknown = sorted(map(str, set(meta["dx"]) - set(HAM10000_DX)))
    if unknown:
        raise DataError(f"{fmt}: {csv_path}: unknown dx codes {unknown}; known: {sorted(HAM10000_DX)}")
    if "split" in meta.columns:  # the data set's own split (the synthetic data's; or a user's), checked
        meta = meta.assign(split=checked_splits(meta, csv_path, fmt))
    index, problems = index_image_files(root)
    no_site = meta["dataset"].isna() | (meta["dataset"].astype(str).str.strip() == "")
    skipped = [{"image_id": str(i), "path": None, "site": None, "label": HAM10000_DX.get(dx),
                "reason": "no site in the metadata (empty `dataset`)"}
               for i, dx in zip(meta.loc[no_site, "image_id"], meta.loc[no_site, "dx"])]
    meta = meta[~no_site]
    rows = pd.DataFrame(
        {
            "image_id": meta["image_id"].astype(str),
            "path": image_paths(meta["image_id"], index, fmt, root),
            "site": meta["dataset"].astype(str),
            "group": group_or_image(meta["lesion_id"], meta["image_id"]),
            "label": meta["dx"].map(HAM10000_DX),
        }
    )
    for extra in extra_columns:
        if extra in meta.columns:
            rows[extra] = meta[extra].to_numpy()
    catalog = make_catalog(rows, ordered_classes(rows["label"]), fmt, root, skipped + walk_problems(problems))
    return replace(catalog, predefined_splits="split" in meta.columns)


@register_format("ham10000", holds=f"the HAM10000 download: {HAM10000_CSV} and the HAM10000_images* folders")
def load_ham10000(cfg: DataConfig) -> Catalog:
    """Columns besides the required ones and `split` (dx_type, age, sex, localization, ...) are ignored."""
    return load_ham_layout(cfg, HAM10000_CSV, "ham10000")
