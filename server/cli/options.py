"""What every subcommand shares: the `--config`/overrides/`-v` arguments, `--force`, and its `--out` folder."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from common.config import DermFedConfig


OVERRIDES_HELP = "config overrides, key=value (dotted for nested keys, e.g. data.root=/data/ham10000)"


def add_common(parser: argparse.ArgumentParser, default_preset: str = "demo") -> None:
    parser.add_argument("--config", default=default_preset, metavar="PRESET",
                        help="YAML preset: a name in configs/ (paper, demo, smoke) or a path")
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging, and stack traces with errors")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


FORCE_HELP = "if --out holds another run (of another kind, or a finished one), move it aside (OUT.old-TIME) first"


def add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)


def out_folder(config: DermFedConfig, kind: str, explicit: Optional[str] = None) -> Path:
    """Where a run writes its outputs (and its resolved config.yaml)."""
    if explicit:
        return Path(explicit)
    name = config.run_name or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(config.output_dir) / name


def claim_out(folder: Path, kind: str, force: bool) -> None:
    """A command's `--out` may not hold another command's run, nor a finished run of its own kind: its config.yaml
    and results would be overwritten (`common.run_folder`). `--force` moves the old run aside, and says where."""
    from common.run_folder import claim_out as claim

    if moved := claim(folder, kind, force):
        print(f"--force: moved the run that was in {folder} to {moved}", flush=True)
