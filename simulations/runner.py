"""`dermfed simulate`: N virtual hospitals on one machine, through Flower's simulation engine.

It prepares the data once (synthetic generation, image checks, preprocessing cache), picks
the partitions, starts a private local SuperLink in simulation mode (its own FLWR_HOME,
a free port, runtime dependency installation disabled so nothing is downloaded), points a
`config.toml` connection at it with the number of virtual SuperNodes and per-client CPU and
GPU resources, and runs this app with `flwr run . <connection> --stream`.

A run owns its processes: every one (SuperLink, SuperExec, the simulation, Ray's daemons and
actors) carries the run's marker in its environment, and all of them are stopped when the run
ends, when `dermfed simulate` gets SIGINT or SIGTERM (at any moment: `common.interrupts`), and, through a
guard process (`simulations.reaper`), when `dermfed simulate` itself is killed. The run folder
is locked while a run uses it: a second `simulate` or `--resume` is refused with a message.

Each virtual hospital gets a node config of its own, as a real hospital's IT gives its daemon one:
`state-dir` (the run folder's `sites/`) and whatever `--node-config SITE:...` sets (its privacy
floor, a public image count, ...). They travel in a file of the run folder named by an
environment variable of the run's processes (`client.simulated_nodes`), never in the run
config; `--resume` keeps them unless new ones are given.

`--resume` checks the folder and the new config before writing anything (`resume_config`, from
`common.run_folder`, which `deploy run` uses too): a folder that is not a resumable simulation run
and changes that would corrupt the run are refused, the others are recorded as a new revision
(`config.r2.yaml`, ...) beside the original `config.yaml`, which is never rewritten.
"""

from __future__ import annotations

import fcntl
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
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from client import simulated_nodes
from common.config import (PROJECT_ROOT, ConfigError, DermFedConfig, flatten_config, flower_run_config, load_config,
                           run_config_argument, write_config)
from common.data.partition import check_partitions, partition_catalog
from common.data.pipeline import ensure_data, prepare_data
from common.interrupts import Interrupted, stop_signals_raise
from common.processes import RUN_MARKER, die_with_parent, stop_marked
from common.run_folder import (CHECKPOINT_NAME, CONFIG_NAME, FLOWER_HOME_NAME, HISTORY_CSV_NAME, HISTORY_NAME,
                               LOCK_NAME, SITES_NAME, STATUS_NAME, RunFolderError, check_resume, completed_rounds,
                               config_revisions, read_status)
from common.run_folder import resume_config as _checked_resume_config
from server.federation import ResumeError, initial_shared_weights

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


class SimulationInterrupted(SimulationError):
    """SIGINT or SIGTERM reached `dermfed simulate`."""


class RunRefused(SimulationError):
    """The run was not started: its folder is in use, or a resume would change what cannot change."""


def after_interrupt(run_dir: Path, num_rounds: int) -> str:
    """What an interrupted run left, and whether `--resume` can continue it (only between its first and last round)."""
    try:
        done = completed_rounds(run_dir)
    except Exception:  # noqa: BLE001 - an unreadable checkpoint: say so rather than fail while stopping
        done = -1
    if done < 0:
        return f"the run's checkpoint in {run_dir} cannot be read; start the run again in a new folder"
    if done == 0:
        return (f"no round had completed, so there is nothing to resume; start the run again (with another --out, "
                f"or with --force, which moves {run_dir} aside)")
    if done >= num_rounds:
        return f"all {num_rounds} rounds had completed: the checkpoint is {run_dir / CHECKPOINT_NAME}"
    return f"{done} of {num_rounds} rounds had completed; continue with: dermfed simulate --resume {run_dir}"


