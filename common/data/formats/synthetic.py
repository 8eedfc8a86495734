"""The embedded synthetic data (`dermfed data synth`): HAM10000's layout plus predefined splits and artefact flags.

Reading it never generates it: `common.data.pipeline.ensure_synthetic_data` (called by the
commands) or `dermfed data synth` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.data.catalog import Catalog
from common.data.formats import register_format
from common.data.formats.ham10000 import load_ham_layout

if TYPE_CHECKING:
    from common.config import DataConfig


SYNTHETIC_CSV = "synthetic_metadata.csv"


@register_format("synthetic", holds=f"the output of `dermfed data synth --out DIR` ({SYNTHETIC_CSV} and images/)")
def load_synthetic(cfg: DataConfig) -> Catalog:
    return load_ham_layout(cfg, SYNTHETIC_CSV, "synthetic", extra_columns=("split", "shortcut_artifact", "artifacts"))
