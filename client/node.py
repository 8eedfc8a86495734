"""`dermfed node`: a hospital's keys, its approvals, and its daemon.

- `keygen`: the hospital's SuperNode key (which also signs its replies), its TLS client key and
  a certificate signing request, made here and never sent anywhere: `request.json` holds only
  the request and the public node key, for the coordinator.
- `bundle-hash` / `approve`: the sha256 of the app bundle a source tree builds, and the
  hospital's list of approved bundles (`approved-bundles`); a run of any other bundle is refused.
- the daemon, from the hospital's folder, as processes started and stopped together
  (`common.processes.supervise`):
  1. nginx, forwarding the SuperNode's Fleet traffic to the coordinator's edge with this
     hospital's client certificate (mutual TLS: Flower's SuperNode cannot present one itself),
     listening on a Unix socket in the hospital's 0700 folder;
  2. in a private network namespace (`common.deployment.sandbox`), where no other account on
     this machine can reach their ports: the Flower SuperNode (authenticated by its key, in
     `process` isolation: it runs no app code itself) and `dermfed-superexec`, which starts a
     ClientApp process per task that checks the signed run manifest before loading any code
     (`client.trusted_app`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from common.config import PROJECT_ROOT, toml_string
from common.deployment import sandbox
from common.deployment.files import open_to_others, private_folder, write_public
from common.deployment.layout import SUPERNODE_FORWARD_PORT, SUPERNODE_RUNTIME_PORT, HospitalLayout
from common.deployment.pki import make_client_request, make_loopback_certificate, make_node_key
from common.deployment.proxy import forward_config, nginx_command, write_config
from common.processes import Daemon, supervise
from common.run_manifest import approve_bundle, bundle_sha256, read_approved_bundles

HOSPITAL_DIR_ENV = "DERMFED_HOSPITAL_DIR"  # the verifying ClientApp finds the hospital's keys and approvals here
DEFAULT_STATE_DIR = Path.home() / ".dermfed" / "state"
NAME_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class NodeError(RuntimeError):
    """The hospital daemon cannot start as asked."""


def _bin(name: str) -> str:
    return shutil.which(name, path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")) or name


def keygen(folder: Path, name: str) -> Path:
    """The hospital's private keys, made here (mode 0600), and the public request for the coordinator."""
    if not name or not set(name) <= NAME_CHARACTERS or len(name) > 63 or not name[0].isalnum():
        raise NodeError(f"--name {name!r}: use letters, digits, '.', '_', '-' (starting with a letter or digit)")
    layout = HospitalLayout(folder)
    existing = [p.name for p in (layout.node_key, layout.root / "client.key") if p.exists()]
    if existing:
        raise NodeError(f"{folder} holds keys already ({existing}); a hospital keeps its keys, or starts a new folder")
    private_folder(layout.root)
    make_node_key(layout.root)
    make_client_request(layout.root, name)
    request = {"name": name, "csr": (layout.root / "client.csr").read_text(),
               "auth_public_key": (layout.root / "auth_key.pub").read_text().strip()}
    return write_public(layout.root / "request.json", json.dumps(request, indent=1).encode())


def bundle_hash(source: Path = PROJECT_ROOT) -> str:
    """The sha256 of the app bundle that `source` (a DermFed source tree) builds, as a run manifest names it."""
    from flwr.cli.build import build_fab_from_disk

    if not (Path(source) / "pyproject.toml").is_file():
        raise NodeError(f"{source} is not a DermFed source tree (no pyproject.toml)")
    return bundle_sha256(build_fab_from_disk(Path(source)))


def approve(folder: Path, digest: str, note: str = "") -> bool:
    """Add a bundle hash to the hospital's approvals: only in a folder `dermfed node keygen` made (a mistyped --dir
    would otherwise approve into a folder no node reads)."""
    if not (folder / "auth_key").is_file():
        raise NodeError(f"--dir {folder} is not a hospital's folder (no auth_key): give the folder made by "
                        "`dermfed node keygen`")
    try:
        return approve_bundle(HospitalLayout(folder).approved_bundles, digest, note)
    except ValueError as exc:
        raise NodeError(str(exc)) from None


def node_config(site: str, data_root: Path, data_format: str, state_dir: Path, extra: str) -> str:
    """The SuperNode's --node-config: the hospital's data and settings (they never leave it)."""
    pairs = [f"data-root={toml_string(str(data_root.resolve()))}", f"data-format={toml_string(data_format)}",
             f"site-name={toml_string(site)}", f"state-dir={toml_string(str(state_dir.resolve()))}"]
    return " ".join(pairs + ([extra] if extra else []))


