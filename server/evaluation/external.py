"""External test sets: labelled data sets the heads never train or select on, scored as they are.

Every usable image of an external set is test data: no split is drawn there. Its labels are the
canonical names of `common/data/labels.py`, so a head trained on HAM10000 (`akiec`) scores ISIC
2018 Task 3 (`AKIEC`) and ISIC 2019 (`AK`) alike. Images of a class the heads were not trained on
have no column in the heads' output: they are excluded and counted per class (the report says so),
never scored as right or wrong. An external set must share no image and no lesion with the source
data set (`leakage.refuse_shared_with_source`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from common.config import DataConfig, ExternalSetConfig
from common.data.cache import build_cache, scan
from common.data.catalog import Catalog, DataError
from common.data.formats import load_catalog
from common.data.identity import with_content
from common.data.stores import ImageStore, SubsetStore
from server.evaluation.leakage import count_in, identities_of, refuse_shared_with_source


@dataclass
class ExternalSet:
    entry: ExternalSetConfig
    catalog: Catalog  # the scored images only (classes the heads know), every one in split "test"
    store: ImageStore  # pixels of the catalog's rows
    labels: np.ndarray  # class index (into the heads' classes) per row
    excluded_classes: dict[str, int]  # images of classes the heads were not trained on, per class
    skipped: dict[str, int]  # images that could not be used, per reason

    @property
    def name(self) -> str:
        return str(self.entry.name)

    def describe(self) -> dict[str, Any]:
        frame = self.catalog.frame
        has_groups = bool((frame["group"].astype(str) != frame["image_id"].astype(str)).any())
        return {"format": self.entry.format, "root": self.entry.root, "images": int(len(frame)),
                "groups": int(frame["group"].nunique()),
                "resampled": "lesions or patients" if has_groups else "images (this set has no lesion or patient ids)",
                "sites": sorted(frame["site"].unique().tolist()),
                "classes_present": [c for c in self.catalog.classes if c in set(frame["label"])],
                "excluded_classes": self.excluded_classes, "skipped": self.skipped}


def _data_config(entry: ExternalSetConfig, source: DataConfig) -> DataConfig:
    """The source's image settings (size, cache, checks) with the external set's layout and place."""
    return DataConfig.model_validate({**source.model_dump(), "format": entry.format, "root": entry.root,
                                      "metadata_csv": entry.metadata_csv, "ham_metadata_csv": entry.ham_metadata_csv,
                                      "site": None})


def load_external(entry: ExternalSetConfig, source: DataConfig, source_catalog: Catalog) -> ExternalSet:
    """Read, check and label-map one external set; refuse one that shares images or lesions with the source."""
    config = _data_config(entry, source)
    try:
        catalog = load_catalog(config)
        if not catalog.labelled:
            raise DataError(f"format {entry.format} holds no labels")
        build_cache(catalog, config)  # the writing step, explicit; scan only reads
        catalog, store = scan(catalog, config)
    except DataError as exc:
        raise DataError(f"external test set {entry.name!r} ({entry.format} at {entry.root}): {exc}") from None
    classes = source_catalog.classes
    known = catalog.frame["label"].isin(classes).to_numpy()
    excluded = {str(k): int(v) for k, v in catalog.frame.loc[~known, "label"].value_counts().items()}
    if not known.any():
        raise DataError(f"external test set {entry.name!r}: none of its {len(catalog)} images is of a class the heads "
                        f"are trained on ({', '.join(classes)}); its classes: {', '.join(catalog.classes)}")
    scored = catalog.subset(known)
    scored.frame["split"] = "test"
    scored = Catalog(with_content(scored.frame, source.cache_dir), classes, scored.source, scored.root, scored.skipped)
    refuse_shared_with_source(entry.name or "", count_in(identities_of(source_catalog.frame, "source", source.cache_dir),
                                                         scored.frame))
    labels = scored.label_indices().to_numpy()
    skipped = {str(k): int(v) for k, v in catalog.skipped["reason"].value_counts().items()} if len(catalog.skipped) else {}
    return ExternalSet(entry, scored, SubsetStore(store, np.flatnonzero(known)), labels, excluded, skipped)
