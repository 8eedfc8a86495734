"""`dermfed simulate`: N virtual hospitals through Flower's simulation engine, or `--resume` of a run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from common.interrupts import Interrupted
from server.cli.options import add_common, add_force, claim_out, out_folder

if TYPE_CHECKING:
    from common.config import DermFedConfig


def cmd_simulate(args: argparse.Namespace, config: DermFedConfig) -> int:
    from simulations.runner import (
        RunRefused,
        SimulationError,
        SimulationInterrupted,
        after_interrupt,
        resume_config,
        run_simulation,
    )

    from common.config import ConfigError
    from common.run_folder import SIMULATE, RunFolderError
    from simulations.node_configs import parse_node_configs

    try:
        node_configs = parse_node_configs(args.node_config, args.node_config_file)
    except ConfigError as exc:
        print(f"dermfed simulate: {exc}", file=sys.stderr)
        return 2

    run_dir: Optional[Path] = None
    try:
        if args.resume:
            if args.out or args.force:
                raise RunRefused("--resume continues RUN_DIR in place: --out and --force do not apply to it")
            # the run's own config plus the overrides, validated once, together; checked before anything is written
            config = resume_config(Path(args.resume), args.overrides)
            run_dir = Path(args.resume)
        if args.stop_after_round is not None and not 1 <= args.stop_after_round <= config.federation.num_rounds:
            raise RunRefused(f"--stop-after-round {args.stop_after_round}: rounds are counted from 1, and this run has "
                             f"{config.federation.num_rounds} rounds (federation.num_rounds)")
        if not args.resume:  # last: --force moves the old run only once nothing else can refuse the command
            run_dir = out_folder(config, "federated", args.out)
            try:
                claim_out(run_dir, SIMULATE, args.force)
            except RunFolderError as exc:
                raise RunRefused(str(exc)) from None
        run_simulation(config, run_dir, resume=bool(args.resume), stop_after_round=args.stop_after_round,
                       fault_injection=args.fault_injection, node_configs=node_configs, verbose=args.verbose)
    except RunRefused as exc:
        print(f"dermfed simulate: refused: {exc}", file=sys.stderr)
        return 2
    except SimulationInterrupted as exc:
        print(f"dermfed simulate: {exc}", file=sys.stderr)
        return 130
    except Interrupted as exc:  # before the run began or after it ended
        left = after_interrupt(run_dir.resolve(), config.federation.num_rounds) if run_dir else "nothing was started"
        print(f"dermfed simulate: interrupted by {exc.signal_name}: {left}", file=sys.stderr)
        return 130
    except SimulationError as exc:
        print(f"dermfed simulate: {exc}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    simulate = sub.add_parser("simulate", help="federated pretraining of N virtual hospitals (Flower simulation engine)",
                              formatter_class=fmt)
    simulate.add_argument("--out", default=None, help="run folder (default: output_dir/run_name)")
    add_force(simulate)
    simulate.add_argument("--resume", default=None, metavar="RUN_DIR",
                          help="continue RUN_DIR from its last completed round (its config.yaml, plus overrides)")
    simulate.add_argument("--stop-after-round", type=int, default=None, metavar="R",
                          help="stop after round R (resume later with --resume)")
    simulate.add_argument("--node-config", action="append", default=[], metavar="SITE:CONFIG",
                          help="a simulated hospital's own node config, as a real hospital's IT sets it, e.g. "
                               "hospital_2:'dp-enabled=true dp-max-epsilon=4' (repeat for more hospitals)")
    simulate.add_argument("--node-config-file", default=None, metavar="FILE",
                          help="YAML or TOML file mapping each site's name to its node config (string or mapping)")
    simulate.add_argument("--fault-injection", default="", help=argparse.SUPPRESS)  # tests only: client/faults.py
    add_common(simulate)
    simulate.set_defaults(handler=cmd_simulate, resume_from_run=True)
