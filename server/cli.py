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


def refuse_another_run(folder: Path, kind: str) -> None:
    """A command's `--out` may not hold another command's run: its config.yaml and results would be overwritten."""
    from common.config import ConfigError
    from common.run_kinds import refuse_other_kind

    if why := refuse_other_kind(folder, kind):
        raise ConfigError(why)


def refuse_evaluation_out(folder: Path, inputs: dict[str, Optional[str]]) -> None:
    """`evaluate --out` never lies in a run it reads, nor in any folder holding a checkpoint.pt (it would overwrite
    that run's config.yaml and mix its metrics in)."""
    from common.checkpoint import CHECKPOINT_NAME
    from common.config import ConfigError

    out = folder.resolve()
    for option, given in inputs.items():
        if not given:
            continue
        run = Path(given).resolve()
        inside = out == run or out.is_relative_to(run)  # a run folder, and all below it
        if run.is_file():  # a checkpoint file: only its own folder, whose config.yaml describes it
            inside = out == run.parent
        if inside:
            raise ConfigError(f"--out {folder} lies in the {option} run {given}: evaluate writes its config.yaml and "
                              "metrics there; choose another --out")
    if (folder / CHECKPOINT_NAME).exists():
        raise ConfigError(f"--out {folder} holds a {CHECKPOINT_NAME} (a pretraining or simulation run): evaluate would "
                          "overwrite its config.yaml; choose another --out")
    refuse_another_run(folder, "evaluate")


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

    folder = run_folder(config, "data-summary", args.out)
    refuse_another_run(folder, "data summary")
    prepared = prepare_data(config)
    catalog = prepared.catalog
    print(format_summary(catalog))
    print("\nsplits (images):")
    print(catalog.frame.groupby(["split"]).size().to_string())
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
    refuse_another_run(folder, "pretrain")
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

    from common.config import ConfigError
    from simulations.node_configs import parse_node_configs

    try:
        node_configs = parse_node_configs(args.node_config, args.node_config_file)
    except ConfigError as exc:
        print(f"dermfed simulate: {exc}", file=sys.stderr)
        return 2

    run_dir: Optional[Path] = None
    try:
        if args.resume:
            config = resume_config(Path(args.resume), args.overrides)  # checked before anything is written
            run_dir = Path(args.resume)
        else:
            run_dir = run_folder(config, "federated", args.out)
            refuse_another_run(run_dir, "simulate")
            if (run_dir / "checkpoint.pt").exists():
                raise RunRefused(f"{run_dir} already holds a federated run; continue it with --resume {run_dir} "
                                 "or choose another --out")
            if (run_dir / "sites").exists():
                raise RunRefused(f"{run_dir} holds a federated run that completed no round; remove it or choose "
                                 "another --out")
        if args.stop_after_round is not None and not 1 <= args.stop_after_round <= config.federation.num_rounds:
            raise RunRefused(f"--stop-after-round {args.stop_after_round}: rounds are counted from 1, and this run has "
                             f"{config.federation.num_rounds} rounds (federation.num_rounds)")
        run_simulation(config, run_dir, resume=bool(args.resume), stop_after_round=args.stop_after_round,
                       fault_injection=args.fault_injection, node_configs=node_configs)
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

    layout = init_federation(Path(args.out), args.host, args.port, args.max_body_mb, args.max_connections)
    print(f"federation created in {layout.root}:")
    print("  ca-offline/: the CA's key. Move it to offline storage now; `add-hospital` and `revoke` need it again")
    print("  operator/: the operator's app-signing key. Move it to the operator's workstation now (`deploy sign`)")
    print(f"  coordinator/: SuperLink and edge certificates (SAN: 127.0.0.1, localhost"
          f"{''.join(', ' + h for h in args.host)}), revocation list, site registry; stays on this server")
    print("`deploy serve` refuses to start while ca-offline/ca.key or operator/app-signing.key are still here.")
    print(f"the exact commands: {layout.root / 'COMMANDS.md'}")
    return 0


def cmd_deploy_add_hospital(args: argparse.Namespace, config: DermFedConfig) -> int:
    from common.deployment.layout import FederationLayout
    from server.deploy import add_hospital

    entry = add_hospital(Path(args.dir), Path(args.request), Path(args.ca_key) if args.ca_key else None)
    folder = FederationLayout(Path(args.dir)).hospital_dir(entry["name"])
    print(f"added {entry['name']} (index {entry['index']}, certificate serial {entry['certificate_serial']}); send "
          f"the public files in {folder} to it, then run `dermfed deploy register --dir {args.dir}`")
    return 0


