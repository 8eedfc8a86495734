"""No arm may have seen an image that evaluation scores, not even without its label, not a copy of it
under another name, nor another image of a scored lesion.

Every pretraining checkpoint records which images it pretrained on (`extra.pretraining_images`:
normalised names, lesion or patient ids, the SHA-256 of each file and a difference hash of its
pixels, or why they are unknown); a run warm-started from another checkpoint records the union of
both (`common.pretraining.with_warm_start`). Names are compared as identities, never raw
(`common.data.identity`: file stem, case-insensitive), so an image read as
`HAM10000_images/ISIC_0024308.jpg` by the folder format is the `ISIC_0024308` of the HAM10000
format; contents are compared as equal file hashes or near-equal perceptual hashes of the pixels, so `Copy of
ISIC_0024308.jpg` is that image too.

A record is not taken on trust: where the checkpoint's own config lets its pretraining images be
rebuilt from data on this machine, they are, and an image, lesion or content hash the rebuild
finds but the record lacks is a refusal naming the checkpoint. Where they cannot be rebuilt, the
record is used as it is and the report says so. Older checkpoints that recorded raw names are
normalised when read; older ones without a record are rebuilt, or unknown.

Evaluation counts, per arm and split: images it pretrained on (same name, same file or same
pixels), and images it did not pretrain on whose lesion (or patient) it pretrained on through
another image ("same lesion"; None where either side has no lesion ids). It refuses an arm with
either in validation or test data, or in any external test set, naming the arm and the counts. An
external set must also share no image (by name or content) and no lesion with the source data set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from common.checkpoint import CheckpointError
from common.config import ConfigError
from common.data.catalog import Catalog, DataError
from common.data.identity import (
    CONTENT_RULE,
    IDENTITY_RULE,
    group_identities,
    group_identity,
    has_group_ids,
    image_identities,
    image_identity,
    pixel_matches,
    with_content,
)

log = logging.getLogger("dermfed.evaluate")

EXAMPLES = 3
COMPARED = f"names compared by {IDENTITY_RULE}; contents by {CONTENT_RULE}"
SETS = ("image_ids", "groups", "sha256", "phash")


class PretrainingLeak(DataError):
    """An arm pretrained on images (or lesions) that evaluation scores, or its record cannot be trusted."""


@dataclass(frozen=True)
class PretrainingImages:
    image_ids: Optional[frozenset[str]]  # normalised names; None: not known (a real federation's hospitals)
    groups: Optional[frozenset[str]]  # normalised lesion/patient ids; None: not recorded or not known
    source: str
    sha256: Optional[frozenset[str]] = None  # the files' SHA-256; None: not recorded (an older checkpoint)
    phash: Optional[frozenset[str]] = None  # the pixels' perceptual hashes; None: not recorded

    @property
    def known(self) -> bool:
        return self.image_ids is not None

    @property
    def empty(self) -> bool:
        """Known to hold no image at all (random init, ImageNet)."""
        return self.image_ids is not None and not self.image_ids


NO_PRETRAINING = PretrainingImages(frozenset(), frozenset(), "none: randomly initialised", frozenset(), frozenset())
EXTERNAL = PretrainingImages(frozenset(), frozenset(), "external: ImageNet-1k, not this data set", frozenset(), frozenset())
UNKNOWN = PretrainingImages(None, None, "unknown")


def _set(values: Any, normalise=str) -> Optional[frozenset[str]]:
    return None if values is None else frozenset(normalise(v) for v in values)


def identities_of(frame: pd.DataFrame, source: str, cache_dir: Optional[str] = None) -> PretrainingImages:
    """The identities of a catalog's rows (names, lesions where the data set has them, contents)."""
    frame = with_content(frame, cache_dir)
    return PretrainingImages(frozenset(image_identities(frame)),
                             frozenset(group_identities(frame).dropna()) if has_group_ids(frame) else None, source,
                             frozenset(frame["sha256"]), frozenset(frame["phash"].dropna()))


def _from_record(recorded: dict[str, Any], source: str) -> PretrainingImages:
    """A record as stored: normalised names (older records hold raw ones), lesions and contents where recorded."""
    groups = _set(recorded.get("groups"), group_identity)
    if groups is not None and not groups and recorded.get("image_ids"):
        groups = None  # images without a single lesion: a data set without lesion ids (older records wrote [])
    if "groups" not in recorded:
        source += " (an older record: images only, not their lesions)"
    elif groups is None:
        source += " (its data set has no lesion or patient ids)"
    if recorded.get("sha256") is None:
        source += " (an older record: names only, not contents)"
    return PretrainingImages(_set(recorded["image_ids"], image_identity), groups, source,
                             _set(recorded.get("sha256")), _set(recorded.get("phash")))


