"""Reading data never writes it: listing a source and loading its images leave the disk as they were.

The writing steps are explicit (`common.data.pipeline.ensure_synthetic_data`, `ensure_cache`),
called by the commands; a reader (`prepare_data`: catalog, image checks, splits, pixels) must not
generate a missing synthetic data set nor build the preprocessing cache on the side. Checked on a
read-only copy of the data: the tree is compared file by file before and after, and the absent
cache folder must stay absent.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from common.config import load_config
from common.data.catalog import DataError
from common.data.pipeline import ensure_cache, prepare_data
from common.data.stores import MemmapStore, read_batch


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and folder below `root`: its kind, size and modification time."""
    found = {}
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        found[str(path.relative_to(root))] = (stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns)
    return found


@pytest.fixture()
def read_only_copy(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    for path in [*root.rglob("*"), root]:
        path.chmod(path.stat().st_mode & ~0o222)  # not enough for root (CI): the tree comparison is what counts
    yield root
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)


def test_listing_and_loading_a_source_without_a_cache_writes_nothing(read_only_copy, tmp_path):
    cache = tmp_path / "cache"
    config = load_config("smoke", [f"data.root={read_only_copy}", f"data.cache_dir={cache}"])
    before = tree(read_only_copy)
    prepared = prepare_data(config)
    pixels = read_batch(prepared.store, np.arange(len(prepared.catalog)))
    assert pixels.shape == (len(prepared.catalog), 32, 32, 3) and len(prepared.catalog) > 20
    assert not cache.exists(), sorted(p.name for p in cache.rglob("*"))
    assert tree(read_only_copy) == before
    assert sorted(os.listdir(tmp_path)) == ["data"]


def test_reading_uses_a_cache_built_by_the_explicit_step_and_gives_the_same_pixels(read_only_copy, tmp_path):
    config = load_config("smoke", [f"data.root={read_only_copy}", f"data.cache_dir={tmp_path / 'cache'}"])
    decoded = prepare_data(config)
    assert ensure_cache(config.data) is not None
    cached_before = tree(tmp_path / "cache")
    cached = prepare_data(config)
    assert isinstance(cached.store, MemmapStore)
    rows = np.arange(len(cached.catalog))
    assert np.array_equal(read_batch(cached.store, rows), read_batch(decoded.store, rows))
    assert tree(tmp_path / "cache") == cached_before  # reading through the cache writes nothing either


def test_reading_a_missing_synthetic_data_set_does_not_generate_it(tmp_path):
    root = tmp_path / "absent"
    config = load_config("smoke", [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(DataError, match="data.root=.*is not a folder"):
        prepare_data(config)
    assert sorted(os.listdir(tmp_path)) == []
