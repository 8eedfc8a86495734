"""One image, one identity, whatever format read it: what the evaluation's leak guard compares.

Each format names an image its own way: HAM10000 and the ISIC CSVs by id (`ISIC_0024308`), the
folder format by its path below the root (`HAM10000_images/ISIC_0024308.jpg`), a copy may carry
another case (`isic_0024308.JPG`). An image's identity is its file stem, case-insensitive: the
last path component, without an image suffix (`.jpg`, `.png`, ...) and without ISIC 2019's
`_downsampled` tag, lower-cased. Two images of one data set that differ only in suffix or folder
(`a/x.jpg`, `b/x.png`) share an identity; for a leak check that errs on the side of refusing.

Lesion and patient ids (the catalog's `group`) are normalised the same way (stripped,
lower-cased) where a data set has them; an image without one (its group is its own id) has no
group identity, so two such images are only ever compared by image identity.
"""

from __future__ import annotations

import re

import pandas as pd

from common.data.images import IMAGE_SUFFIXES

IDENTITY_RULE = "file stem, case-insensitive (folders, image suffix and ISIC's _downsampled tag dropped)"
_SUFFIX = re.compile("(" + "|".join(re.escape(s) for s in sorted(IMAGE_SUFFIXES)) + r")$", re.IGNORECASE)
_DOWNSAMPLED = re.compile(r"_downsampled$", re.IGNORECASE)


def image_identity(image_id: str) -> str:
    """`HAM10000_images/ISIC_0024308.jpg`, `ISIC_0024308` and `isic_0024308.JPG` -> `isic_0024308`."""
    name = str(image_id).strip().replace("\\", "/").rsplit("/", 1)[-1]
    name = _SUFFIX.sub("", name)
    return _DOWNSAMPLED.sub("", name).lower()


def group_identity(group: str) -> str:
    return str(group).strip().lower()


def image_identities(frame: pd.DataFrame) -> pd.Series:
    """The identity of every catalog row."""
    return frame["image_id"].astype(str).map(image_identity)


def group_identities(frame: pd.DataFrame) -> pd.Series:
    """The lesion/patient identity of every catalog row; None where the row has no lesion or patient id
    (the loaders then make the image its own group)."""
    groups, images = frame["group"].astype(str), frame["image_id"].astype(str)
    return pd.Series([group_identity(g) if g != i else None for g, i in zip(groups, images)], index=frame.index, dtype=object)
