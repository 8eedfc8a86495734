"""`dermfed deploy ...`: the coordinator's and the operator's commands of a real federation."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from server.cli.options import add_common

if TYPE_CHECKING:
    from common.config import DermFedConfig


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


def register(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    from common.deployment.proxy import DEFAULT_MAX_BODY_MB, DEFAULT_MAX_CONNECTIONS

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
    add_common(init)
    init.set_defaults(handler=cmd_deploy_init)
    add = deploy_sub.add_parser("add-hospital", help="sign a hospital's certificate request; keep its public node key",
                                formatter_class=fmt)
    add.add_argument("--dir", required=True, help="the folder made by `dermfed deploy init`")
    add.add_argument("--request", required=True, help="the hospital's request.json from `dermfed node keygen`")
    add.add_argument("--ca-key", default=None, help="the CA key brought from offline storage (default: "
                     "DIR/ca-offline/ca.key)")
    add_common(add)
    add.set_defaults(handler=cmd_deploy_add_hospital)
    serve = deploy_sub.add_parser("serve", help="run the SuperLink (private network) and the edge proxy until stopped",
                                  formatter_class=fmt)
    serve.add_argument("--dir", required=True, help="the folder made by `dermfed deploy init`")
    add_common(serve)
    serve.set_defaults(handler=cmd_deploy_serve)
    register = deploy_sub.add_parser("register", help="register hospitals' node keys; write the site registry",
                                     formatter_class=fmt)
    register.add_argument("--dir", required=True, help="the folder made by `dermfed deploy init`")
    register.add_argument("--hospital", action="append", default=[], metavar="NAME", help="only these (default: all)")
    add_common(register)
    register.set_defaults(handler=cmd_deploy_register)
    revoke = deploy_sub.add_parser("revoke", help="revoke a hospital: its certificate at the edge, its node",
                                   formatter_class=fmt)
    revoke.add_argument("hospital", metavar="HOSPITAL", help="the hospital's name")
    revoke.add_argument("--dir", required=True, help="the folder made by `dermfed deploy init`")
    revoke.add_argument("--ca-key", default=None, help="the CA key brought from offline storage (default: "
                        "DIR/ca-offline/ca.key)")
    add_common(revoke)
    revoke.set_defaults(handler=cmd_deploy_revoke)
    ls = deploy_sub.add_parser("ls", help="the SuperLink's nodes and runs (operator only)", formatter_class=fmt)
    ls.add_argument("--dir", required=True, help="the folder made by `dermfed deploy init`")
    add_common(ls)
    ls.set_defaults(handler=cmd_deploy_ls)
    sign = deploy_sub.add_parser("sign", help="on the operator's workstation: sign a run manifest", formatter_class=fmt)
    sign.add_argument("--operator", required=True, help="the operator/ folder made by `dermfed deploy init`")
    sign.add_argument("--run-dir", required=True, help="where checkpoints and history go, on the coordinator's server")
    sign.add_argument("--resume", action="store_true", help="continue --run-dir from its last completed round")
    sign.add_argument("--valid-hours", type=float, default=24.0, help="hospitals refuse to start the run after this")
    sign.add_argument("--out", required=True, help="the signed manifest file to write")
    add_common(sign, default_preset="paper")
    sign.set_defaults(handler=cmd_deploy_sign)
    run = deploy_sub.add_parser("run", help="submit a signed run manifest", formatter_class=fmt)
    run.add_argument("--dir", required=True, help="the folder made by `dermfed deploy init`")
    run.add_argument("--manifest", required=True, help="the file `dermfed deploy sign` wrote")
    add_common(run)
    run.set_defaults(handler=cmd_deploy_run)
