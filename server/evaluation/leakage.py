"""No arm may have seen an image that evaluation scores, not even without its label, nor another
image of a scored lesion.

Every pretraining checkpoint records which images it pretrained on (`extra.pretraining_images`:
normalised image identities and lesion or patient ids, or why they are unknown). Identities are
compared, never raw names (`common.data.identity`: file stem, case-insensitive), so an image read
as `HAM10000_images/ISIC_0024308.jpg` by the folder format is the `ISIC_0024308` of the HAM10000
format. Older checkpoints that recorded raw ids are normalised when read (without lesion ids);
older ones without a record are rebuilt from their own data config and seed.

Evaluation counts, per arm and split: images it pretrained on, and images it did not pretrain on
whose lesion (or patient) it pretrained on through another image ("same lesion"). It refuses an
arm with either in validation or test data, or in any external test set, naming the arm and the
counts. An external set must also share no image or lesion with the source data set the heads
were trained, selected and tested on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import pandas as pd

from common.checkpoint import checkpoint_config
from common.data.catalog import Catalog, DataError
from common.data.identity import IDENTITY_RULE, group_identities, group_identity, image_identities, image_identity

log = logging.getLogger("dermfed.evaluate")

EXAMPLES = 3


class PretrainingLeak(DataError):
    """An arm pretrained on images (or lesions) that evaluation scores."""


@dataclass(frozen=True)
class PretrainingImages:
    image_ids: Optional[frozenset[str]]  # normalised identities; None: not known (a real federation's hospitals)
    groups: Optional[frozenset[str]]  # normalised lesion/patient ids; None: not recorded or not known
    source: str

    @property
    def known(self) -> bool:
        return self.image_ids is not None


NO_PRETRAINING = PretrainingImages(frozenset(), frozenset(), "none: randomly initialised")
EXTERNAL = PretrainingImages(frozenset(), frozenset(), "external: ImageNet-1k, not this data set")


def identities_of(frame: pd.DataFrame, source: str) -> PretrainingImages:
    """The identities of a catalog's rows, as a pretraining record would hold them."""
    return PretrainingImages(frozenset(image_identities(frame)), frozenset(group_identities(frame).dropna()), source)


def pretraining_images(payload: dict[str, Any]) -> PretrainingImages:
    """What a checkpoint pretrained on: as recorded, or rebuilt from its config (older checkpoints)."""
    recorded = payload.get("extra", {}).get("pretraining_images")
    if isinstance(recorded, dict) and "image_ids" in recorded:
        ids = frozenset(image_identity(i) for i in recorded["image_ids"])  # older records hold raw names
        if "groups" in recorded:
            return PretrainingImages(ids, frozenset(group_identity(g) for g in recorded["groups"]),
                                     "recorded in the checkpoint")
        return PretrainingImages(ids, None, "recorded in the checkpoint (an older record: images only, not their lesions)")
    if isinstance(recorded, dict) and "unknown" in recorded:
        return PretrainingImages(None, None, f"unknown: {recorded['unknown']}")
    from common.data.pipeline import prepare_data
    from common.pretraining import pretraining_indices

    config = checkpoint_config(payload)
    try:
        prepared = prepare_data(config)
    except (DataError, OSError) as exc:
        return PretrainingImages(None, None, f"unknown: the checkpoint records none and its data cannot be rebuilt ({exc})")
    rows = pretraining_indices(prepared, config.data.pretrain_splits)
    return identities_of(prepared.catalog.frame.iloc[rows], "rebuilt from the checkpoint's data config and seed")


def count_in(images: PretrainingImages, frame: pd.DataFrame) -> dict[str, Any]:
    """Rows of `frame` that are one of `images` ("images"), and rows that are not but whose lesion or
    patient is ("same_lesion"); None where not known. Up to 3 example ids of each."""
    if not images.known:
        return {"images": None, "same_lesion": None, "examples": []}
    ids = image_identities(frame)
    seen = ids.isin(images.image_ids).to_numpy()
    examples = frame["image_id"].astype(str)[seen].head(EXAMPLES).tolist()
    if images.groups is None:
        return {"images": int(seen.sum()), "same_lesion": None, "examples": examples}
    groups = group_identities(frame)
    same = (~seen) & groups.isin(images.groups).to_numpy() & groups.notna().to_numpy()
    examples += [f"{i} (lesion {g})" for i, g in zip(frame["image_id"].astype(str)[same].head(EXAMPLES), frame["group"].to_numpy()[same])]
    return {"images": int(seen.sum()), "same_lesion": int(same.sum()), "examples": examples}


