"""The processes of a simulated run: a private SuperLink, `flwr run`'s environment, the guard that outlives a kill.

Every process of a run carries the run's marker in its environment (`common.processes`), so that all of
them can be found and stopped; nothing here knows about run folders beyond the status file `_follow` polls.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import torch

from common.config import PROJECT_ROOT
from common.processes import die_with_parent, stop_marked
from common.run_folder import read_status

if TYPE_CHECKING:
    from simulations.lifecycle import RunLock

log = logging.getLogger("dermfed.simulate")

CONNECTION = "dermfed-simulation"
STARTUP_TIMEOUT_S = 60.0
SHUTDOWN_GRACE_S = 10.0  # after the ServerApp ended, how long the simulation may take to stop by itself


class SimulationError(RuntimeError):
    """The simulation did not complete; the message says where to look."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_connection(flwr_home: Path, port: int) -> Path:
    """FLWR_HOME/config.toml: one connection, to the private SuperLink."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n'
                    f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    return path


def federation_config(num_nodes: int, cpus: int, gpus: float) -> str:
    """`flwr run --federation-config`: virtual SuperNodes and the resources of each."""
    return (f"num-supernodes={num_nodes} client-resources-num-cpus={cpus} client-resources-num-gpus={float(gpus)} "
            f"init-args-num-cpus={os.cpu_count() or 1} init-args-num-gpus={torch.cuda.device_count()}")


RAY_TIP = "ignore::FutureWarning:ray._private.worker"  # Ray's notice of a future default (GPU visibility), every start


def simulation_environment(flwr_home: Path, ray_tmp: Path, verbose: bool = False) -> dict[str, str]:
    """The environment of a run's processes; `verbose` (`dermfed simulate -v`) keeps Ray's notices and turns on
    Flower's DEBUG lines."""
    env = os.environ.copy()
    if verbose:
        env["FLWR_LOG_LEVEL"] = "DEBUG"
    else:
        env["PYTHONWARNINGS"] = ",".join(w for w in (env.get("PYTHONWARNINGS", ""), RAY_TIP) if w)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(flwr_home)
    env["RAY_TMPDIR"] = str(ray_tmp)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["RAY_DEDUP_LOGS"] = "0"
    env["TQDM_DISABLE"] = "1"  # progress bars from N virtual hospitals would garble the stream
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1.0) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def local_superlink(port: int, env: dict[str, str], log_file: Path) -> Iterator[subprocess.Popen]:
    """A SuperLink in simulation mode on 127.0.0.1:port, stopped on exit."""
    command = [
        shutil.which("flower-superlink", path=env["PATH"]) or "flower-superlink",
        "--insecure", "--simulation", "--isolation", "subprocess",
        "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1", "--port", str(port),
        "--database", str(Path(env["FLWR_HOME"]) / "state.db"),
    ]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(port):
            if process.poll() is not None:
                raise SimulationError(f"flower-superlink exited with code {process.returncode}; see {log_file}")
            if time.monotonic() > deadline:
                raise SimulationError(f"flower-superlink did not become healthy in {STARTUP_TIMEOUT_S:.0f} s; see {log_file}")
            time.sleep(0.3)
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def start_reaper(token: str, ray_tmp: Path, lock: "RunLock") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simulations.reaper", token, str(ray_tmp)], cwd=PROJECT_ROOT,
                            pass_fds=[lock.fd], preexec_fn=die_with_parent)


def follow(process: subprocess.Popen, run_dir: Path, token: str, directories: list[str]) -> int:
    """Wait for `flwr run`; if the ServerApp has ended but the simulation does not stop (a virtual hospital
    still busy, e.g. one that never answers), stop the run's processes after SHUTDOWN_GRACE_S."""
    ended: Optional[float] = None
    while process.poll() is None:
        time.sleep(0.5)
        if read_status(run_dir).get("state") in ("finished", "stopped", "failed"):
            ended = ended or time.monotonic()
            if time.monotonic() - ended > SHUTDOWN_GRACE_S:
                log.warning("the ServerApp ended %.0f s ago but the simulation has not stopped (a hospital still "
                            "busy?); stopping the run's processes", SHUTDOWN_GRACE_S)
                stop_marked(token, directories)
                break
    return process.wait()