def _union(a: PretrainingImages, b: PretrainingImages, source: str) -> PretrainingImages:
    if not a.known or not b.known:
        return replace(UNKNOWN, source=source)

    def join(x: Optional[frozenset], y: Optional[frozenset]) -> Optional[frozenset]:
        return None if x is None or y is None else x | y

    return PretrainingImages(a.image_ids | b.image_ids, join(a.groups, b.groups), source,  # type: ignore[operator]
                             join(a.sha256, b.sha256), join(a.phash, b.phash))


def rebuild(config_tree: dict[str, Any], cache_dir: Optional[str]) -> tuple[Optional[PretrainingImages], str]:
    """A stage's own pretraining images rebuilt from its config and the data on this machine, or None and why not.

    Never generates data (a missing synthetic data set is absent, not redrawn); pixels and hashes go to this
    evaluation's cache folder, not the checkpoint's."""
    from common.config import build_config
    from common.data.pipeline import ensure_cache, prepare_data
    from common.pretraining import pretraining_indices

    try:
        config = build_config(config_tree)
    except (ConfigError, ValueError, TypeError) as exc:
        return None, f"its config cannot be read ({exc})"
    root = config.data.root
    if not root or not Path(root).exists():  # reading never generates: a missing synthetic data set stays missing
        return None, f"its data (data.root={root}) is not on this machine"
    if cache_dir:
        config = config.model_copy(update={"data": config.data.model_copy(update={"cache_dir": cache_dir})})
    try:
        ensure_cache(config.data)  # this evaluation's own cache folder; the data itself is never generated
        prepared = prepare_data(config)
    except (DataError, ConfigError, OSError, ValueError) as exc:
        return None, f"its data cannot be read here ({exc})"
    rows = pretraining_indices(prepared, config.data.pretrain_splits)
    images = identities_of(prepared.catalog.frame.iloc[rows], "rebuilt", cache_dir or config.data.cache_dir)
    if not has_group_ids(prepared.catalog.frame):
        images = replace(images, groups=None)
    return images, ""


def _contradiction(name: str, recorded: PretrainingImages, rebuilt: PretrainingImages) -> None:
    """Refuse a record that lacks what its own config's data shows it pretrained on."""
    lacking = {}
    for key in SETS:
        have, found = getattr(recorded, key), getattr(rebuilt, key)
        if have is not None and found is not None and found - have:
            lacking[key] = sorted(found - have)
    if lacking:
        words = {"image_ids": "images", "groups": "lesions or patients", "sha256": "file hashes", "phash": "pixel hashes"}
        counts = ", ".join(f"{len(v)} {words[k]} (e.g. {', '.join(v[:2])})" for k, v in lacking.items())
        raise PretrainingLeak(
            f"checkpoint {name}: its record of pretraining images lacks {counts} that its own config's data on this "
            "machine gives: the record was altered, or the data changed since it was pretrained. Its scores cannot be "
            "checked against the test images: evaluate on the data it was pretrained on, or pretrain it again")


