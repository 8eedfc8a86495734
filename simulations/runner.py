"""`dermfed simulate`: N virtual hospitals on one machine, through Flower's simulation engine.

It prepares the data once (synthetic generation, image checks, preprocessing cache), picks
the partitions, starts a private local SuperLink in simulation mode (its own FLWR_HOME,
a free port, runtime dependency installation disabled so nothing is downloaded), points a
`config.toml` connection at it with the number of virtual SuperNodes and per-client CPU and
GPU resources, and runs this app with `flwr run . <connection> --stream`. The SuperLink is
stopped when the run ends, whatever happens.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from common.checkpoint import CHECKPOINT_NAME, load_checkpoint
from common.config import PROJECT_ROOT, DermFedConfig, toml_string, write_config
from common.data.partition import partition_catalog
from common.data.pipeline import prepare_data

log = logging.getLogger("dermfed.simulate")

CONNECTION = "dermfed-simulation"
STARTUP_TIMEOUT_S = 60.0


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


def simulation_environment(flwr_home: Path, ray_tmp: Path) -> dict[str, str]:
    env = os.environ.copy()
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


def _run_config(preset: Path, run_dir: Path, resume: bool, site_names: list[str], stop_after_round: int,
                fault_injection: str = "") -> str:
    pairs = {
        "stop-after-round": str(stop_after_round),
        "fault-injection": toml_string(fault_injection),
        "config-preset": toml_string(str(preset)),
        "config-overrides": '""',
        "run-dir": toml_string(str(run_dir)),
        "resume": "true" if resume else "false",
        "site-names": toml_string(",".join(site_names)),
    }
    return " ".join(f"{k}={v}" for k, v in pairs.items())


def completed_rounds(run_dir: Path) -> int:
    try:
        return int(load_checkpoint(run_dir)["position"]["round"])
    except FileNotFoundError:
        return 0


def run_simulation(config: DermFedConfig, run_dir: Path, resume: bool = False,
                   stop_after_round: Optional[int] = None, fault_injection: str = "") -> Path:
    """Run (or resume) a federated simulation; returns the run folder with its checkpoint.

    `stop_after_round` runs only up to that round (the run can be resumed later): what an
    interrupted run looks like, on purpose. `fault_injection` ("SITE:KIND:ROUND", tests only)
    makes one virtual hospital fail (`client.faults`).
    """
    run_dir = run_dir.resolve()
    if resume and completed_rounds(run_dir) >= config.federation.num_rounds:
        raise SimulationError(f"{run_dir} already completed federation.num_rounds={config.federation.num_rounds} rounds; "
                              "raise federation.num_rounds to continue it")
    prepared = prepare_data(config)  # generate/check/cache once, before N processes need it
    parts, names = partition_catalog(prepared.catalog, config.data.partition, config.data.num_partitions,
                                     config.data.dirichlet_alpha, config.seed)
    if len(parts) < config.federation.min_clients:
        raise SimulationError(f"{len(parts)} partitions but federation.min_clients={config.federation.min_clients}")
    target_rounds = min(stop_after_round or config.federation.num_rounds, config.federation.num_rounds)
    preset = write_config(config, run_dir, "config.yaml")
    print(f"simulating {len(parts)} hospitals ({config.data.partition}): "
          + ", ".join(f"{name} ({len(rows)} images)" for name, rows in zip(names, parts)), flush=True)
    gpu_fraction = config.federation.client_gpu_fraction
    if gpu_fraction is None:
        gpu_fraction = (1.0 / len(parts)) if torch.cuda.is_available() else 0.0
    flwr_home = run_dir / ".flower"
    ray_tmp = Path(tempfile.mkdtemp(prefix="dermfed-ray-"))
    env = simulation_environment(flwr_home, ray_tmp)
    port = config.federation.superlink_port or free_port()
    write_connection(flwr_home, port)
    command = [shutil.which("flwr", path=env["PATH"]) or "flwr", "run", str(PROJECT_ROOT), CONNECTION, "--stream",
               "--federation-config", federation_config(len(parts), config.federation.client_cpus, gpu_fraction),
               "--run-config", _run_config(preset.resolve(), run_dir, resume, names, stop_after_round or 0,
                                                 fault_injection)]
    try:
        with local_superlink(port, env, flwr_home / "superlink.log"):
            started = time.perf_counter()
            completed = subprocess.run(command, env=env, cwd=PROJECT_ROOT)
            seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    done = completed_rounds(run_dir)
    if completed.returncode != 0 or done < target_rounds:
        raise SimulationError(
            f"the federated run stopped after {done} of {target_rounds} rounds (flwr exit code {completed.returncode}); "
            f"see the log above and {flwr_home / 'superlink.log'}; resume with: dermfed simulate --resume {run_dir}")
    print(f"{done} rounds in {seconds:.1f} s; checkpoint: {run_dir / CHECKPOINT_NAME}; "
          f"history: {run_dir / 'history.json'} and history.csv", flush=True)
    return run_dir
