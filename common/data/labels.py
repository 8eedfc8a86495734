"""One explicit label vocabulary across datasets.

HAM10000 names classes by `dx` code (`akiec`, `nv`, ...), ISIC 2018 by column (`AKIEC`, `NV`),
ISIC 2019 by column (`AK`, `NV`, ..., `SCC`, `UNK`), ISIC 2020 by a binary `target`. Every
loader maps into the canonical names below, so a head trained on one set is scored on another
without silent mismatches. `akiec` (actinic keratosis and intraepithelial carcinoma / Bowen's
disease) maps to `AK`, as ISIC 2019 files those images.
"""

from __future__ import annotations

from typing import Iterable

CANONICAL_CLASSES: tuple[str, ...] = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK", "OTHER")

HAM10000_DX: dict[str, str] = {
    "mel": "MEL",
    "nv": "NV",
    "bcc": "BCC",
    "akiec": "AK",
    "bkl": "BKL",
    "df": "DF",
    "vasc": "VASC",
}

ISIC2018_COLUMNS: dict[str, str] = {
    "MEL": "MEL",
    "NV": "NV",
    "BCC": "BCC",
    "AKIEC": "AK",
    "BKL": "BKL",
    "DF": "DF",
    "VASC": "VASC",
}

ISIC2019_COLUMNS: dict[str, str] = {name: name for name in ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")}

# ISIC 2020's malignant class is melanoma; everything else is benign or another diagnosis.
ISIC2020_TARGET: dict[int, str] = {1: "MEL", 0: "OTHER"}


def canonical_column_name(column: str) -> str:
    """Canonical name of a ground-truth column; unknown columns keep their upper-cased name."""
    upper = column.strip().upper()
    return ISIC2018_COLUMNS.get(upper, ISIC2019_COLUMNS.get(upper, upper))


def ordered_classes(labels: Iterable[str]) -> list[str]:
    """Classes present in `labels`, in canonical order (unknown names last, sorted)."""
    present = set(labels)
    known = [name for name in CANONICAL_CLASSES if name in present]
    return known + sorted(present - set(CANONICAL_CLASSES))
