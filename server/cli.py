"""`dermfed`: the one command line of the project.

    dermfed <subcommand> --config PRESET [key=value ...]

PRESET is a file in configs/ (by name, e.g. `demo`) or a path; every config key can be
overridden as key=value, dotted for nested keys (data.root=/data/ham10000). `dermfed config`
prints every key with its resolved value.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import select
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from common.interrupts import Interrupted, stop_signals_raise  # standard library only: installed first

if TYPE_CHECKING:
    from common.config import DermFedConfig

log = logging.getLogger("dermfed")

OVERRIDES_HELP = "config overrides, key=value (dotted for nested keys, e.g. data.root=/data/ham10000)"


def _add_common(parser: argparse.ArgumentParser, default_preset: str = "demo") -> None:
    parser.add_argument("--config", default=default_preset, metavar="PRESET",
                        help="YAML preset: a name in configs/ (paper, demo, smoke) or a path")
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging, and stack traces with errors")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def run_folder(config: DermFedConfig, kind: str, explicit: Optional[str] = None) -> Path:
    """Where a run writes its outputs (and its resolved config.yaml)."""
    if explicit:
        return Path(explicit)
    name = config.run_name or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(config.output_dir) / name


# -- data ---------------------------------------------------------------------------------------


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
    from common.data.pipeline import prepare_data
    from common.run_files import atomic_write_text

    prepared = prepare_data(config)
    catalog = prepared.catalog
    print(format_summary(catalog))
    print("\nsplits (images):")
    print(catalog.frame.groupby(["split"]).size().to_string())
    folder = run_folder(config, "data-summary", args.out)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "summary.csv", summary_table(catalog).to_csv())
    atomic_write_text(folder / "skipped.csv", catalog.skipped.to_csv(index=False))
    atomic_write_text(folder / "summary.json", json.dumps({
        "format": config.data.format, "root": str(catalog.root), "usable": len(catalog),
        "skipped": len(catalog.skipped), "sites": {s: int(n) for s, n in catalog.frame["site"].value_counts().sort_index().items()},
        "classes": catalog.classes,
        "skip_reasons": {r: int(n) for r, n in catalog.skipped["reason"].value_counts().items()},
    }, indent=2))
    write_config(config, folder)
    print(f"\nsummary written to {folder}")
    return 0


# -- pretrain -----------------------------------------------------------------------------------


def cmd_pretrain(args: argparse.Namespace, config: DermFedConfig) -> int:
    from common.pretraining import run_pretraining

    arm = f"local-{config.data.site}" if config.data.site else "pooled"
    folder = run_folder(config, f"pretrain-{arm}", args.out)
    summary = run_pretraining(config, folder)
    print(f"checkpoint: {folder / 'checkpoint.pt'}")
    print(f"reconstructions: {summary['grid']}")
    if "privacy" in summary:
        print(f"privacy spent: epsilon={summary['privacy']['epsilon']:.3f}, delta={summary['privacy']['delta']}")
    return 0


# -- simulate -----------------------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace, config: DermFedConfig) -> int:
    from simulations.runner import (
        RunRefused,
        SimulationError,
        SimulationInterrupted,
        after_interrupt,
        resume_config,
        run_simulation,
    )

    run_dir: Optional[Path] = None
    try:
        if args.resume:
            config = resume_config(Path(args.resume), args.overrides)  # checked before anything is written
            run_dir = Path(args.resume)
        else:
            run_dir = run_folder(config, "federated", args.out)
            if (run_dir / "checkpoint.pt").exists():
                raise RunRefused(f"{run_dir} already holds a federated run; continue it with --resume {run_dir} "
                                 "or choose another --out")
            if (run_dir / "sites").exists():
                raise RunRefused(f"{run_dir} holds a federated run that completed no round; remove it or choose "
                                 "another --out")
        run_simulation(config, run_dir, resume=bool(args.resume), stop_after_round=args.stop_after_round,
                       fault_injection=args.fault_injection)
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


# -- deploy -------------------------------------------------------------------------------------


def cmd_deploy_init(args: argparse.Namespace, config: DermFedConfig) -> int:
    from server.deploy import init_federation

    layout = init_federation(Path(args.out), args.hospital, args.host, args.port, args.superlink_port,
                             args.proxy_port, args.runtime_port)
    print(f"federation created in {layout.root}:")
    print("  ca-offline/ca.key: the CA's private key. Move it offline now; nothing else needs it")
    print(f"  coordinator/: SuperLink and edge certificates (SAN: 127.0.0.1, localhost"
          f"{''.join(', ' + h for h in args.host)}), app-signing key, flwr connection; stays on this server")
    for name in layout.hospitals():
        print(f"  hospitals/{name}/: send to {name} only (its keys, client certificate, CA certificate)")
    print(f"the exact commands: {layout.root / 'COMMANDS.md'}")
    return 0


def cmd_deploy_serve(args: argparse.Namespace, config: DermFedConfig) -> int:
    from server.deploy import serve

    return serve(Path(args.dir))


def cmd_deploy_register(args: argparse.Namespace, config: DermFedConfig) -> int:
    from server.deploy import register_hospitals

    registry = register_hospitals(Path(args.dir), args.hospital or None)
    for node_id, site in sorted(registry.sites.items(), key=lambda item: item[1].index):
        print(f"registered {site.name} as node {node_id}")
    return 0


def cmd_deploy_run(args: argparse.Namespace, config: DermFedConfig) -> int:
    from server.deploy import run_federated

    run_dir = Path(args.run_dir) if args.run_dir else Path(args.dir) / "runs" / f"pretrain-{time.strftime('%Y%m%d-%H%M%S')}"
    code = run_federated(Path(args.dir), args.config, list(args.overrides), run_dir, resume=args.resume)
    print(f"flwr exited with code {code}; run folder: {run_dir}", file=sys.stderr if code else sys.stdout)
    return code


def cmd_node(args: argparse.Namespace, config: DermFedConfig) -> int:
    from client.node import run_node

    return run_node(Path(args.dir), Path(args.data_root), args.data_format,
                    Path(args.state_dir) if args.state_dir else None, args.node_config)


# -- evaluate / report ---------------------------------------------------------------------------


def cmd_evaluate(args: argparse.Namespace, config: DermFedConfig) -> int:
    from server.evaluation.arms import load_imagenet_file
    from server.evaluation.report import write_report
    from server.evaluation.run import run_evaluation

    if args.imagenet_weights:  # a wrong file is refused now, not after the other arms were evaluated
        load_imagenet_file(Path(args.imagenet_weights), config.evaluation.imagenet_model)
    folder = run_folder(config, "evaluation", args.out)
    metrics = run_evaluation(config, Path(args.checkpoint), folder, args.imagenet_weights, args.pooled, args.local)
    report = write_report(folder, metrics)
    print(f"metrics: {folder / 'metrics.json'}")
    print(f"report: {report.resolve()}")
    return 0


def cmd_report(args: argparse.Namespace, config: DermFedConfig) -> int:
    from server.evaluation.report import write_report

    print(f"report: {write_report(Path(args.run_dir)).resolve()}")
    return 0


# -- config -------------------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace, config: DermFedConfig) -> int:
    from common.config import config_to_yaml, flatten_config

    if args.flat:
        for key, value in flatten_config(config).items():
            print(f"{key}={json.dumps(value)}")
    else:
        print(config_to_yaml(config), end="")
    return 0


# -- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="dermfed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    data = sub.add_parser("data", help="generate, inspect and cache data sets", formatter_class=fmt)
    data_sub = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    synth = data_sub.add_parser("synth", help="write the embedded synthetic dermoscopy data set", formatter_class=fmt)
    synth.add_argument("--out", default=None, help="output folder (default: data.root, else data/synthetic)")
    _add_common(synth)
    synth.set_defaults(handler=cmd_data_synth)
    summary = data_sub.add_parser("summary", help="per site and class: images found, skipped and why", formatter_class=fmt)
    summary.add_argument("--out", default=None, help="folder for summary.csv/json (default: output_dir/run_name)")
    _add_common(summary)
    summary.set_defaults(handler=cmd_data_summary)

    pretrain = sub.add_parser("pretrain", help="centralised (pooled) or single-site (data.site=NAME) VAE pretraining",
                              formatter_class=fmt)
    pretrain.add_argument("--out", default=None, help="run folder (default: output_dir/run_name)")
    _add_common(pretrain)
    pretrain.set_defaults(handler=cmd_pretrain)

    simulate = sub.add_parser("simulate", help="federated pretraining of N virtual hospitals (Flower simulation engine)",
                              formatter_class=fmt)
    simulate.add_argument("--out", default=None, help="run folder (default: output_dir/run_name)")
    simulate.add_argument("--resume", default=None, metavar="RUN_DIR",
                          help="continue RUN_DIR from its last completed round (its config.yaml, plus overrides)")
    simulate.add_argument("--stop-after-round", type=int, default=None, metavar="R",
                          help="stop after round R (resume later with --resume)")
    simulate.add_argument("--fault-injection", default="", help=argparse.SUPPRESS)  # tests only: client/faults.py
    _add_common(simulate)
    simulate.set_defaults(handler=cmd_simulate)

    deploy = sub.add_parser("deploy", help="a real federation: keys, coordinator daemons, registration, signed runs",
                            formatter_class=fmt)
    deploy_sub = deploy.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = deploy_sub.add_parser("init", help="CA, certificates, keys and folders for the coordinator and each hospital",
                                 formatter_class=fmt)
    init.add_argument("--out", required=True, help="new folder for the federation's files")
    init.add_argument("--hospital", action="append", default=[], metavar="NAME", help="a hospital (repeat)")
    init.add_argument("--host", action="append", default=[], metavar="HOST",
                      help="the coordinator's public host name or IP, as hospitals reach it (repeat; first is used)")
    init.add_argument("--port", type=int, default=9092, help="the edge proxy's public port")
    init.add_argument("--superlink-port", type=int, default=9091, help="the SuperLink's port on 127.0.0.1")
    init.add_argument("--proxy-port", type=int, default=9095, help="each hospital's local forwarder port")
    init.add_argument("--runtime-port", type=int, default=9094, help="each hospital's SuperNode runtime API port")
    _add_common(init)
    init.set_defaults(handler=cmd_deploy_init)
    serve = deploy_sub.add_parser("serve", help="run the SuperLink (loopback) and the edge proxy until stopped",
                                  formatter_class=fmt)
    serve.add_argument("--dir", required=True, help="the folder made by `dermfed deploy init`")
    _add_common(serve)
    serve.set_defaults(handler=cmd_deploy_serve)
    register = deploy_sub.add_parser("register", help="register hospitals' keys; write the site registry",
                                     formatter_class=fmt)
    register.add_argument("--dir", required=True, help="the folder made by `dermfed deploy init`")
    register.add_argument("--hospital", action="append", default=[], metavar="NAME", help="only these (default: all)")
    _add_common(register)
    register.set_defaults(handler=cmd_deploy_register)
    run = deploy_sub.add_parser("run", help="build, sign and submit federated pretraining", formatter_class=fmt)
    run.add_argument("--dir", required=True, help="the folder made by `dermfed deploy init`")
    run.add_argument("--run-dir", default=None, help="where checkpoints and history go (default: DIR/runs/pretrain-TIME)")
    run.add_argument("--resume", action="store_true", help="continue --run-dir from its last completed round")
    _add_common(run, default_preset="paper")
    run.set_defaults(handler=cmd_deploy_run)

    node = sub.add_parser("node", help="a hospital's daemon: forwarder, SuperNode and verifying SuperExec",
                          formatter_class=fmt)
    node.add_argument("--dir", required=True, help="this hospital's folder from `dermfed deploy init`")
    node.add_argument("--data-root", required=True, help="the hospital's image folder (never leaves it)")
    node.add_argument("--data-format", default="folder", help="layout of --data-root (see data.format)")
    node.add_argument("--state-dir", default=None, help="site state and privacy ledger (default: ~/.dermfed/state)")
    node.add_argument("--node-config", default="", metavar="'key=value ...'",
                      help="more node config, e.g. 'dp-enabled=true dp-max-epsilon=8'")
    _add_common(node)
    node.set_defaults(handler=cmd_node)

    config = sub.add_parser("config", help="print the resolved configuration (every key)", formatter_class=fmt)
    config.add_argument("--flat", action="store_true", help="one key=value line per key")
    _add_common(config)
    config.set_defaults(handler=cmd_config)

    evaluate = sub.add_parser("evaluate", help="frozen encoders against ImageNet ConvNeXt-Tiny under identical heads",
                              formatter_class=fmt)
    evaluate.add_argument("--checkpoint", required=True, metavar="RUN_DIR",
                          help="pretraining run folder or checkpoint.pt (arm A: the federated encoder)")
    evaluate.add_argument("--imagenet-weights", default=None, metavar="FILE",
                          help="arm B's ImageNet weights file (default: the Hugging Face cache, offline)")
    evaluate.add_argument("--pooled", default=None, metavar="RUN_DIR", help="arm D: a pooled `dermfed pretrain` run")
    evaluate.add_argument("--local", default=None, metavar="RUN_DIR", help="arm E: a local-only `dermfed pretrain` run")
    evaluate.add_argument("--out", default=None, help="run folder (default: output_dir/run_name)")
    _add_common(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)
    report = sub.add_parser("report", help="(re)write the HTML report of an evaluation run", formatter_class=fmt)
    report.add_argument("run_dir", metavar="RUN_DIR", help="an evaluation run folder (with metrics.json)")
    _add_common(report)
    report.set_defaults(handler=cmd_report)
    return parser


# Errors that are the input's, not the program's: one line, exit code 2. Named, not imported: an error of
# one of these classes can only exist once its module was imported, so `dermfed config` imports none of them.
USER_ERRORS = (("common.config", "ConfigError"), ("common.data.catalog", "DataError"),
               ("common.privacy", "PrivacyBudgetExhausted"), ("server.deploy", "DeployError"),
               ("client.node", "NodeError"), ("common.checkpoint", "CheckpointError"),
               ("server.evaluation.arms", "WeightsFileError"))


def is_user_error(exc: BaseException) -> bool:
    return any(module in sys.modules and isinstance(exc, getattr(sys.modules[module], name, ()))
               for module, name in USER_ERRORS)


# What a file-system error means for the person who typed the command, and what to do about it.
FILE_SYSTEM_ERRORS = {
    errno.ENOENT: ("does not exist", "check the path"),
    errno.EACCES: ("permission denied", "give this user access to it, or choose another path"),
    errno.EPERM: ("operation not permitted", "give this user access to it, or choose another path"),
    errno.ENOTDIR: ("a part of this path is a file, not a folder", "choose another path"),
    errno.EEXIST: ("exists already, and is not a folder", "choose another path, or move the file away"),
    errno.EISDIR: ("is a folder where a file is needed", "choose another path"),
    errno.EROFS: ("is on a read-only file system", "choose a writable location"),
    errno.ENOSPC: ("no space left on the device", "free space there or choose another location"),
    errno.EDQUOT: ("disk quota exceeded", "free space there or choose another location"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.ELOOP: ("too many levels of symbolic links", "fix the links"),
}


def file_system_message(exc: OSError) -> Optional[str]:
    """One line for an operating-system error about a path (None: not one of those, a bug)."""
    if exc.errno not in FILE_SYSTEM_ERRORS:
        return str(exc) if isinstance(exc, FileNotFoundError) and exc.errno is None else None  # our own message
    what, todo = FILE_SYSTEM_ERRORS[exc.errno]
    where = os.fsdecode(exc.filename) if exc.filename is not None else "(a file of this command)"
    return f"{where}: {what}; {todo}"


def _stdout_is_gone() -> bool:
    """Whether the reader of our standard output went away (`dermfed config | head`), not some other pipe or socket."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def parse_arguments(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Options may come after the key=value overrides (`dermfed pretrain a=b --out X c=d`)."""
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides:
        args.overrides = [*getattr(args, "overrides", []), *overrides]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    with stop_signals_raise():  # first: a SIGTERM during the imports below is a message and exit code 130 too
        return _main(argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    verbose, command = False, "dermfed"
    try:
        parser = build_parser()
        args = parse_arguments(parser, argv)
        verbose, command = args.verbose, f"dermfed {args.command}"
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        from common.config import load_config

        config = load_config(args.config, args.overrides)
        return args.handler(args, config)
    except Interrupted as exc:
        return _fail(f"{command}: interrupted by {exc.signal_name}", verbose, 130)
    except BrokenPipeError:
        if not _stdout_is_gone():
            return _unexpected(sys.exc_info()[1], verbose)  # type: ignore[arg-type]
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to write; no second error at exit
        return 141  # as a program ended by SIGPIPE: what a shell expects of `... | head`
    except OSError as exc:
        message = file_system_message(exc)
        return _fail(f"dermfed: error: {message}", verbose, 2) if message else _unexpected(exc, verbose)
    except Exception as exc:  # noqa: BLE001 - one line for the user; the stack trace with -v
        return _fail(f"dermfed: error: {exc}", verbose, 2) if is_user_error(exc) else _unexpected(exc, verbose)


def _fail(message: str, verbose: bool, code: int) -> int:
    print(message, file=sys.stderr)
    if verbose:
        traceback.print_exc()
    return code


def _unexpected(exc: BaseException, verbose: bool) -> int:
    return _fail(f"dermfed: unexpected error: {type(exc).__name__}: {exc} (run again with -v for the stack trace)",
                 verbose, 1)


if __name__ == "__main__":
    sys.exit(main())
