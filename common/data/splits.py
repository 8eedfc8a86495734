"""Train/validation/test splits that never put one lesion (or patient) on two sides.

HAM10000 holds several images of one lesion; a lesion in both training and test data makes
any score optimistic. Splits are grouped by `group` (lesion_id or patient_id), stratified by
site and class so every site and class appears on each side where the data allow, and seeded.
A catalog whose data set defines its own split (the synthetic data, whose test split is built to
break a shortcut) keeps it; any other split is drawn anew from the seed, so it can be redrawn.

Under DP-SGD the split is part of the private mechanism: a stratified split drawn over the whole
catalog moves other lesions between sides when one lesion is added or removed (a median of 73
images on the HAM10000 sample), so the per-image guarantee would cover a group of that size.
`assign_lesion_splits` instead places each lesion from its own id alone (a keyed hash), so a
neighbouring data set changes the training set by exactly that lesion's images.
"""

from __future__ import annotations

import hashlib
import hmac
import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from common.data.catalog import Catalog, DataError

SPLITS = ("train", "val", "test")


def _hold_out(frame: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a grouped, stratified hold-out of about `fraction` of the rows."""
    mask = np.zeros(len(frame), dtype=bool)
    if fraction <= 0 or len(frame) < 2 or frame["group"].nunique() < 2:
        return mask
    groups = frame["group"].to_numpy()
    strata = (frame["site"].astype(str) + "|" + frame["label"].fillna("").astype(str)).to_numpy()
    n_splits = max(2, int(round(1.0 / fraction)))
    if frame["group"].nunique() >= n_splits and pd.Series(strata).nunique() > 1:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # rare strata are expected; they land on one side
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            _, held = next(splitter.split(np.zeros(len(frame)), strata, groups))
    else:
        splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        _, held = next(splitter.split(np.zeros(len(frame)), groups=groups))
    mask[held] = True
    return mask


def assign_splits(catalog: Catalog, val_fraction: float, test_fraction: float, seed: int) -> Catalog:
    """Set the `split` column (train/val/test), drawn with `seed`; a data set's predefined split is kept."""
    frame = catalog.frame.copy()
    if catalog.predefined_splits:
        unknown = set(frame["split"]) - set(SPLITS)
        if unknown:  # the loaders check the column row by row (`sources._checked_splits`); this is a guard
            raise DataError(f"{catalog.source}: split values {sorted(map(str, unknown))} are not in {SPLITS}")
        return replace(catalog, frame=frame, predefined_splits=True)
    split = np.full(len(frame), "train", dtype=object)
    test = _hold_out(frame, test_fraction, seed)
    split[test] = "test"
    rest = np.flatnonzero(~test)
    remaining_fraction = val_fraction / max(1e-9, 1.0 - test_fraction)
    val = _hold_out(frame.iloc[rest].reset_index(drop=True), remaining_fraction, seed + 1)
    split[rest[val]] = "val"
    frame["split"] = split
    return replace(catalog, frame=frame)


def lesion_position(group: str, seed: int) -> float:
    """Where one lesion (group id) falls in [0, 1): HMAC-SHA256 keyed by the split seed, its first 64 bits.

    A function of the lesion's own id and the seed only, never of the other rows. The key need not
    be secret: the DP argument needs only that the rule is fixed before the data are seen.
    """
    digest = hmac.new(str(int(seed)).encode(), str(group).encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_lesion_splits(catalog: Catalog, val_fraction: float, test_fraction: float, seed: int) -> Catalog:
    """The split under DP: each lesion's side from its own keyed hash against the fractions (test, then
    val, else train), so adding or removing one lesion changes no other image's side. Not stratified:
    sides match the fractions only on average. A data set's predefined split is kept (it is per image)."""
    if catalog.predefined_splits:
        return assign_splits(catalog, val_fraction, test_fraction, seed)
    frame = catalog.frame.copy()
    position = np.array([lesion_position(g, seed) for g in frame["group"].astype(str)], dtype=np.float64)
    frame["split"] = np.where(position < test_fraction, "test",
                              np.where(position < test_fraction + val_fraction, "val", "train")).astype(object)
    return replace(catalog, frame=frame)


def split_indices(catalog: Catalog, name: str) -> np.ndarray:
    """Row positions of one split (call `assign_splits` first)."""
    if "split" not in catalog.frame.columns:
        raise ValueError("catalog has no splits; call assign_splits first")
    return np.flatnonzero(catalog.frame["split"].to_numpy() == name)
