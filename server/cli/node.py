"""`dermfed node ...`: a hospital's keys, approvals and daemon."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from server.cli.options import add_common

if TYPE_CHECKING:
    from common.config import DermFedConfig


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


def register(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    from common.config import PROJECT_ROOT

    node = sub.add_parser("node", help="a hospital: its keys, its approvals, its daemon", formatter_class=fmt)
    node_sub = node.add_subparsers(dest="action", required=True, metavar="ACTION")
    keygen = node_sub.add_parser("keygen", help="this hospital's keys and certificate request (keys stay here)",
                                 formatter_class=fmt)
    keygen.add_argument("--dir", required=True, help="new folder for this hospital's keys (mode 0700)")
    keygen.add_argument("--name", required=True, help="the hospital's name in the federation")
    add_common(keygen)
    keygen.set_defaults(handler=cmd_node_keygen)
    bundle = node_sub.add_parser("bundle-hash", help="the sha256 of the app bundle a DermFed source tree builds",
                                 formatter_class=fmt)
    bundle.add_argument("--source", default=str(PROJECT_ROOT), help="a DermFed source tree (the reviewed release)")
    add_common(bundle)
    bundle.set_defaults(handler=cmd_node_bundle_hash)
    approve = node_sub.add_parser("approve", help="approve an app bundle by its sha256", formatter_class=fmt)
    approve.add_argument("sha256", help="the bundle's sha256 (`dermfed node bundle-hash` of the reviewed release)")
    approve.add_argument("--dir", required=True, help="this hospital's folder")
    approve.add_argument("--note", default="", help="a note kept beside the hash (release, reviewer)")
    add_common(approve)
    approve.set_defaults(handler=cmd_node_approve)
    start = node_sub.add_parser("start", help="the hospital's daemon: forwarder, SuperNode and verifying SuperExec",
                                formatter_class=fmt)
    start.add_argument("--dir", required=True, help="this hospital's folder")
    start.add_argument("--data-root", required=True, help="the hospital's image folder (never leaves it)")
    start.add_argument("--data-format", default="folder", help="layout of --data-root (see data.format)")
    start.add_argument("--state-dir", default=None, help="site state and privacy ledger (default: ~/.dermfed/state)")
    start.add_argument("--node-config", default="", metavar="'key=value ...'",
                       help="more node config, e.g. 'dp-enabled=true dp-max-epsilon=8 min-batch-size=16'")
    add_common(start)
    start.set_defaults(handler=cmd_node_start)