def warm_start_of(payload: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The checkpoint a federated run started from: as recorded, or (checkpoints written before warm starts were
    recorded) read from `federation.initial_checkpoint` when that file is on this machine; {} when it is not."""
    recorded = (payload.get("extra") or {}).get("pretraining_images")
    if isinstance(recorded, dict) and isinstance(recorded.get("warm_start"), dict):
        return recorded["warm_start"]
    if "round" not in (payload.get("position") or {}):
        return None  # `dermfed pretrain` always starts from random weights
    path = ((payload.get("config") or {}).get("federation") or {}).get("initial_checkpoint")
    if not path:
        return None
    from common.pretraining import warm_start_stage

    try:
        return warm_start_stage(path)
    except (OSError, CheckpointError):
        return {"checkpoint": str(path)}


def pretraining_images(payload: dict[str, Any], cache_dir: Optional[str] = None, name: str = "") -> PretrainingImages:
    """What a checkpoint (or a warm-start stage) pretrained on: its record, checked against a rebuild from its own
    config where that data is on this machine (`PretrainingLeak` when the record lacks what the rebuild finds),
    together with everything its warm start saw."""
    name = name or "given"
    recorded = (payload.get("extra") or {}).get("pretraining_images")
    if isinstance(recorded, dict) and "unknown" in recorded:  # a real federation, or an unknown warm start
        return replace(UNKNOWN, source=f"unknown: {recorded['unknown']}")
    stage = warm_start_of(payload)
    inherited: Optional[PretrainingImages] = None
    if stage is not None:
        if "config" not in stage:
            return replace(UNKNOWN, source=f"unknown: warm-started from {stage.get('checkpoint')}, which is not on this "
                                           "machine, and the record does not include what it saw")
        inherited = pretraining_images(stage, cache_dir, f"{stage.get('checkpoint')} (the warm start of {name})")
    rebuilt, why = rebuild(payload["config"], cache_dir) if payload.get("config") else (None, "it has no config")
    if isinstance(recorded, dict) and "image_ids" in recorded:
        images = _from_record(recorded, "recorded in the checkpoint")
        if rebuilt is not None:
            _contradiction(name, images, rebuilt)
            images = _union(images, rebuilt, f"{images.source}, and verified against its data on this machine")
        else:
            images = replace(images, source=f"{images.source}; not verified: {why}")
        if inherited is not None and isinstance(recorded.get("warm_start"), dict):
            _contradiction(name, images, inherited)  # a composed record holds its warm start's images
    elif rebuilt is not None:
        images = replace(rebuilt, source="rebuilt from the checkpoint's data config and seed (it records none)")
    else:
        return replace(UNKNOWN, source=f"unknown: the checkpoint records none and {why}")
    if inherited is not None:
        images = _union(images, inherited, f"{images.source}; with its warm start's ({inherited.source})")
    return images


def _matches(images: PretrainingImages, frame: pd.DataFrame) -> dict[str, pd.Series]:
    """Per row of `frame`: same name, same file, same pixels as one of the arm's pretraining images."""
    names = image_identities(frame).isin(images.image_ids or frozenset())
    files = frame["sha256"].isin(images.sha256) if images.sha256 is not None else pd.Series(False, index=frame.index)
    pixels = pd.Series(pixel_matches(frame["phash"].tolist(), images.phash), index=frame.index) \
        if images.phash is not None else pd.Series(False, index=frame.index)
    return {"name": names, "file": files, "pixels": pixels}


def count_in(images: PretrainingImages, frame: pd.DataFrame) -> dict[str, Any]:
    """Rows of `frame` (with content columns) that are one of `images` by name, file or pixels ("images", and each
    way apart), and rows that are not but whose lesion or patient is ("same_lesion"); None where not known (or where
    either side has no lesion ids). Up to 3 example ids of each."""
    frame = with_content(frame, None)  # no-op where the caller added them (with its cache folder)
    if not images.known:
        return {"images": None, "by_name": None, "by_file": None, "by_pixels": None, "content_checked": False,
                "same_lesion": None, "examples": []}
    match = _matches(images, frame)
    seen = (match["name"] | match["file"] | match["pixels"]).to_numpy()
    ids = frame["image_id"].astype(str)
    examples = [f"{i}{'' if n else ' (same file)' if f else ' (same pixels)'}"
                for i, n, f in zip(ids[seen], match["name"][seen], match["file"][seen])][:EXAMPLES]
    result = {"images": int(seen.sum()), "by_name": int(match["name"].sum()), "by_file": int(match["file"].sum()),
              "by_pixels": int(match["pixels"].sum()), "content_checked": images.empty or images.sha256 is not None}
    if images.empty:
        return {**result, "same_lesion": 0, "examples": examples}
    groups = group_identities(frame)
    if images.groups is None or not groups.notna().any():
        return {**result, "same_lesion": None, "examples": examples}
    same = (~seen) & groups.isin(images.groups).to_numpy() & groups.notna().to_numpy()
    examples += [f"{i} (lesion {g})" for i, g in zip(ids[same].head(EXAMPLES), frame["group"].to_numpy()[same])]
    return {**result, "same_lesion": int(same.sum()), "examples": examples}


def _why_lesions_unknown(images: PretrainingImages, frame: pd.DataFrame) -> Optional[str]:
    if not images.known or images.empty:
        return None
    if images.groups is None:
        return "the arm's record holds no lesion or patient ids"
    if not group_identities(frame).notna().any():
        return "these test images have no lesion or patient ids"
    return None


def _header(images: PretrainingImages) -> dict[str, Any]:
    return {"source": images.source, "identity": IDENTITY_RULE, "content": CONTENT_RULE,
            "pretraining_images": None if images.image_ids is None else len(images.image_ids),
            "pretraining_groups": None if images.groups is None else len(images.groups)}


def overlap(images: PretrainingImages, catalog: Catalog) -> dict[str, Any]:
    """How many of the arm's pretraining images, and other images of its pretraining lesions, sit in each
    split of the evaluation's catalog (whose frame carries content columns)."""
    counts = _header(images)
    examples = []
    for split in ("train", "val", "test"):
        frame = catalog.frame[catalog.frame["split"] == split]
        found = count_in(images, frame)
        counts[split], counts[f"{split}_same_lesion"] = found["images"], found["same_lesion"]
        counts[f"{split}_by"] = {k: found[f"by_{k}"] for k in ("name", "file", "pixels")}
        examples += found["examples"] if split != "train" else []
        counts["content_checked"] = found["content_checked"]
        if split == "test":
            counts["lesions_not_compared"] = _why_lesions_unknown(images, frame)
    counts["examples"] = examples[:EXAMPLES]
    return counts


def external_overlap(images: PretrainingImages, frame: pd.DataFrame) -> dict[str, Any]:
    """How many images of an external set the arm pretrained on (name, file or pixels), or share a lesion with one it did."""
    found = count_in(images, frame)
    return {**_header(images), "test": found["images"], "test_by": {k: found[f"by_{k}"] for k in ("name", "file", "pixels")},
            "test_same_lesion": found["same_lesion"], "content_checked": found["content_checked"],
            "lesions_not_compared": _why_lesions_unknown(images, frame), "examples": found["examples"]}


def _same_lesion_words(counts: Any, where: str) -> str:
    if not counts:
        return ""
    return f", and on another image of the lesion (or patient) of {counts} {where}"


def _how(by: Optional[dict[str, Any]]) -> str:
    if not by or not any(by.values()):
        return ""
    return f" ({by['name']} by name, {by['file']} by file hash, {by['pixels']} by pixel hash)"


def refuse_leaks(key: str, label: str, counts: dict[str, Any]) -> None:
    """Refuse an arm that saw a validation or test image of the source split (or a copy, or another image of its lesion)."""
    test_lesion, val_lesion = counts.get("test_same_lesion") or 0, counts.get("val_same_lesion") or 0
    if counts["val"] or counts["test"] or test_lesion or val_lesion:
        same = (f", and on another image of the lesion (or patient) of {test_lesion} test and {val_lesion} validation "
                "images" if test_lesion or val_lesion else "")
        raise PretrainingLeak(
            f"arm {key} ({label}) pretrained on {counts['test']} test{_how(counts.get('test_by'))} and {counts['val']} "
            f"validation images of this evaluation{same} ({counts['source']}; {COMPARED}; e.g. "
            f"{', '.join(counts.get('examples', []))}); its scores would be optimistic. Evaluate with the data settings "
            "and seed it was pretrained with, or pretrain it again on this split's training images")
    _warn_unknown(key, counts, "the test split")


def refuse_external_leaks(key: str, label: str, name: str, counts: dict[str, Any]) -> None:
    """Refuse an arm that saw an image of an external test set (or a copy, or another image of one of its lesions)."""
    if counts["test"] or counts.get("test_same_lesion"):
        raise PretrainingLeak(
            f"arm {key} ({label}) pretrained on {counts['test']} images of external test set {name!r}"
            f"{_how(counts.get('test_by'))}{_same_lesion_words(counts.get('test_same_lesion'), 'of its images')} "
            f"({counts['source']}; {COMPARED}; e.g. {', '.join(counts['examples'])}). Every image of an external set is "
            "test data: score a set this arm never saw, or pretrain it without these images")
    _warn_unknown(key, counts, f"external set {name!r}")


def refuse_shared_with_source(name: str, counts: dict[str, Any]) -> None:
    """An external set must share no image (by name or content) and no lesion with the source the heads were trained
    and selected on."""
    if counts["images"] or counts["same_lesion"]:
        by = {k: counts[f"by_{k}"] for k in ("name", "file", "pixels")}
        raise DataError(
            f"external test set {name!r} shares {counts['images']} images with the source data set{_how(by)}"
            f"{_same_lesion_words(counts['same_lesion'], 'of its other images')} ({COMPARED}; "
            f"e.g. {', '.join(counts['examples'])}): the heads are trained and selected on the source, so these would "
            "not be external. Score a set disjoint from the source (e.g. point the entry's metadata_csv at a "
            "ground-truth file without those images)")


def _warn_unknown(key: str, counts: dict[str, Any], where: str) -> None:
    if counts["pretraining_images"] is None:
        log.warning("arm %s: its pretraining images are %s; they could not be checked against %s",
                    key, counts["source"], where)