def cmd_deploy_serve(args: argparse.Namespace, config: DermFedConfig) -> int:
    from server.deploy import serve

    return serve(Path(args.dir))


def cmd_deploy_register(args: argparse.Namespace, config: DermFedConfig) -> int:
    from server.deploy import register_hospitals

    registry = register_hospitals(Path(args.dir), args.hospital or None)
    for node_id, site in sorted(registry.sites.items(), key=lambda item: item[1].index):
        print(f"{'revoked' if site.revoked else 'registered'} {site.name} as node {node_id}")
    return 0


def cmd_deploy_revoke(args: argparse.Namespace, config: DermFedConfig) -> int:
    from server.deploy import revoke_hospital

    outcome = revoke_hospital(Path(args.dir), args.hospital, Path(args.ca_key) if args.ca_key else None)
    edge = "reloaded: refused from now on" if outcome["edge_reloaded"] else "not running: refused when it starts"
    node = (f"node {outcome['node']} unregistered" if outcome["unregistered"]
            else "no registered node" if outcome["node"] is None else f"node {outcome['node']} marked revoked")
    print(f"revoked {outcome['name']}: certificate serial {outcome['serial']} in the revocation list (edge {edge}); "
          f"{node}")
    return 0


def cmd_deploy_ls(args: argparse.Namespace, config: DermFedConfig) -> int:
    from server.deploy import list_federation

    print(list_federation(Path(args.dir)))
    return 0


def cmd_deploy_sign(args: argparse.Namespace, config: DermFedConfig) -> int:
    from server.deploy.sign import build_manifest, write_manifest

    manifest = build_manifest(Path(args.operator), args.config, list(args.overrides), args.run_dir, args.resume,
                              args.valid_hours)
    path = write_manifest(manifest, Path(args.operator), Path(args.out))
    print(f"signed run {manifest.run} of app bundle sha256 {manifest.bundle_sha256}, valid until "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(manifest.expires))}: {path}")
    print("hospitals run it only if they approved this bundle hash (`dermfed node approve`)")
    return 0


def cmd_deploy_run(args: argparse.Namespace, config: DermFedConfig) -> int:
    from server.deploy import submit_run

    code = submit_run(Path(args.dir), Path(args.manifest))
    print(f"flwr exited with code {code}", file=sys.stderr if code else sys.stdout)
    return code


def cmd_node_start(args: argparse.Namespace, config: DermFedConfig) -> int:
    from client.node import run_node

    return run_node(Path(args.dir), Path(args.data_root), args.data_format,
                    Path(args.state_dir) if args.state_dir else None, args.node_config)


def cmd_node_keygen(args: argparse.Namespace, config: DermFedConfig) -> int:
    from client.node import keygen

    request = keygen(Path(args.dir), args.name)
    print(f"keys made in {args.dir} (auth_key, client.key: they never leave this machine); send {request} to the "
          "coordinator and copy the files it sends back into the same folder")
    return 0


def cmd_node_bundle_hash(args: argparse.Namespace, config: DermFedConfig) -> int:
    from client.node import bundle_hash

    print(bundle_hash(Path(args.source)))
    return 0


def cmd_node_approve(args: argparse.Namespace, config: DermFedConfig) -> int:
    from client.node import approve

    added = approve(Path(args.dir), args.sha256, args.note)
    print(f"{'approved' if added else 'already approved'}: {args.sha256.strip().lower()}")
    return 0


# -- evaluate / report ---------------------------------------------------------------------------


def cmd_evaluate(args: argparse.Namespace, config: DermFedConfig) -> int:
    from server.evaluation.arms import arm_inputs
    from server.evaluation.report import write_report
    from server.evaluation.run import run_evaluation

    config = with_external_sets(config, args.external)
    inputs = arm_inputs(args, config)  # checked now (a wrong weights file), not after the other arms were evaluated
    folder = run_folder(config, "evaluation", args.out)
    refuse_evaluation_out(folder, inputs.runs())
    metrics = run_evaluation(config, Path(args.checkpoint), folder, inputs.given)
    report = write_report(folder, metrics)
    print(f"metrics: {folder / 'metrics.json'}")
    print(f"report: {report.resolve()}")
    return 0


