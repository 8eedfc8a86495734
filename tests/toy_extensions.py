"""A toy objective and a toy data format, registered from outside their packages (see tests/test_extensions.py).

Like `tests/toy_strategy.py` (imported here, so one plugin brings the three), this is a plain module and not a
`test_*.py` file: Flower's app bundle leaves test files out, and every process of a simulation imports it through
`DERMFED_PLUGINS=tests.toy_extensions`. Nothing else in the tree names these extensions.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import tests.toy_strategy  # noqa: F401 - the toy strategy with its client hook registers itself
from common.data.catalog import make_catalog
from common.data.formats import FORMATS, register_format
from common.data.formats.reading import find_csv, read_csv, require_root
from common.objectives import OBJECTIVES, register_objective
from tests.toy_objective import ColourObjective

TOY_OBJECTIVE = "toycolour"
TOY_FORMAT = "toyclinics"
TOY_CSV = "toy_clinics.csv"


def load_clinics(cfg):
    """A CSV of file, clinic, diagnosis, patient beside a pics/ folder."""
    root = require_root(cfg)
    meta = read_csv(find_csv(root, cfg.metadata_csv, TOY_CSV, TOY_FORMAT), ["file", "clinic", "diagnosis", "patient"],
                    TOY_FORMAT, ids=("file", "patient"))
    rows = pd.DataFrame({"image_id": meta["file"].str.rsplit(".", n=1).str[0],
                         "path": [root / "pics" / name for name in meta["file"]], "site": meta["clinic"],
                         "group": meta["patient"], "label": meta["diagnosis"].str.upper()})
    return make_catalog(rows, sorted(set(rows["label"])), TOY_FORMAT, root)


def write_clinics(root: Path, clinics: int = 2, per_clinic: int = 24) -> Path:
    """Small JPEGs in the toy format: `clinics` sites, two images per patient, two classes."""
    from tests.conftest import write_jpeg

    rows = []
    for i in range(clinics * per_clinic):
        name = f"img{i:03d}.jpg"
        write_jpeg(root / "pics" / name, (48, 48), seed=1000 + i)
        rows.append({"file": name, "clinic": f"clinic_{i // per_clinic}", "diagnosis": ("nv", "mel")[(i // 2) % 2],
                     "patient": f"p{i // 2}"})
    pd.DataFrame(rows).to_csv(root / TOY_CSV, index=False)
    return root


if TOY_OBJECTIVE not in OBJECTIVES:
    register_objective(TOY_OBJECTIVE)(ColourObjective)
if TOY_FORMAT not in FORMATS:
    register_format(TOY_FORMAT, holds=f"{TOY_CSV} and pics/")(load_clinics)