def check_hospital_folder(layout: HospitalLayout) -> None:
    missing = [n for n in ("auth_key", "client.crt", "client.key", "ca.crt", "trusted-app-keys.pub", "hospital.json")
               if not (layout.root / n).is_file()]
    if missing:
        raise NodeError(f"{layout.root} lacks {missing}: make the keys with `dermfed node keygen`, then copy in the "
                        "files the coordinator sent back")
    if open_to_others(layout.root):
        raise NodeError(f"{layout.root} can be opened by other accounts on this machine: `chmod 700 {layout.root}`")
    try:
        read_approved_bundles(layout.approved_bundles)
    except ValueError as exc:
        raise NodeError(str(exc)) from None


def hospital_daemons(folder: Path, data_root: Path, data_format: str = "folder", state_dir: Optional[Path] = None,
                     extra_node_config: str = "") -> tuple[list[Daemon], dict[str, str]]:
    layout = HospitalLayout(folder.resolve())
    check_hospital_folder(layout)
    settings = layout.settings()
    if not data_root.is_dir():
        raise NodeError(f"--data-root {data_root} is not a folder")
    if extra_node_config:
        from flwr.common.config import parse_config_args

        from client.policy import check_node_config_keys
        from common.config import ConfigError

        try:
            check_node_config_keys(dict(parse_config_args([extra_node_config])))
        except (ConfigError, ValueError) as exc:
            raise NodeError(f"--node-config: {exc}") from None
    state_dir = state_dir or DEFAULT_STATE_DIR  # the hospital's, never a folder the coordinator names
    runtime = private_folder(layout.runtime)
    private_folder(layout.forward_socket.parent)
    layout.forward_socket.unlink(missing_ok=True)  # nginx does not replace a stale socket
    loopback = make_loopback_certificate(runtime)
    try:
        listen = Path(sandbox.unix_socket_path(layout.forward_socket))
    except ValueError as exc:
        raise NodeError(str(exc)) from None
    proxy = write_config(forward_config(layout.root, runtime, listen, settings["coordinator_host"],
                                        settings["coordinator_port"]), runtime, "nginx-forward.conf")
    supernode = [
        _bin("flower-supernode"), "--root-certificates", str(loopback),  # TLS to the forwarder, through the relay
        "--superlink", f"127.0.0.1:{SUPERNODE_FORWARD_PORT}",
        "--auth-supernode-private-key", str(layout.node_key),
        "--isolation", "process", "--port", str(SUPERNODE_RUNTIME_PORT),
        "--node-config", node_config(settings["site"], data_root, data_format, state_dir, extra_node_config),
    ]
    superexec = [_bin("dermfed-superexec"), "--runtime-api-address", f"127.0.0.1:{SUPERNODE_RUNTIME_PORT}",
                 "--insecure"]  # plain HTTP, but inside the private network: no other account reaches it
    inside = sandbox.spec_command(connect=[(SUPERNODE_FORWARD_PORT, listen)], daemons=[
        {"name": "supernode", "command": supernode, "log": str(runtime / "supernode.log")},
        {"name": "superexec", "command": superexec, "log": str(runtime / "superexec.log")}])
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
           HOSPITAL_DIR_ENV: str(layout.root), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_HOME": str(runtime / "flwr-home")}
    daemons = [Daemon("forwarder (nginx)", nginx_command(proxy, runtime), runtime / "nginx-forward.out"),
               Daemon("supernode and superexec (private network)", inside, runtime / "node.log")]
    return daemons, env


def run_node(folder: Path, data_root: Path, data_format: str = "folder", state_dir: Optional[Path] = None,
             extra_node_config: str = "") -> int:
    if shutil.which("nginx") is None:
        raise NodeError("nginx is not installed (Debian/Ubuntu: apt-get install nginx-light); the forwarder needs it")
    daemons, env = hospital_daemons(folder, data_root, data_format, state_dir, extra_node_config)
    unavailable = sandbox.probe()
    if unavailable:
        raise NodeError(f"cannot keep the SuperNode's ports private on this machine: {unavailable}")
    layout = HospitalLayout(folder.resolve())
    if not read_approved_bundles(layout.approved_bundles):
        print(f"warning: {layout.approved_bundles} approves no app bundle yet: every run is refused until you approve "
              "one (`dermfed node bundle-hash`, then `dermfed node approve`)", file=sys.stderr, flush=True)
    print(f"hospital daemon: logs in {layout.runtime}", flush=True)
    return supervise(daemons, env=env)
