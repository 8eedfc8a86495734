"""A catalog: which image files a data set holds, with site, lesion group and label.

Every loader returns one. The frame has one row per usable candidate image:
`image_id, path, site, group, label` (label is None for unlabeled data) and optional columns
such as `split` (predefined splits) or `shortcut_artifact` (synthetic data). Rows that were
dropped are kept in `skipped` with a reason, so that a summary can say what was left out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import pandas as pd

from common.data.images import display_path

log = logging.getLogger("dermfed.data")

CATALOG_COLUMNS = ["image_id", "path", "site", "group", "label"]
SKIP_COLUMNS = ["image_id", "path", "site", "label", "reason"]


class DataError(RuntimeError):
    """The data cannot be used as configured; the message says what to fix."""


@dataclass
class Catalog:
    frame: pd.DataFrame
    classes: list[str]
    source: str
    root: Path
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SKIP_COLUMNS))
    predefined_splits: bool = False  # the data set carries its own train/val/test split (the synthetic data)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    @property
    def sites(self) -> list[str]:
        return sorted(self.frame["site"].unique().tolist())

    def __len__(self) -> int:
        return len(self.frame)

    def label_indices(self) -> pd.Series:
        """Integer class index per row (position in `classes`)."""
        if not self.labelled:
            raise DataError(f"{self.source} data at {self.root} has no labels")
        lookup = {name: i for i, name in enumerate(self.classes)}
        return self.frame["label"].map(lookup).astype(int)

    def subset(self, mask: pd.Series | list[bool]) -> "Catalog":
        return replace(self, frame=self.frame[mask].reset_index(drop=True))

    def only_site(self, site: Optional[str]) -> "Catalog":
        """The local-only view of one hospital; an unknown site is an error naming the known ones."""
        if site is None:
            return self
        if site not in set(self.frame["site"]):
            raise DataError(f"data.site={site!r} is not a site of this data set; sites: {self.sites}")
        kept = self.subset(self.frame["site"] == site)
        return replace(kept, skipped=self.skipped[self.skipped["site"] == site].reset_index(drop=True))

    def with_skipped(self, more: pd.DataFrame) -> "Catalog":
        if more.empty:
            return self
        skipped = more if self.skipped.empty else pd.concat([self.skipped, more], ignore_index=True)
        return replace(self, skipped=skipped)

    def pretraining_view(self) -> "Catalog":
        """The same images without labels: what self-supervised pretraining may see."""
        frame = self.frame.copy()
        frame["label"] = None
        return replace(self, frame=frame, classes=[])


def make_catalog(
    rows: pd.DataFrame, classes: list[str], source: str, root: Path, skipped: list[dict] | None = None
) -> Catalog:
    """Build a catalog: rows whose file does not exist and exact duplicate rows move to `skipped`;
    one image id with two different descriptions (lesion, label, site, file) is an error that lists them."""
    rows = rows.reset_index(drop=True)
    for column in CATALOG_COLUMNS:
        if column not in rows.columns:
            raise ValueError(f"catalog rows lack column {column!r}")
    rows = rows.assign(image_id=rows["image_id"].astype(str))
    described = rows[CATALOG_COLUMNS].astype(str)
    repeated = described.duplicated(keep="first")
    conflicting = sorted(set(described.loc[~repeated, "image_id"][described.loc[~repeated, "image_id"].duplicated()]))
    if conflicting:
        examples = "; ".join(_describe(rows[rows["image_id"] == i]) for i in conflicting[:3])
        raise DataError(f"{source}: {len(conflicting)} image id(s) appear with different lesions, labels, sites or "
                        f"files, e.g. {examples}. Fix the metadata so that each image is described once")
    duplicates = rows[repeated].assign(reason="duplicate metadata row (kept once)")
    rows = rows[~repeated].reset_index(drop=True)
    exists = rows["path"].map(lambda p: p is not None and not pd.isna(p) and Path(p).is_file()).astype(bool)
    missing = rows[~exists].assign(reason="image file missing")
    extra = pd.DataFrame(skipped or [], columns=SKIP_COLUMNS)
    parts = [frame[SKIP_COLUMNS] for frame in (missing, duplicates, extra) if not frame.empty]
    all_skipped = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=SKIP_COLUMNS)
    all_skipped["path"] = all_skipped["path"].map(lambda p: None if p is None or pd.isna(p) else display_path(p))
    if len(missing):
        log.warning("%s: %d metadata rows have no image file under %s (skipped)", source, len(missing), root)
    frame = rows[exists].reset_index(drop=True)
    frame["path"] = frame["path"].map(str)
    return Catalog(frame=frame, classes=classes, source=source, root=root, skipped=all_skipped)


def _describe(rows: pd.DataFrame) -> str:
    variants = ", ".join(f"{r.label} lesion {r.group} at {r.site}" for r in rows.itertuples())
    return f"{rows['image_id'].iloc[0]} ({variants})"


def summary_table(catalog: Catalog) -> pd.DataFrame:
    """Per site and class: images found (usable), skipped, and skipped per reason."""
    found = _fill_unknown(catalog.frame).groupby(["site", "label"]).size().rename("found")
    skipped = _fill_unknown(catalog.skipped)
    if skipped.empty:
        return found.to_frame().assign(skipped=0).sort_index()
    by_reason = skipped.groupby(["site", "label", "reason"]).size().unstack("reason", fill_value=0)
    table = pd.concat([found, by_reason], axis=1).fillna(0).astype(int)
    table.index.names = ["site", "label"]
    table.insert(1, "skipped", table[list(by_reason.columns)].sum(axis=1))
    return table.sort_index()


def _fill_unknown(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(
        label=frame["label"].astype(object).where(frame["label"].notna(), "(unlabelled)"),
        site=frame["site"].astype(object).where(frame["site"].notna(), "(no site)"),
    )


def format_summary(catalog: Catalog) -> str:
    """Human-readable summary: per site and class, then per site, then totals and reasons."""
    table = summary_table(catalog)
    lines = [
        f"data set: {catalog.source} at {catalog.root}",
        f"usable images: {len(catalog)} in {len(catalog.sites)} sites; skipped: {len(catalog.skipped)}",
        f"classes: {', '.join(catalog.classes) if catalog.classes else '(unlabelled)'}",
        "",
        "per site:",
        table.groupby(level="site").sum().to_string(),
        "",
        "per site and class:",
        table.to_string(),
    ]
    if len(catalog.skipped):
        lines += ["", "skipped, by reason:", catalog.skipped["reason"].value_counts().to_string()]
    return "\n".join(lines)
