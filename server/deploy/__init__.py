"""`dermfed deploy`: a real federation that nobody else can join, command, or impersonate.

- `init` makes the federation's keys, certificates and folders (`common.deployment.layout`):
  a CA whose key goes to `ca-offline/`, the SuperLink's loopback certificate, the edge proxy's
  public certificate, the coordinator's app-signing key, and per hospital an authentication
  key, a client certificate for mutual TLS and the coordinator's public app key.
- `serve` runs the coordinator: the SuperLink on 127.0.0.1 only, behind the nginx edge that
  exposes nothing but the Fleet API, to clients with a certificate of this federation.
- `register` registers each hospital's public key with the SuperLink and writes the site
  registry (node id -> hospital) that the ServerApp labels every update with.
- `run` builds the app bundle, signs it, and submits it; hospitals verify the signature before
  they load any of its code (`client.trusted_app`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from common.config import PROJECT_ROOT, toml_string
from common.deployment.layout import CONNECTION, FederationLayout
from common.deployment.pki import issue_certificate, make_ca, make_node_key, make_signing_key, write_public
from common.deployment.proxy import edge_config, nginx_command, write_config
from common.processes import Daemon, supervise
from server.deploy.registry import RegisteredSite, SiteRegistry

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
DEFAULT_PORTS = {"public": 9092, "superlink": 9091, "proxy": 9095, "runtime": 9094}


class DeployError(RuntimeError):
    """The federation folder cannot be made or used as asked."""


def _bin(name: str) -> str:
    return shutil.which(name, path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")) or name


def _flwr_env(layout: FederationLayout) -> dict[str, str]:
    """Flower finds its helper programs (flower-superexec, flwr-serverapp) on PATH: put this Python's first."""
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    return {**os.environ, "PATH": path, "FLWR_HOME": str(layout.flwr_home.resolve()), "FLWR_DISABLE_UPDATE_CHECK": "1"}


def write_connection(layout: FederationLayout, superlink_port: int) -> Path:
    """The coordinator's `flwr` connection: the SuperLink on loopback, over TLS."""
    layout.flwr_home.mkdir(parents=True, exist_ok=True)
    path = layout.flwr_home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                    f'address = "127.0.0.1:{superlink_port}"\n'
                    f'root-certificates = "{(layout.coordinator / "ca.crt").resolve()}"\n')
    return path


def init_federation(out: Path, hospitals: list[str], hosts: list[str], port: int = DEFAULT_PORTS["public"],
                    superlink_port: int = DEFAULT_PORTS["superlink"], proxy_port: int = DEFAULT_PORTS["proxy"],
                    runtime_port: int = DEFAULT_PORTS["runtime"]) -> FederationLayout:
    if not hospitals:
        raise DeployError("name at least one hospital: --hospital NAME [--hospital NAME ...]")
    bad = [h for h in hospitals if not NAME_PATTERN.match(h)]
    if bad or len(set(hospitals)) != len(hospitals):
        raise DeployError(f"hospital names must be unique and use letters, digits, '.', '_', '-': {bad or hospitals}")
    layout = FederationLayout(out)
    if layout.settings_file.exists() or layout.offline.exists():
        raise DeployError(f"{out} already holds a federation; choose another --out")
    host = hosts[0] if hosts else "localhost"
    coordinator = layout.coordinator
    for folder in (layout.offline, coordinator, *(layout.hospital_dir(n) for n in hospitals)):
        folder.mkdir(mode=0o700, parents=True)  # folders of private keys: their owner only
    ca_key, ca_cert = make_ca(layout.offline / "ca.key", coordinator / "ca.crt")
    issue_certificate(coordinator, "superlink", ca_key, ca_cert, "localhost", "server")  # loopback only
    issue_certificate(coordinator, "edge", ca_key, ca_cert, host, "server", hosts)
    make_signing_key(coordinator / "app-signing.key", coordinator / "app-signing.pub", "dermfed-coordinator")
    trusted = (coordinator / "app-signing.pub").read_bytes()
    for index, name in enumerate(hospitals):
        folder = layout.hospital_dir(name)
        write_public(folder / "ca.crt", (coordinator / "ca.crt").read_bytes())
        make_node_key(folder)
        issue_certificate(folder, "client", ca_key, ca_cert, name, "client")
        write_public(folder / "trusted-app-keys.pub", trusted)
        settings = {"site": name, "index": index, "coordinator_host": host, "coordinator_port": port,
                    "proxy_port": proxy_port, "runtime_port": runtime_port}
        write_public(folder / "hospital.json", json.dumps(settings, indent=1).encode())
    del ca_key
    settings = {"host": host, "hosts": hosts, "public_port": port, "superlink_port": superlink_port,
                "hospitals": [{"name": n, "index": i} for i, n in enumerate(hospitals)]}
    write_public(layout.settings_file, json.dumps(settings, indent=1).encode())
    write_connection(layout, superlink_port)
    from server.deploy.commands import federation_commands, hospital_commands

    (out / "COMMANDS.md").write_text(federation_commands(layout))
    for name in hospitals:
        (layout.hospital_dir(name) / "START.md").write_text(hospital_commands(layout, name))
    return layout


