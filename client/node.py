"""`dermfed node`: a hospital's daemon, from the folder the coordinator sent it.

Three processes, started and stopped together (`common.processes.supervise`):

1. nginx, forwarding the SuperNode's Fleet traffic to the coordinator's edge with this hospital's
   client certificate (mutual TLS: Flower's SuperNode cannot present one itself);
2. the Flower SuperNode, authenticated by the hospital's key, in `process` isolation: it runs
   no app code itself;
3. `dermfed-superexec`, which starts a ClientApp process per task that verifies the app
   bundle's signature against `trusted-app-keys.pub` before loading any of its code.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from client.trusted_app import TRUSTED_KEYS_ENV
from common.config import toml_string
from common.deployment.layout import HospitalLayout
from common.deployment.pki import make_loopback_certificate
from common.deployment.proxy import forward_config, nginx_command, write_config
from common.processes import Daemon, supervise


class NodeError(RuntimeError):
    """The hospital daemon cannot start as asked."""


def _bin(name: str) -> str:
    return shutil.which(name, path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")) or name


def node_config(site: str, data_root: Path, data_format: str, state_dir: Optional[Path], extra: str) -> str:
    """The SuperNode's --node-config: the hospital's data and settings (they never leave it)."""
    pairs = [f"data-root={toml_string(str(data_root.resolve()))}", f"data-format={toml_string(data_format)}",
             f"site-name={toml_string(site)}"]
    if state_dir is not None:
        pairs.append(f"state-dir={toml_string(str(state_dir.resolve()))}")
    return " ".join(pairs + ([extra] if extra else []))


def hospital_daemons(folder: Path, data_root: Path, data_format: str = "folder", state_dir: Optional[Path] = None,
                     extra_node_config: str = "") -> tuple[list[Daemon], dict[str, str]]:
    layout = HospitalLayout(folder.resolve())
    settings = layout.settings()
    missing = [n for n in ("auth_key", "client.crt", "client.key", "ca.crt", "trusted-app-keys.pub")
               if not (layout.root / n).is_file()]
    if missing:
        raise NodeError(f"{layout.root} lacks {missing}: copy the whole folder `dermfed deploy init` made for this hospital")
    if not data_root.is_dir():
        raise NodeError(f"--data-root {data_root} is not a folder")
    runtime = layout.runtime
    runtime.mkdir(parents=True, exist_ok=True)
    loopback = make_loopback_certificate(runtime)
    proxy = write_config(forward_config(layout.root, runtime, settings["proxy_port"], settings["coordinator_host"],
                                        settings["coordinator_port"]), runtime, "nginx-forward.conf")
    supernode = [
        _bin("flower-supernode"), "--root-certificates", str(loopback),  # TLS to the local forwarder
        "--superlink", f"127.0.0.1:{settings['proxy_port']}",
        "--auth-supernode-private-key", str(layout.root / "auth_key"),
        "--isolation", "process", "--port", str(settings["runtime_port"]),
        "--node-config", node_config(settings["site"], data_root, data_format, state_dir, extra_node_config),
    ]
    superexec = [_bin("dermfed-superexec"), "--runtime-api-address", f"127.0.0.1:{settings['runtime_port']}",
                 "--insecure"]
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
           TRUSTED_KEYS_ENV: str(layout.root / "trusted-app-keys.pub"), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_HOME": str(runtime / "flwr-home")}
    daemons = [Daemon("forwarder (nginx)", nginx_command(proxy, runtime), runtime / "nginx-forward.out"),
               Daemon("supernode", supernode, runtime / "supernode.log"),
               Daemon("superexec", superexec, runtime / "superexec.log")]
    return daemons, env


def run_node(folder: Path, data_root: Path, data_format: str = "folder", state_dir: Optional[Path] = None,
             extra_node_config: str = "") -> int:
    if shutil.which("nginx") is None:
        raise NodeError("nginx is not installed (Debian/Ubuntu: apt-get install nginx-light); the forwarder needs it")
    daemons, env = hospital_daemons(folder, data_root, data_format, state_dir, extra_node_config)
    print(f"hospital daemon: logs in {HospitalLayout(folder).runtime}", flush=True)
    return supervise(daemons, env=env)