class RunLock:
    """An exclusive lock on a run folder for as long as a run (or its guard) lives."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK_NAME
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text().strip() or "?"
            os.close(self.fd)
            raise RunRefused(f"{run_dir} is in use by a live run (dermfed simulate, pid {holder}); wait for it "
                                  "to end or stop it (Ctrl-C or kill PID) before starting or resuming a run there") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())

    def release(self) -> None:
        os.close(self.fd)


def resume_config(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> DermFedConfig:
    """The config a resumed run continues with (`common.run_folder.resume_config`: the run's latest revision plus
    `overrides`, validated together, checked against the original); refused as RunRefused. Writes nothing."""
    try:
        return _checked_resume_config(run_dir, overrides)
    except RunFolderError as exc:
        raise RunRefused(str(exc)) from None


def _write_revision(config: DermFedConfig, run_dir: Path) -> Path:
    """The config this run segment uses: config.yaml for a new run, a new revision when a resume changed it."""
    revisions = [p for p in config_revisions(run_dir) if p.is_file()]
    if not revisions:
        return write_config(config, run_dir, CONFIG_NAME)
    if load_config(revisions[-1]) == config:
        return revisions[-1]
    before, after = flatten_config(load_config(revisions[-1])), flatten_config(config)
    path = write_config(config, run_dir, f"config.r{len(revisions) + 1}.yaml")
    changes = ", ".join(f"{k}: {before.get(k)!r} -> {v!r}" for k, v in after.items() if before.get(k) != v)
    print(f"this resume changes {changes}; recorded in {path.name} (config.yaml keeps the original)", flush=True)
    return path


def _start_reaper(token: str, ray_tmp: Path, lock: RunLock) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simulations.reaper", token, str(ray_tmp)], cwd=PROJECT_ROOT,
                            pass_fds=[lock.fd], preexec_fn=die_with_parent)


def run_simulation(config: DermFedConfig, run_dir: Path, resume: bool = False,
                   stop_after_round: Optional[int] = None, fault_injection: str = "",
                   node_configs: Optional[dict[str, dict]] = None) -> Path:
    """Run (or resume) a federated simulation; returns the run folder with its checkpoint.

    `stop_after_round` runs only up to that round (the run can be resumed later): what an
    interrupted run looks like, on purpose. `fault_injection` ("SITE:KIND:ROUND", tests only)
    makes one virtual hospital fail (`client.faults`). `node_configs` (site name -> node config,
    `simulations.node_configs`) gives simulated hospitals their own settings, e.g. privacy
    floors; a resumed run keeps its own unless new ones are given. With `resume`, `config` must
    come from `resume_config` (checked against the run's own).
    """
    run_dir = run_dir.resolve()
    with stop_signals_raise():  # already so under the CLI; also for a caller without it
        lock = RunLock(run_dir)
        try:
            return _run_locked(config, run_dir, lock, resume, stop_after_round, fault_injection, node_configs)
        except Interrupted as exc:
            raise SimulationInterrupted(f"interrupted by {exc.signal_name}, the run's processes are stopped: "
                                        f"{after_interrupt(run_dir, config.federation.num_rounds)}") from None
        finally:
            lock.release()


def _simulated_node_configs(run_dir: Path, names: list[str], resume: bool,
                            node_configs: Optional[dict[str, dict]]) -> Path:
    """Write each virtual hospital's node config (its state folder, and what --node-config asked) to the run folder."""
    from simulations.node_configs import check_node_configs

    path = run_dir / simulated_nodes.FILE_NAME
    by_site = node_configs if node_configs is not None else (simulated_nodes.read_sites(path) if resume else {})
    try:
        check_node_configs(by_site, names)
    except ConfigError as exc:
        raise RunRefused(str(exc)) from None
    partitions = {index: {"state-dir": str(run_dir / SITES_NAME), **by_site.get(name, {})} for index, name in enumerate(names)}
    return simulated_nodes.write_table(path, by_site, partitions)


def _run_locked(config: DermFedConfig, run_dir: Path, lock: RunLock, resume: bool, stop_after_round: Optional[int],
                fault_injection: str, node_configs: Optional[dict[str, dict]] = None) -> Path:
    if resume:  # the CLI checked before locking; a caller of run_simulation gets the same check here
        try:
            check_resume(run_dir, config)
        except RunFolderError as exc:
            raise RunRefused(str(exc)) from None
    ensure_data(config)  # generate and cache once, before N processes read it
    prepared = prepare_data(config)
    parts, names = partition_catalog(prepared.catalog, config.data.partition, config.data.num_partitions,
                                     config.data.dirichlet_alpha, config.seed)
    if len(parts) < config.federation.min_clients:
        raise ConfigError(f"data.partition={config.data.partition} makes {len(parts)} hospital(s) ({', '.join(names)}) "
                          f"but federation.min_clients={config.federation.min_clients}: lower federation.min_clients "
                          "or make more hospitals (data.partition=iid data.num_partitions=N)")
    check_partitions(prepared.catalog, parts, names, config.data.pretrain_splits, config.train.batch_size,
                     config.data.min_site_images)
    if config.federation.initial_checkpoint and not resume:
        try:
            initial_shared_weights(config)  # a torn or mismatched checkpoint is refused before any process starts
        except ResumeError as exc:
            raise RunRefused(str(exc)) from None
    target_rounds = min(stop_after_round or config.federation.num_rounds, config.federation.num_rounds)
    node_table = _simulated_node_configs(run_dir, names, resume, node_configs)
    preset = _write_revision(config, run_dir)
    print(f"simulating {len(parts)} hospitals ({config.data.partition}): "
          + ", ".join(f"{name} ({len(rows)} images)" for name, rows in zip(names, parts)), flush=True)
    gpu_fraction = config.federation.client_gpu_fraction
    if gpu_fraction is None:
        gpu_fraction = (1.0 / len(parts)) if torch.cuda.is_available() else 0.0
    flwr_home = run_dir / FLOWER_HOME_NAME
    ray_tmp = Path(tempfile.mkdtemp(prefix="dermfed-ray-"))
    token = uuid.uuid4().hex
    env = {**simulation_environment(flwr_home, ray_tmp), RUN_MARKER: token, simulated_nodes.ENV_VAR: str(node_table)}
    port = config.federation.superlink_port or free_port()
    write_connection(flwr_home, port)
    command = [shutil.which("flwr", path=env["PATH"]) or "flwr", "run", str(PROJECT_ROOT), CONNECTION, "--stream",
               "--federation-config", federation_config(len(parts), config.federation.client_cpus, gpu_fraction),
               "--run-config", run_config_argument(flower_run_config(
                   preset=str(preset.resolve()), run_dir=str(run_dir), resume=resume, config=config, site_names=names,
                   stop_after_round=stop_after_round or 0, fault_injection=fault_injection))]
    (run_dir / STATUS_NAME).unlink(missing_ok=True)
    reaper = _start_reaper(token, ray_tmp, lock)
    ours = [str(ray_tmp)]  # Ray's workers rename themselves; they are found by their open files here
    started = time.perf_counter()
    stopped = False
    try:
        with local_superlink(port, env, flwr_home / "superlink.log"):
            try:
                returncode = _follow(subprocess.Popen(command, env=env, cwd=PROJECT_ROOT), run_dir, token, ours)
            finally:
                # However the run ends, whatever of it is still alive (SuperExec, simulation, Ray, the SuperLink
                # itself) is stopped here at once, before the SuperLink's orderly stop, which may take 20 s.
                stop_marked(token, ours)
                stopped = True
    finally:
        if not stopped:  # a signal came before the run got this far (e.g. while the SuperLink was being started)
            stop_marked(token, ours)
        reaper.kill()
        reaper.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    seconds = time.perf_counter() - started
    _report(run_dir, target_rounds, returncode, flwr_home / "superlink.log")
    print(f"{completed_rounds(run_dir)} rounds in {seconds:.1f} s; checkpoint: {run_dir / CHECKPOINT_NAME}; "
          f"history: {run_dir / HISTORY_NAME} and {HISTORY_CSV_NAME}", flush=True)
    return run_dir


def _follow(process: subprocess.Popen, run_dir: Path, token: str, directories: list[str]) -> int:
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


def _report(run_dir: Path, target_rounds: int, flwr_code: int, superlink_log: Path) -> None:
    """Say truthfully how the run ended; raise SimulationError unless it reached its target round."""
    status, done = read_status(run_dir), completed_rounds(run_dir)
    if status.get("state") in ("finished", "stopped") and done >= target_rounds:
        return
    kept = (f"the checkpoint of round {done} is kept ({run_dir / CHECKPOINT_NAME})" if done
            else "no round completed")
    if status.get("state") == "failed":
        reason = status.get("reason", "unknown").rstrip(".")
        what = "the sites" if reason.startswith("RoundFailed") else "that"
        if not status.get("resumable"):
            advice = "it cannot continue as configured"
        elif done:  # --resume continues only after a completed round
            advice = f"fix {what} and continue with: dermfed simulate --resume {run_dir}"
        else:
            advice = f"fix {what} and start the run again (with another --out, or with --force, which moves {run_dir} aside)"
        raise SimulationError(f"the federated run failed in round {done + 1}: {reason}. {kept}; {advice}")
    raise SimulationError(f"the federated run ended after {done} of {target_rounds} rounds without finishing "
                          f"(flwr exit code {flwr_code}; the ServerApp {'never started' if not status else 'stopped'}); "
                          f"{kept}; see the log above and {superlink_log}")
