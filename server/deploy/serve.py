"""`deploy serve`: the coordinator's daemons, started and stopped together.

- the SuperLink (and the SuperExec and ServerApp processes it starts) inside a private network
  namespace (`common.deployment.sandbox`): its one port, which serves the unauthenticated
  Control API, exists only there. Two Unix sockets in `coordinator/sockets/` (mode 0700) lead to
  it: `fleet.sock` for the edge, `control.sock` for the operator's commands;
- the nginx edge on the public port (mutual TLS with the federation's CA and its revocation
  list, Fleet API only, bounded bodies and connections), forwarding to `fleet.sock`.

What this rests on: the coordinator's folder belongs to the account that runs the daemons and
only it can open it; the kernel's namespaces keep the SuperLink's port to the processes inside.
The app-signing key and the CA key are not on this server (`serve` refuses to start while they
are in the federation folder), so code running in the ServerApp cannot read them, and no
hospital key was ever here.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from common.deployment import sandbox
from common.deployment.files import open_to_others, private_folder
from common.deployment.layout import SUPERLINK_PORT, FederationLayout
from common.deployment.proxy import DEFAULT_MAX_BODY_MB, DEFAULT_MAX_CONNECTIONS, edge_config, nginx_command, write_config
from common.processes import Daemon, supervise
from server.deploy.base import DeployError, bin_path, flwr_env


def check_server_folder(layout: FederationLayout) -> None:
    """Refuse to serve from a folder that still holds keys that belong elsewhere, that others can open, or
    that a running `deploy serve` uses already."""
    layout.settings()  # a federation folder at all
    left = [p for p in (layout.ca_key, layout.signing_key) if p.exists()]
    if left:
        raise DeployError(f"{', '.join(map(str, left))} must not stay on the coordinator's server, where the SuperLink "
                          "runs code it is sent: move ca-offline/ to offline storage and operator/ to the operator's "
                          "workstation, then start again")
    for folder in (layout.root, layout.coordinator):
        if open_to_others(folder):
            raise DeployError(f"{folder} can be opened by other accounts: `chmod 700 {folder}`")
    if not layout.crl.is_file():
        raise DeployError(f"no revocation list {layout.crl}; the edge refuses to start without one")
    if layout.control_socket.exists():
        with socket.socket(socket.AF_UNIX) as probe:
            if probe.connect_ex(str(layout.control_socket)) == 0:
                raise DeployError(f"a `deploy serve` of {layout.root} is running already (its control socket answers)")


def coordinator_daemons(layout: FederationLayout) -> list[Daemon]:
    """The SuperLink in its private network, and the nginx edge in front of it."""
    settings = layout.settings()
    coordinator, runtime = layout.coordinator.resolve(), layout.runtime.resolve()
    private_folder(runtime)
    private_folder(layout.sockets)
    config = write_config(edge_config(coordinator, runtime, settings["public_port"], layout.fleet_socket.resolve(),
                                      settings.get("max_body_mb", DEFAULT_MAX_BODY_MB),
                                      settings.get("max_connections", DEFAULT_MAX_CONNECTIONS)),
                          runtime, "nginx-edge.conf")
    superlink = [
        bin_path("flower-superlink"), "--ssl-ca-certfile", str(coordinator / "ca.crt"),
        "--ssl-certfile", str(coordinator / "superlink.crt"), "--ssl-keyfile", str(coordinator / "superlink.key"),
        "--enable-supernode-auth", "--disable-runtime-dependency-installation", "--isolation", "subprocess",
        "--host", "127.0.0.1", "--port", str(SUPERLINK_PORT),
        "--database", str(coordinator / "superlink-state.db"),
    ]
    try:
        private_network = sandbox.spec_command(
            expose=[(layout.fleet_socket, SUPERLINK_PORT), (layout.control_socket, SUPERLINK_PORT)], command=superlink)
    except ValueError as exc:
        raise DeployError(str(exc)) from None
    return [Daemon("superlink (private network)", private_network, runtime / "superlink.log"),
            Daemon("edge proxy (nginx)", nginx_command(config, runtime), runtime / "nginx-edge.out")]


def serve(root: Path) -> int:
    layout = FederationLayout(root)
    if shutil.which("nginx") is None:
        raise DeployError("nginx is not installed (Debian/Ubuntu: apt-get install nginx-light); the edge proxy needs it")
    check_server_folder(layout)
    unavailable = sandbox.probe()
    if unavailable:
        raise DeployError(f"cannot keep the SuperLink's ports private on this machine: {unavailable}")
    settings = layout.settings()
    print(f"coordinator: SuperLink in a private network (reachable only through {layout.sockets}), edge on port "
          f"{settings['public_port']} (mutual TLS, Fleet API only); logs in {layout.runtime}", flush=True)
    return supervise(coordinator_daemons(layout), env=flwr_env(layout))
