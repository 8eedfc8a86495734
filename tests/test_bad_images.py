"""Every kind of bad file a hospital folder holds is skipped with a reason and counted."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from common.data.cache import scan
from common.data.catalog import DataError, summary_table
from common.data.images import decode_image
from common.data.formats import load_catalog
from tests.conftest import write_jpeg


def _png_16bit_rgb(width: int, height: int) -> bytes:
    """A 48-bit RGB PNG (Pillow cannot write one)."""
    rows = b"".join(b"\x00" + np.full(width * 3, 40000, dtype=">u2").tobytes() for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def make_bad_folder(site_dir):
    site_dir.mkdir(parents=True)
    write_jpeg(site_dir / "good_1.jpg", (90, 70), seed=1)
    write_jpeg(site_dir / "good_2.jpg", (64, 64), seed=2)
    (site_dir / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    full = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (120, 120, 3), dtype=np.uint8)).save(full, "JPEG")
    (site_dir / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    Image.new("L", (64, 64), 120).save(site_dir / "gray.png")
    Image.new("RGBA", (64, 64), (200, 100, 50, 128)).save(site_dir / "alpha.png")
    Image.new("CMYK", (64, 64), (10, 80, 90, 5)).save(site_dir / "cmyk.jpg")
    Image.fromarray(np.full((64, 64), 30000, dtype=np.uint16)).save(site_dir / "gray16.png")
    (site_dir / "rgb16.png").write_bytes(_png_16bit_rgb(64, 64))
    write_jpeg(site_dir / "tiny.jpg", (20, 12), seed=4)
    (site_dir / "notes.txt").write_text("scanner log")
    (site_dir / "fake.png").write_text("not a png at all")


EXPECTED_REASONS = {
    "truncated.jpg": "truncated",
    "gray.png": "grayscale",
    "alpha.png": "RGBA/palette",
    "cmyk.jpg": "CMYK",
    "gray16.png": "16-bit grayscale",
    "rgb16.png": "16-bit RGB",
    "notes.txt": "not an image",
    "fake.png": "not an image",
}


def test_every_bad_file_is_skipped_with_its_reason(tmp_path, data_config, caplog):
    make_bad_folder(tmp_path / "images" / "hospital_a")
    config = data_config("data.format=folder", f"data.root={tmp_path / 'images'}")
    catalog, store = scan(load_catalog(config.data), config.data)
    assert sorted(catalog.frame["image_id"]) == ["hospital_a/good_1.jpg", "hospital_a/good_2.jpg"]
    reasons = {path.split("/")[-1]: reason for path, reason in zip(catalog.skipped["path"], catalog.skipped["reason"])}
    for name, expected in EXPECTED_REASONS.items():
        assert reasons[name] == expected, name
    assert reasons["corrupt.jpg"] in {"corrupt", "truncated"}  # a garbage body reads as either
    assert reasons["tiny.jpg"].startswith("too small")
    assert len(catalog.skipped) == len(EXPECTED_REASONS) + 2
    assert [store.get(i).shape for i in range(len(store))] == [(32, 32, 3)] * 2
    assert "skipped" in caplog.text and "truncated" in caplog.text
    table = summary_table(catalog)
    assert int(table.loc[("hospital_a", "(unlabelled)"), "skipped"]) == len(EXPECTED_REASONS) + 2
    assert int(table.loc[("hospital_a", "(unlabelled)"), "found"]) == 2


def test_convert_mode_keeps_colour_problems_but_not_broken_files(tmp_path, data_config):
    make_bad_folder(tmp_path / "images" / "hospital_a")
    config = data_config("data.format=folder", f"data.root={tmp_path / 'images'}", "data.non_rgb=convert")
    catalog, store = scan(load_catalog(config.data), config.data)
    kept = {name.split("/")[-1].rsplit(".", 1)[0] for name in catalog.frame["image_id"]}
    assert kept == {"good_1", "good_2", "gray", "alpha", "cmyk", "gray16", "rgb16"}
    gray16 = store.get(catalog.frame.index[catalog.frame["image_id"].str.startswith("hospital_a/gray16.")][0])
    assert gray16.dtype == np.uint8 and abs(int(gray16.mean()) - round(30000 / 65535 * 255)) <= 1
    assert set(catalog.skipped["reason"].str.split(" ").str[0]) <= {"corrupt", "truncated", "not", "too"}
    assert len(catalog.skipped) == 5


def test_a_site_with_no_usable_image_is_a_clear_error(tmp_path, data_config):
    write_jpeg(tmp_path / "images" / "good_site" / "a.jpg", seed=1)
    bad = tmp_path / "images" / "broken_site"
    bad.mkdir(parents=True)
    (bad / "a.jpg").write_bytes(b"garbage")
    (bad / "b.txt").write_text("x")
    config = data_config("data.format=folder", f"data.root={tmp_path / 'images'}")
    with pytest.raises(DataError, match="broken_site"):
        scan(load_catalog(config.data), config.data)


def test_decode_never_raises_on_garbage(tmp_path):
    for i in range(20):
        path = tmp_path / f"g{i}.jpg"
        path.write_bytes(np.random.default_rng(i).integers(0, 256, 50 + 37 * i, dtype=np.uint8).tobytes())
        assert decode_image(path, 32).reason is not None
    assert decode_image(tmp_path / "absent.jpg", 32).reason == "image file missing"
