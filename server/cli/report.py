"""`dermfed report`: (re)write an evaluation run's HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from server.cli.options import add_common

if TYPE_CHECKING:
    from common.config import DermFedConfig


def cmd_report(args: argparse.Namespace, config: DermFedConfig) -> int:
    from server.evaluation.report import write_report

    print(f"report: {write_report(Path(args.run_dir)).resolve()}")
    return 0


def register(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    report = sub.add_parser("report", help="(re)write the HTML report of an evaluation run", formatter_class=fmt)
    report.add_argument("run_dir", metavar="RUN_DIR", help="an evaluation run folder (with metrics.json)")
    add_common(report)
    report.set_defaults(handler=cmd_report)
