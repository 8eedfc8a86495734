"""How much the preprocessing cache saves per epoch, measured side by side in one run.

    .venv/bin/python benchmarks/cache_speedup.py [--root DIR --format FORMAT] [--size 64] [--epochs 3]

Without --root it uses the real HAM10000 sample beside the project when present, else freshly
generated synthetic data. It times one pass over every image by (a) decoding and resizing the
source files, as a loader without cache does each epoch, and (b) reading the memory-mapped
cache, and prints the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common.config import load_config
from common.data.cache import build_cache, scan
from common.data.formats import load_catalog
from common.data.stores import DecodingStore
from common.data.synthetic import generate

HAM_SAMPLE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "ham10000-sample"


def epoch_seconds(store) -> float:
    started = time.perf_counter()
    for i in range(len(store)):
        store.get(i).sum()  # touch the pixels
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None)
    parser.add_argument("--format", default=None)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="dermfed-bench-"))
    if args.root:
        root, fmt = args.root, args.format or "folder"
    elif (HAM_SAMPLE / "HAM10000_metadata.csv").is_file():
        root, fmt = str(HAM_SAMPLE), "ham10000"
    else:
        root, fmt = str(workdir / "synthetic"), "synthetic"
        generate(load_config("demo"), root, progress=False)
    config = load_config("demo", [f"data.format={fmt}", f"data.root={root}", f"data.image_size={args.size}",
                                  f"data.cache_dir={workdir / 'cache'}"])
    started = time.perf_counter()
    catalog = load_catalog(config.data)
    build_cache(catalog, config.data)
    build = time.perf_counter() - started
    catalog, cached = scan(catalog, config.data)
    decoding = DecodingStore(catalog.frame["path"].tolist(), args.size, config.data.non_rgb)
    decode_times = [epoch_seconds(decoding) for _ in range(args.epochs)]
    cache_times = [epoch_seconds(cached) for _ in range(args.epochs)]
    decode_s, cache_s = min(decode_times), min(cache_times)
    print(f"data: {fmt} at {root}: {len(catalog)} images, resized to {args.size}px")
    print(f"cache build (decode once + write): {build:.2f} s")
    print(f"one epoch decoding JPEGs:          {decode_s:.3f} s  ({len(catalog) / decode_s:,.0f} img/s)")
    print(f"one epoch from the memmap cache:   {cache_s:.3f} s  ({len(catalog) / cache_s:,.0f} img/s)")
    print(f"speedup per epoch: {decode_s / cache_s:.1f}x  (best of {args.epochs} epochs each)")


if __name__ == "__main__":
    main()