def overlap(images: PretrainingImages, catalog: Catalog) -> dict[str, Any]:
    """How many of the arm's pretraining images, and other images of its pretraining lesions, sit in each
    split of the evaluation's catalog."""
    counts: dict[str, Any] = {"source": images.source, "identity": IDENTITY_RULE,
                              "pretraining_images": None if images.image_ids is None else len(images.image_ids),
                              "pretraining_groups": None if images.groups is None else len(images.groups)}
    examples = []
    for split in ("train", "val", "test"):
        found = count_in(images, catalog.frame[catalog.frame["split"] == split])
        counts[split], counts[f"{split}_same_lesion"] = found["images"], found["same_lesion"]
        examples += found["examples"] if split != "train" else []
    counts["examples"] = examples[:EXAMPLES]
    return counts


def external_overlap(images: PretrainingImages, frame: pd.DataFrame) -> dict[str, Any]:
    """How many images of an external set the arm pretrained on, or share a lesion with one it did."""
    found = count_in(images, frame)
    return {"source": images.source, "identity": IDENTITY_RULE,
            "pretraining_images": None if images.image_ids is None else len(images.image_ids),
            "pretraining_groups": None if images.groups is None else len(images.groups),
            "test": found["images"], "test_same_lesion": found["same_lesion"], "examples": found["examples"]}


def _same_lesion_words(counts: dict[str, Any], where: str) -> str:
    if not counts:
        return ""
    return f", and on another image of the lesion (or patient) of {counts} {where}"


def refuse_leaks(key: str, label: str, counts: dict[str, Any]) -> None:
    """Refuse an arm that saw a validation or test image of the source split (or another image of its lesion)."""
    test_lesion, val_lesion = counts.get("test_same_lesion") or 0, counts.get("val_same_lesion") or 0
    if counts["val"] or counts["test"] or test_lesion or val_lesion:
        same = (f", and on another image of the lesion (or patient) of {test_lesion} test and {val_lesion} validation "
                "images" if test_lesion or val_lesion else "")
        raise PretrainingLeak(
            f"arm {key} ({label}) pretrained on {counts['test']} test and {counts['val']} validation images of this "
            f"evaluation{same} ({counts['source']}; images compared by {IDENTITY_RULE}; e.g. "
            f"{', '.join(counts.get('examples', []))}); its scores would be optimistic. Evaluate with the data settings "
            "and seed it was pretrained with, or pretrain it again on this split's training images")
    _warn_unknown(key, counts, "the test split")


def refuse_external_leaks(key: str, label: str, name: str, counts: dict[str, Any]) -> None:
    """Refuse an arm that saw an image of an external test set (or another image of one of its lesions)."""
    if counts["test"] or counts.get("test_same_lesion"):
        raise PretrainingLeak(
            f"arm {key} ({label}) pretrained on {counts['test']} images of external test set {name!r}"
            f"{_same_lesion_words(counts.get('test_same_lesion'), 'of its images')} ({counts['source']}; images "
            f"compared by {IDENTITY_RULE}; e.g. {', '.join(counts['examples'])}). Every image of an external set is "
            "test data: score a set this arm never saw, or pretrain it without these images")
    _warn_unknown(key, counts, f"external set {name!r}")


def refuse_shared_with_source(name: str, counts: dict[str, Any]) -> None:
    """An external set must share no image and no lesion with the source the heads were trained and selected on."""
    if counts["images"] or counts["same_lesion"]:
        raise DataError(
            f"external test set {name!r} shares {counts['images']} images with the source data set"
            f"{_same_lesion_words(counts['same_lesion'], 'of its other images')} (images compared by {IDENTITY_RULE}; "
            f"e.g. {', '.join(counts['examples'])}): the heads are trained and selected on the source, so these would "
            "not be external. Score a set disjoint from the source (e.g. point the entry's metadata_csv at a "
            "ground-truth file without those images)")


def _warn_unknown(key: str, counts: dict[str, Any], where: str) -> None:
    if counts["pretraining_images"] is None:
        log.warning("arm %s: its pretraining images are %s; they could not be checked against %s",
                    key, counts["source"], where)
