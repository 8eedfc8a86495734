"""The preprocessing cache: same pixels as decoding, no decoding on reuse, rebuilt on change."""

import os

import numpy as np

import common.data.cache as cache_module
from common.data.cache import build_cache, scan
from common.data.images import decode_image
from common.data.formats import load_catalog
from tests.conftest import write_jpeg


def _built_and_scanned(data):
    """What the commands do: build the cache (the writing step), then read through it."""
    catalog = load_catalog(data)
    build_cache(catalog, data)
    return scan(catalog, data)


def test_cached_pixels_equal_decoded_pixels_and_reuse_decodes_nothing(synthetic_root, data_config, monkeypatch):
    config = data_config(f"data.root={synthetic_root}")
    catalog, store = _built_and_scanned(config.data)
    for i in (0, len(catalog) // 2, len(catalog) - 1):
        expected = decode_image(catalog.frame["path"][i], config.data.image_size).array
        assert np.array_equal(store.get(i), expected)

    def fail(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(cache_module, "decode_image", fail)
    again_catalog, again = _built_and_scanned(config.data)
    assert isinstance(again, cache_module.MemmapStore)
    assert np.array_equal(again.get(3), store.get(3))


def test_cache_is_keyed_by_size_and_source_files(tmp_path, data_config):
    root = tmp_path / "images"
    for i in range(3):
        write_jpeg(root / "site" / f"{i}.jpg", (70, 70), seed=i)
    config = data_config("data.format=folder", f"data.root={root}")
    _built_and_scanned(config.data)
    bigger = data_config("data.format=folder", f"data.root={root}", "data.image_size=64")
    _, store48 = _built_and_scanned(bigger.data)
    assert store48.get(0).shape == (64, 64, 3)
    write_jpeg(root / "site" / "0.jpg", (70, 70), seed=99)
    os.utime(root / "site" / "0.jpg", ns=(1, 1))
    _, fresh = _built_and_scanned(config.data)
    assert np.array_equal(fresh.get(0), decode_image(root / "site" / "0.jpg", 32).array)
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_without_cache_pixels_are_decoded_each_time(synthetic_root, data_config):
    config = data_config(f"data.root={synthetic_root}", "data.use_cache=false")
    catalog, store = _built_and_scanned(config.data)
    assert isinstance(store, cache_module.DecodingStore)
    assert store.get(0).shape == (32, 32, 3)
    assert not (config.data.cache_dir and os.path.exists(config.data.cache_dir))
