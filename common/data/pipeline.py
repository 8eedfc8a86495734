"""From config to usable data in one call: catalog, checked images, splits."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from common.config import DermFedConfig
from common.data.cache import ImageStore, scan
from common.data.catalog import Catalog
from common.data.sources import load_catalog
from common.data.splits import assign_splits

log = logging.getLogger("dermfed.data")


@dataclass
class PreparedData:
    catalog: Catalog  # usable rows only, with a `split` column
    store: ImageStore  # pixels of row i


def ensure_synthetic_data(config: DermFedConfig) -> None:
    """The embedded default data needs no download: write it where `data.root` points if absent."""
    from common.data.sources import SYNTHETIC_CSV
    from common.data.synthetic import generate

    if config.data.format != "synthetic" or not config.data.root:
        return
    root = Path(config.data.root)
    if not (root / SYNTHETIC_CSV).is_file():
        log.info("no synthetic data at %s yet: generating it (seed %d)", root, config.seed)
        generate(config, root)


def prepare_data(config: DermFedConfig) -> PreparedData:
    """Load `data.format` at `data.root`, check every image once, assign grouped splits."""
    ensure_synthetic_data(config)
    catalog = load_catalog(config.data)
    catalog, store = scan(catalog, config.data)
    catalog = assign_splits(catalog, config.data.val_fraction, config.data.test_fraction, config.seed)
    return PreparedData(catalog, store)