def coordinator_daemons(layout: FederationLayout) -> list[Daemon]:
    """The SuperLink, bound to 127.0.0.1, and the nginx edge in front of it."""
    settings = layout.settings()
    coordinator = layout.coordinator.resolve()
    runtime = layout.runtime.resolve()
    config = write_config(edge_config(coordinator, runtime, settings["public_port"], settings["superlink_port"]),
                          runtime, "nginx-edge.conf")
    superlink = [
        _bin("flower-superlink"), "--ssl-ca-certfile", str(coordinator / "ca.crt"),
        "--ssl-certfile", str(coordinator / "superlink.crt"), "--ssl-keyfile", str(coordinator / "superlink.key"),
        "--enable-supernode-auth", "--disable-runtime-dependency-installation", "--isolation", "subprocess",
        "--host", "127.0.0.1", "--port", str(settings["superlink_port"]),
        "--database", str(coordinator / "superlink-state.db"),
    ]
    return [Daemon("superlink", superlink, runtime / "superlink.log"),
            Daemon("edge proxy (nginx)", nginx_command(config, runtime), runtime / "nginx-edge.out")]


def serve(root: Path) -> int:
    layout = FederationLayout(root)
    if shutil.which("nginx") is None:
        raise DeployError("nginx is not installed (Debian/Ubuntu: apt-get install nginx-light); the edge proxy needs it")
    settings = layout.settings()
    print(f"coordinator: SuperLink on 127.0.0.1:{settings['superlink_port']} (not reachable from the network), "
          f"edge on port {settings['public_port']} (mutual TLS, Fleet API only); logs in {layout.runtime}", flush=True)
    return supervise(coordinator_daemons(layout), env=_flwr_env(layout))


def register_hospitals(root: Path, hospitals: Optional[list[str]] = None) -> SiteRegistry:
    """`flwr supernode register` for each hospital's public key; writes the site registry."""
    layout = FederationLayout(root)
    indices = {h["name"]: h["index"] for h in layout.settings()["hospitals"]}
    names = hospitals or list(indices)
    unknown = [n for n in names if n not in indices]
    if unknown:
        raise DeployError(f"{unknown} are not hospitals of {root}; known: {list(indices)}")
    registry = SiteRegistry.load(layout.registry) if layout.registry.is_file() else SiteRegistry({})
    for name in names:
        public_key = layout.hospital_dir(name) / "auth_key.pub"
        if not public_key.is_file():
            raise DeployError(f"no public key {public_key}")
        fingerprint = hashlib.sha256(public_key.read_bytes()).hexdigest()
        if any(s.name == name and s.public_key_sha256 == fingerprint for s in registry.sites.values()):
            continue  # registered before, under the node id the registry holds
        result = subprocess.run([_bin("flwr"), "supernode", "register", str(public_key), CONNECTION, "--name", name,
                                 "--format", "json"], env=_flwr_env(layout), capture_output=True, text=True)
        node_id = _node_id(result.stdout)
        if result.returncode != 0 or node_id is None:
            hint = (" Its key was registered with this SuperLink before, but coordinator/registry.json does not "
                    "record it: restore that file, or start over with a new SuperLink database."
                    if "already in use" in result.stdout + result.stderr else "")
            raise DeployError(f"registering {name} failed (is `dermfed deploy serve --dir {root}` running?).{hint}\n"
                              f"{result.stdout}{result.stderr}")
        registry.sites = {k: v for k, v in registry.sites.items() if v.name != name}
        registry.sites[node_id] = RegisteredSite(name, indices[name], fingerprint)
        registry.save(layout.registry)  # after each, so a failure later leaves the earlier ones recorded
    registry.save(layout.registry)
    return registry


def _node_id(stdout: str) -> Optional[int]:
    """The node id from `flwr supernode register --format json` (a JSON object after any other output)."""
    start, end = stdout.find("{"), stdout.rfind("}")
    try:
        return int(json.loads(stdout[start:end + 1])["node-id"])
    except (ValueError, KeyError, TypeError):
        return None


def run_federated(root: Path, preset: str, overrides: list[str], run_dir: Path, resume: bool = False,
                  stream: bool = True) -> int:
    """Build the app bundle, sign it with the coordinator's key, submit it; returns flwr's exit code."""
    from flwr.cli.build import build_fab_from_disk

    from common.app_signature import load_signing_key, sign_bundle

    layout = FederationLayout(root)
    if not layout.registry.is_file():
        raise DeployError(f"no site registry in {layout.coordinator}: run `dermfed deploy register --dir {root}` first")
    bundle = build_fab_from_disk(PROJECT_ROOT)
    signature = sign_bundle(bundle, load_signing_key(layout.coordinator / "app-signing.key"))
    run_config = {
        "config-preset": toml_string(preset), "config-overrides": toml_string(" ".join(overrides)),
        "run-dir": toml_string(str(run_dir.resolve())), "resume": "true" if resume else "false",
        "site-registry": toml_string(str(layout.registry.resolve())), "app-signature": toml_string(signature),
    }
    command = [_bin("flwr"), "run", str(PROJECT_ROOT), CONNECTION, *(["--stream"] if stream else []),
               "--run-config", " ".join(f"{k}={v}" for k, v in run_config.items())]
    print(f"submitting the app bundle (sha256 {hashlib.sha256(bundle).hexdigest()[:16]}..., signed) "
          f"to the federation in {root}", flush=True)
    return subprocess.run(command, env=_flwr_env(layout), cwd=PROJECT_ROOT).returncode
