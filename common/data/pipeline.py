"""From config to usable data in one call: catalog, checked images, splits."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import DermFedConfig
from common.data.cache import ImageStore, scan
from common.data.catalog import Catalog
from common.data.sources import load_catalog
from common.data.splits import assign_splits


@dataclass
class PreparedData:
    catalog: Catalog  # usable rows only, with a `split` column
    store: ImageStore  # pixels of row i


def prepare_data(config: DermFedConfig) -> PreparedData:
    """Load `data.format` at `data.root`, check every image once, assign grouped splits."""
    catalog = load_catalog(config.data)
    catalog, store = scan(catalog, config.data)
    catalog = assign_splits(catalog, config.data.val_fraction, config.data.test_fraction, config.seed)
    return PreparedData(catalog, store)
