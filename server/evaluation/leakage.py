"""No arm may have seen an image that evaluation scores, not even without its label.

Every pretraining checkpoint records which images it pretrained on (`extra.pretraining_images`:
image ids, or why they are unknown). Older checkpoints are rebuilt from their own data config
and seed. Evaluation counts, per arm, how many of those fall in its train, validation and test
splits, and refuses an arm with any in validation or test, naming the arm and the counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from common.checkpoint import checkpoint_config
from common.data.catalog import Catalog, DataError

log = logging.getLogger("dermfed.evaluate")


class PretrainingLeak(DataError):
    """An arm pretrained on images of the evaluation's validation or test split."""


@dataclass(frozen=True)
class PretrainingImages:
    image_ids: Optional[frozenset[str]]  # None: not known (a real federation's hospitals)
    source: str


NO_PRETRAINING = PretrainingImages(frozenset(), "none: randomly initialised")
EXTERNAL = PretrainingImages(frozenset(), "external: ImageNet-1k, not this data set")


def pretraining_images(payload: dict[str, Any]) -> PretrainingImages:
    """What a checkpoint pretrained on: as recorded, or rebuilt from its config (older checkpoints)."""
    recorded = payload.get("extra", {}).get("pretraining_images")
    if isinstance(recorded, dict) and "image_ids" in recorded:
        return PretrainingImages(frozenset(map(str, recorded["image_ids"])), "recorded in the checkpoint")
    if isinstance(recorded, dict) and "unknown" in recorded:
        return PretrainingImages(None, f"unknown: {recorded['unknown']}")
    from common.data.pipeline import prepare_data
    from common.pretraining import pretraining_indices

    config = checkpoint_config(payload)
    try:
        prepared = prepare_data(config)
    except (DataError, OSError) as exc:
        return PretrainingImages(None, f"unknown: the checkpoint records none and its data cannot be rebuilt ({exc})")
    rows = pretraining_indices(prepared, config.data.pretrain_splits)
    return PretrainingImages(frozenset(prepared.catalog.frame["image_id"].iloc[rows].astype(str)),
                             "rebuilt from the checkpoint's data config and seed")


def overlap(images: PretrainingImages, catalog: Catalog) -> dict[str, Any]:
    """How many of the arm's pretraining images sit in each split of the evaluation's catalog."""
    counts: dict[str, Any] = {"source": images.source,
                              "pretraining_images": None if images.image_ids is None else len(images.image_ids)}
    for split in ("train", "val", "test"):
        ids = catalog.frame.loc[catalog.frame["split"] == split, "image_id"].astype(str)
        counts[split] = None if images.image_ids is None else int(ids.isin(images.image_ids).sum())
    return counts


def refuse_leaks(key: str, label: str, counts: dict[str, Any]) -> None:
    if counts["val"] or counts["test"]:
        raise PretrainingLeak(
            f"arm {key} ({label}) pretrained on {counts['test']} test and {counts['val']} validation images of this "
            f"evaluation ({counts['source']}); its scores would be optimistic. Evaluate with the data settings and seed "
            "it was pretrained with, or pretrain it again on this split's training images")
    if counts["pretraining_images"] is None:
        log.warning("arm %s: its pretraining images are %s; they could not be checked against the test split",
                    key, counts["source"])
