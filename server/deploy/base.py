"""What every `dermfed deploy` command shares: its error type, where Flower's programs are, the operator's
`flwr` reaching the Control API through the coordinator's private network."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from common.deployment import sandbox
from common.deployment.files import replace_file
from common.deployment.layout import CONNECTION, SUPERLINK_PORT, FederationLayout

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class DeployError(RuntimeError):
    """The federation folder cannot be made or used as asked."""


def bin_path(name: str) -> str:
    return shutil.which(name, path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")) or name


def flwr_env(layout: FederationLayout) -> dict[str, str]:
    """Flower finds its helper programs (flower-superexec, flwr-serverapp) on PATH: put this Python's first."""
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    return {**os.environ, "PATH": path, "FLWR_HOME": str(layout.flwr_home.resolve()), "FLWR_DISABLE_UPDATE_CHECK": "1"}


def write_connection(layout: FederationLayout) -> Path:
    """The operator's `flwr` connection: the SuperLink's port inside a private network, over TLS."""
    return replace_file(layout.flwr_home / "config.toml", (
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{SUPERLINK_PORT}"\n'
        f'root-certificates = "{(layout.coordinator / "ca.crt").resolve()}"\n').encode())


def operator_flwr(layout: FederationLayout, args: list[str], capture: bool = True,
                  cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`flwr ARGS` in a fresh private network whose 127.0.0.1:SUPERLINK_PORT leads to the Control API's socket.

    Only the account that owns the coordinator's folder can open that socket (its folder is 0700),
    so this works for the operator and for nobody else on the machine.
    """
    if not layout.control_socket.exists():
        raise DeployError(f"the SuperLink is not running (no {layout.control_socket}): start it with "
                          f"`dermfed deploy serve --dir {layout.root}`")
    write_connection(layout)
    command = sandbox.spec_command(connect=[(SUPERLINK_PORT, layout.control_socket)],
                                   command=[bin_path("flwr"), *args])
    return subprocess.run(command, env=flwr_env(layout), capture_output=capture, text=True, cwd=cwd)
