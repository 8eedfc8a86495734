"""From config to usable data: the writing steps the commands call, then the read-only reading.

Reading data never writes it. `prepare_data` lists the images, checks them (from the cache when
it is there) and splits them, and writes nothing: not the synthetic data, not the cache. The
commands that train or evaluate (pretrain, simulate, evaluate, data summary) and a real site
before it trains call the writing steps first, explicitly:

- `ensure_synthetic_data(config)`: draws the embedded synthetic data into `data.root` if it is
  not there yet (`data.format=synthetic` only; `dermfed data synth` does the same on request);
- `ensure_cache(config)`: builds the preprocessing cache of `data.root` if it is missing or
  damaged (`data.use_cache=true` only);
- `ensure_data(config)`: both, in that order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from common.config import DataConfig, DermFedConfig
from common.data.cache import build_cache, scan
from common.data.catalog import Catalog
from common.data.formats import load_catalog
from common.data.splits import assign_lesion_splits, assign_splits
from common.data.stores import ImageStore, SubsetStore

log = logging.getLogger("dermfed.data")


@dataclass
class PreparedData:
    catalog: Catalog  # usable rows only, with a `split` column
    store: ImageStore  # pixels of row i


def ensure_synthetic_data(config: DermFedConfig) -> None:
    """The embedded default data needs no download: write it where `data.root` points if absent."""
    from common.data.formats.synthetic import SYNTHETIC_CSV
    from common.data.synthetic import generate
    from common.run_files import writing_into

    if config.data.format != "synthetic" or not config.data.root:
        return
    root = Path(config.data.root)
    if not (root / SYNTHETIC_CSV).is_file():
        log.info("no synthetic data at %s yet: generating it (seed %d)", root, config.seed)
        with writing_into(root):  # a full disk names the folder
            generate(config, root)


def ensure_cache(data: DataConfig) -> Optional[Path]:
    """Build the preprocessing cache of `data.root` if it is missing or damaged; its folder (None without a cache)."""
    if not data.use_cache:
        return None
    return build_cache(load_catalog(data), data)


def ensure_data(config: DermFedConfig) -> None:
    """Every writing step a command needs before it reads: the synthetic data, then the cache."""
    ensure_synthetic_data(config)
    ensure_cache(config.data)


def split_catalog(catalog: Catalog, config: DermFedConfig) -> Catalog:
    """Under DP each lesion's side comes from its own id (`assign_lesion_splits`), so the split adds no
    one else to a neighbouring data set's training set; without DP the stratified grouped split."""
    rule = assign_lesion_splits if config.dp.enabled else assign_splits
    return rule(catalog, config.data.val_fraction, config.data.test_fraction, config.seed)


def prepare_data(config: DermFedConfig) -> PreparedData:
    """Load `data.format` at `data.root`, check every image once, assign grouped splits, then restrict. Read-only.

    Splits are assigned once (`split_catalog`), on the whole catalog, and only then is the catalog restricted to
    `data.site`: a site's test images are exactly the pooled evaluation's test images of that
    site, so a local-only arm never pretrains on an image that evaluation scores.
    """
    catalog = load_catalog(config.data)
    catalog, store = scan(catalog, config.data)
    catalog = split_catalog(catalog, config)
    if config.data.site is not None:
        keep = np.flatnonzero(catalog.frame["site"].to_numpy() == config.data.site)
        catalog, store = catalog.only_site(config.data.site), SubsetStore(store, keep)
    return PreparedData(catalog, store)
