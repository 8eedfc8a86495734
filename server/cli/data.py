"""`dermfed data synth` and `dermfed data summary`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from server.cli.options import add_common, add_force, claim_out, out_folder

if TYPE_CHECKING:
    from common.config import DermFedConfig


def cmd_data_synth(args: argparse.Namespace, config: DermFedConfig) -> int:
    from common.data.synthetic import generate
    from common.run_files import writing_into

    out = Path(args.out or config.data.root or "data/synthetic")
    started = time.perf_counter()
    with writing_into(out):  # a full disk names the folder
        metadata = generate(config, out)
    print(f"wrote {len(metadata)} synthetic images of {metadata['lesion_id'].nunique()} lesions in "
          f"{metadata['dataset'].nunique()} sites to {out} ({time.perf_counter() - started:.1f} s)")
    print(f"read it with: data.format=synthetic data.root={out}")
    return 0


def cmd_data_summary(args: argparse.Namespace, config: DermFedConfig) -> int:
    from common.config import write_config
    from common.data.catalog import format_summary, summary_table
    from common.data.pipeline import ensure_data, prepare_data
    from common.run_files import atomic_write_text
    from common.run_folder import DATA_SUMMARY, SUMMARY_NAME

    folder = out_folder(config, "data-summary", args.out)
    claim_out(folder, DATA_SUMMARY, args.force)
    ensure_data(config)  # the synthetic data if absent, the cache: written here, explicitly, never by reading
    prepared = prepare_data(config)
    catalog = prepared.catalog
    print(format_summary(catalog))
    print("\nsplits (images):")
    print(catalog.frame.groupby(["split"]).size().to_string())
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "summary.csv", summary_table(catalog).to_csv())
    atomic_write_text(folder / "skipped.csv", catalog.skipped.to_csv(index=False))
    atomic_write_text(folder / SUMMARY_NAME, json.dumps({
        "format": config.data.format, "root": str(catalog.root), "usable": len(catalog),
        "skipped": len(catalog.skipped), "sites": {s: int(n) for s, n in catalog.frame["site"].value_counts().sort_index().items()},
        "classes": catalog.classes,
        "skip_reasons": {r: int(n) for r, n in catalog.skipped["reason"].value_counts().items()},
    }, indent=2))
    write_config(config, folder)
    print(f"\nsummary written to {folder}")
    return 0


def register(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    data = sub.add_parser("data", help="generate, inspect and cache data sets", formatter_class=fmt)
    data_sub = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    synth = data_sub.add_parser("synth", help="write the embedded synthetic dermoscopy data set", formatter_class=fmt)
    synth.add_argument("--out", default=None, help="output folder (default: data.root, else data/synthetic)")
    add_common(synth)
    synth.set_defaults(handler=cmd_data_synth)
    summary = data_sub.add_parser("summary", help="per site and class: images found, skipped and why", formatter_class=fmt)
    summary.add_argument("--out", default=None, help="folder for summary.csv/json (default: output_dir/run_name)")
    add_force(summary)
    add_common(summary)
    summary.set_defaults(handler=cmd_data_summary)