def parse_external(spec: str) -> dict[str, str]:
    """`FORMAT:ROOT[:NAME]` -> an `evaluation.external` entry (a ROOT holding ':' needs the config list)."""
    from common.config import ConfigError

    fmt, _, rest = spec.partition(":")
    root, name = rest.rsplit(":", 1) if ":" in rest else (rest, "")
    if not fmt or not root:
        raise ConfigError(f"--external {spec!r}: expected FORMAT:ROOT[:NAME], e.g. isic-gt:/data/isic2018-task3-test:isic2018")
    return {"format": fmt, "root": root, **({"name": name} if name else {})}


def with_external_sets(config: DermFedConfig, specs: Sequence[str]) -> DermFedConfig:
    """The config's `evaluation.external` list (its one owner), extended by `--external` flags and validated."""
    from common.config import build_config

    if not specs:
        return config
    tree = config.model_dump(mode="json")
    tree["evaluation"]["external"] = [*tree["evaluation"]["external"], *(parse_external(spec) for spec in specs)]
    return build_config(tree)


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
    from common.config import PROJECT_ROOT
    from common.deployment.proxy import DEFAULT_MAX_BODY_MB, DEFAULT_MAX_CONNECTIONS
    from server.evaluation.arms import add_arm_arguments  # the arms' registry alone: no torch, no timm

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
    simulate.add_argument("--node-config", action="append", default=[], metavar="SITE:CONFIG",
                          help="a simulated hospital's own node config, as a real hospital's IT sets it, e.g. "
                               "hospital_2:'dp-enabled=true dp-max-epsilon=4' (repeat for more hospitals)")
    simulate.add_argument("--node-config-file", default=None, metavar="FILE",
                          help="YAML or TOML file mapping each site's name to its node config (string or mapping)")
    simulate.add_argument("--fault-injection", default="", help=argparse.SUPPRESS)  # tests only: client/faults.py
    _add_common(simulate)
    simulate.set_defaults(handler=cmd_simulate)

    deploy = sub.add_parser("deploy", help="a real federation: keys, coordinator daemons, hospitals, signed runs",
                            formatter_class=fmt)
    deploy_sub = deploy.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = deploy_sub.add_parser("init", help="the CA, the coordinator's certificates and the operator's signing key",
                                 formatter_class=fmt)
    init.add_argument("--out", required=True, help="new folder for the federation's files")
    init.add_argument("--host", action="append", default=[], metavar="HOST",
                      help="the coordinator's public host name or IP, as hospitals reach it (repeat; first is used)")
    init.add_argument("--port", type=int, default=9092, help="the edge proxy's public port (1-65535)")
    init.add_argument("--max-body-mb", type=int, default=DEFAULT_MAX_BODY_MB,
                      help="the largest request body the edge passes (Flower sends arrays in chunks of 5 MiB)")
    init.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                      help="requests the edge serves at once per client certificate")
    _add_common(init)
    init.set_defaults(handler=cmd_deploy_init)
    add = deploy_sub.add_parser("add-hospital", help="sign a hospital's certificate request; keep its public node key",
                                formatter_class=fmt)
    add.add_argument("--dir", required=True, help="the folder made by `dermfed deploy init`")
    add.add_argument("--request", required=True, help="the hospital's request.json from `dermfed node keygen`")
    add.add_argument("--ca-key", default=None, help="the CA key brought from offline storage (default: "
                     "DIR/ca-offline/ca.key)")
    _add_common(add)
    add.set_defaults(handler=cmd_deploy_add_hospital)
    serve = deploy_sub.add_parser("serve", help="run the SuperLink (private network) and the edge proxy until stopped",
                                  formatter_class=fmt)
    serve.add_argument("--dir", required=True, help="the folder made by `dermfed deploy init`")
    _add_common(serve)
    serve.set_defaults(handler=cmd_deploy_serve)
    register = deploy_sub.add_parser("register", help="register hospitals' node keys; write the site registry",
                                     formatter_class=fmt)
    register.add_argument("--dir", required=True, help="the folder made by `dermfed deploy init`")
    register.add_argument("--hospital", action="append", default=[], metavar="NAME", help="only these (default: all)")
    _add_common(register)
    register.set_defaults(handler=cmd_deploy_register)
    revoke = deploy_sub.add_parser("revoke", help="revoke a hospital: its certificate at the edge, its node",
                                   formatter_class=fmt)
    revoke.add_argument("hospital", metavar="HOSPITAL", help="the hospital's name")
    revoke.add_argument("--dir", required=True, help="the folder made by `dermfed deploy init`")
    revoke.add_argument("--ca-key", default=None, help="the CA key brought from offline storage (default: "
                        "DIR/ca-offline/ca.key)")
    _add_common(revoke)
    revoke.set_defaults(handler=cmd_deploy_revoke)
    ls = deploy_sub.add_parser("ls", help="the SuperLink's nodes and runs (operator only)", formatter_class=fmt)
    ls.add_argument("--dir", required=True, help="the folder made by `dermfed deploy init`")
    _add_common(ls)
    ls.set_defaults(handler=cmd_deploy_ls)
    sign = deploy_sub.add_parser("sign", help="on the operator's workstation: sign a run manifest", formatter_class=fmt)
    sign.add_argument("--operator", required=True, help="the operator/ folder made by `dermfed deploy init`")
    sign.add_argument("--run-dir", required=True, help="where checkpoints and history go, on the coordinator's server")
    sign.add_argument("--resume", action="store_true", help="continue --run-dir from its last completed round")
    sign.add_argument("--valid-hours", type=float, default=24.0, help="hospitals refuse to start the run after this")
    sign.add_argument("--out", required=True, help="the signed manifest file to write")
    _add_common(sign, default_preset="paper")
    sign.set_defaults(handler=cmd_deploy_sign)
    run = deploy_sub.add_parser("run", help="submit a signed run manifest", formatter_class=fmt)
    run.add_argument("--dir", required=True, help="the folder made by `dermfed deploy init`")
    run.add_argument("--manifest", required=True, help="the file `dermfed deploy sign` wrote")
    _add_common(run)
    run.set_defaults(handler=cmd_deploy_run)

    node = sub.add_parser("node", help="a hospital: its keys, its approvals, its daemon", formatter_class=fmt)
    node_sub = node.add_subparsers(dest="action", required=True, metavar="ACTION")
    keygen = node_sub.add_parser("keygen", help="this hospital's keys and certificate request (keys stay here)",
                                 formatter_class=fmt)
    keygen.add_argument("--dir", required=True, help="new folder for this hospital's keys (mode 0700)")
    keygen.add_argument("--name", required=True, help="the hospital's name in the federation")
    _add_common(keygen)
    keygen.set_defaults(handler=cmd_node_keygen)
    bundle = node_sub.add_parser("bundle-hash", help="the sha256 of the app bundle a DermFed source tree builds",
                                 formatter_class=fmt)
    bundle.add_argument("--source", default=str(PROJECT_ROOT), help="a DermFed source tree (the reviewed release)")
    _add_common(bundle)
    bundle.set_defaults(handler=cmd_node_bundle_hash)
    approve = node_sub.add_parser("approve", help="approve an app bundle by its sha256", formatter_class=fmt)
    approve.add_argument("sha256", help="the bundle's sha256 (`dermfed node bundle-hash` of the reviewed release)")
    approve.add_argument("--dir", required=True, help="this hospital's folder")
    approve.add_argument("--note", default="", help="a note kept beside the hash (release, reviewer)")
    _add_common(approve)
    approve.set_defaults(handler=cmd_node_approve)
    start = node_sub.add_parser("start", help="the hospital's daemon: forwarder, SuperNode and verifying SuperExec",
                                formatter_class=fmt)
    start.add_argument("--dir", required=True, help="this hospital's folder")
    start.add_argument("--data-root", required=True, help="the hospital's image folder (never leaves it)")
    start.add_argument("--data-format", default="folder", help="layout of --data-root (see data.format)")
    start.add_argument("--state-dir", default=None, help="site state and privacy ledger (default: ~/.dermfed/state)")
    start.add_argument("--node-config", default="", metavar="'key=value ...'",
                       help="more node config, e.g. 'dp-enabled=true dp-max-epsilon=8 min-batch-size=16'")
    _add_common(start)
    start.set_defaults(handler=cmd_node_start)

    config = sub.add_parser("config", help="print the resolved configuration (every key)", formatter_class=fmt)
    config.add_argument("--flat", action="store_true", help="one key=value line per key")
    _add_common(config)
    config.set_defaults(handler=cmd_config)

    evaluate = sub.add_parser("evaluate", help="frozen encoders against ImageNet ConvNeXt-Tiny under identical heads",
                              formatter_class=fmt)
    add_arm_arguments(evaluate)  # --checkpoint, --imagenet-weights, --pooled, --local: each arm's own option
    evaluate.add_argument("--external", action="append", default=[], metavar="FORMAT:ROOT[:NAME]",
                          help="also score the heads on this labelled data set, all of it test data (repeat; "
                               "adds to evaluation.external)")
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
        from server.evaluation.arms import check_arm_names

        config = load_config(args.config, args.overrides)
        check_arm_names(config.evaluation.arms)  # against the arms' registry, for every command as for the config
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
