"""Train/validation/test splits that never put one lesion (or patient) on two sides.

HAM10000 holds several images of one lesion; a lesion in both training and test data makes
any score optimistic. Splits are grouped by `group` (lesion_id or patient_id), stratified by
site and class so every site and class appears on each side where the data allow, and seeded.
A catalog whose data set defines its own split (the synthetic data, whose test split is built to
break a shortcut) keeps it; any other split is drawn anew from the seed, so it can be redrawn.
"""

from __future__ import annotations

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


def split_indices(catalog: Catalog, name: str) -> np.ndarray:
    """Row positions of one split (call `assign_splits` first)."""
    if "split" not in catalog.frame.columns:
        raise ValueError("catalog has no splits; call assign_splits first")
    return np.flatnonzero(catalog.frame["split"].to_numpy() == name)
