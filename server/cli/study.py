"""`dermfed study`: the paper's protocol end to end from one config (`server/study.py`), each step a `dermfed` command."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Optional

from server.cli.options import add_common, add_force, out_folder

if TYPE_CHECKING:
    from common.config import DermFedConfig


def run_command(argv: list[str], config: Optional[DermFedConfig]) -> int:
    """One `dermfed` command, parsed by the real parser and run by its own handler with `config` (None: the handler
    reads its own, as `simulate --resume` does)."""
    from server.cli.main import build_parser, parse_arguments

    args = parse_arguments(build_parser(), argv)
    return int(args.handler(args, config))


def cmd_study(args: argparse.Namespace, config: DermFedConfig) -> int:
    from server.evaluation.arms import ARMS
    from server.study import run_study

    given = {name: getattr(args, arm.input.dest) for name, arm in ARMS.items()
             if arm.input is not None and arm.input.kind != "run" and getattr(args, arm.input.dest, None)}
    for name, value in given.items():
        ARMS[name].check(value, config)  # a wrong weights file: refused now, not after the pretraining steps
    passed = [word for name, value in given.items() for word in (ARMS[name].input.flag, value)]  # type: ignore[union-attr]
    return run_study(config, out_folder(config, "study", args.out), args.force, run_command, passed)


def register(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    from server.evaluation.arms import ARMS  # the arms' registry alone: no torch, no timm

    study = sub.add_parser("study", formatter_class=fmt,
                           help="the study end to end: federated pretraining per objective (study.objectives), the "
                                "pooled and local-only controls, one evaluation of every arm and its report")
    study.add_argument("--out", default=None, help="study folder, one subfolder per step (default: output_dir/run_name); "
                                                   "an unfinished study there is continued")
    add_force(study)
    for arm in ARMS.values():  # the arms' inputs that are not the study's own runs (ImageNet weights), as evaluate's
        if arm.input is not None and arm.input.kind != "run":
            study.add_argument(arm.input.flag, default=None, metavar=arm.input.metavar, help=arm.input.help)
    add_common(study)
    study.set_defaults(handler=cmd_study)
