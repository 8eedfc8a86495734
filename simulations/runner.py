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

import logging
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

import torch

from client import simulated_nodes
from common.config import PROJECT_ROOT, ConfigError, DermFedConfig, flower_run_config, run_config_argument
from common.data.partition import check_partitions, partition_catalog
from common.data.pipeline import ensure_data, prepare_data
from common.interrupts import Interrupted, stop_signals_raise
from common.processes import RUN_MARKER, stop_marked
from common.run_folder import (CHECKPOINT_NAME, FLOWER_HOME_NAME, HISTORY_CSV_NAME, HISTORY_NAME, SIMULATION,
                               STATUS_NAME, RunFolderError, check_resume, completed_rounds)
from server.federation import ResumeError, initial_shared_weights
from simulations.console import RunConsole, show
from simulations.lifecycle import (RunLock, RunRefused, SimulationInterrupted, after_interrupt, report_end,
                                   resume_config, write_node_configs, write_revision)
from simulations.processes import (CONNECTION, SHUTDOWN_GRACE_S, SimulationError, federation_config, follow, free_port,
                                   local_superlink, simulation_environment, start_reaper, write_connection)

__all__ = ["RunRefused", "SimulationError", "SimulationInterrupted", "after_interrupt", "resume_config",
           "run_simulation"]

log = logging.getLogger("dermfed.simulate")


def run_simulation(config: DermFedConfig, run_dir: Path, resume: bool = False,
                   stop_after_round: Optional[int] = None, fault_injection: str = "",
                   node_configs: Optional[dict[str, dict]] = None, verbose: bool = False) -> Path:
    """Run (or resume) a federated simulation; returns the run folder with its checkpoint.

    `stop_after_round` runs only up to that round (the run can be resumed later): what an
    interrupted run looks like, on purpose. `fault_injection` ("SITE:KIND:ROUND", tests only)
    makes one virtual hospital fail (`client.faults`). `node_configs` (site name -> node config,
    `simulations.node_configs`) gives simulated hospitals their own settings, e.g. privacy
    floors; a resumed run keeps its own unless new ones are given. With `resume`, `config` must
    come from `resume_config` (checked against the run's own). The console shows Flower's lines once, without
    those that do not apply, with a progress display (`simulations.console`); `verbose` shows every line.
    """
    run_dir = run_dir.resolve()
    with stop_signals_raise():  # already so under the CLI; also for a caller without it
        lock = RunLock(run_dir)
        try:
            return _run_locked(config, run_dir, lock, resume, stop_after_round, fault_injection, node_configs, verbose)
        except Interrupted as exc:
            raise SimulationInterrupted(f"interrupted by {exc.signal_name}, the run's processes are stopped: "
                                        f"{after_interrupt(run_dir, config.federation.num_rounds)}") from None
        finally:
            lock.release()


def _run_locked(config: DermFedConfig, run_dir: Path, lock: RunLock, resume: bool, stop_after_round: Optional[int],
                fault_injection: str, node_configs: Optional[dict[str, dict]] = None, verbose: bool = False) -> Path:
    if resume:  # the CLI checked before locking; a caller of run_simulation gets the same check here
        try:
            check_resume(run_dir, config, by=SIMULATION)
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
    node_table = write_node_configs(run_dir, names, resume, node_configs)
    preset = write_revision(config, run_dir)
    print(f"simulating {len(parts)} hospitals ({config.data.partition}): "
          + ", ".join(f"{name} ({len(rows)} images)" for name, rows in zip(names, parts)), flush=True)
    gpu_fraction = config.federation.client_gpu_fraction
    if gpu_fraction is None:
        gpu_fraction = (1.0 / len(parts)) if torch.cuda.is_available() else 0.0
    flwr_home = run_dir / FLOWER_HOME_NAME
    ray_tmp = Path(tempfile.mkdtemp(prefix="dermfed-ray-"))
    token = uuid.uuid4().hex
    env = {**simulation_environment(flwr_home, ray_tmp, verbose), RUN_MARKER: token, simulated_nodes.ENV_VAR: str(node_table)}
    port = config.federation.superlink_port or free_port()
    write_connection(flwr_home, port)
    command = [shutil.which("flwr", path=env["PATH"]) or "flwr", "run", str(PROJECT_ROOT), CONNECTION, "--stream",
               "--federation-config", federation_config(len(parts), config.federation.client_cpus, gpu_fraction),
               "--run-config", run_config_argument(flower_run_config(
                   preset=str(preset.resolve()), run_dir=str(run_dir), resume=resume, config=config, site_names=names,
                   stop_after_round=stop_after_round or 0, fault_injection=fault_injection))]
    (run_dir / STATUS_NAME).unlink(missing_ok=True)
    reaper = start_reaper(token, ray_tmp, lock)
    ours = [str(ray_tmp)]  # Ray's workers rename themselves; they are found by their open files here
    started = time.perf_counter()
    stopped = False
    try:
        with local_superlink(port, env, flwr_home / "superlink.log"):
            try:
                flwr = subprocess.Popen(command, env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, errors="replace")
                first_round = completed_rounds(run_dir) + 1 if resume else 1
                console = RunConsole(max(target_rounds - first_round + 1, 0), first_round, verbose)
                reader = threading.Thread(target=show, args=(flwr.stdout, console), daemon=True)
                reader.start()
                returncode = follow(flwr, run_dir, token, ours)
                reader.join(timeout=SHUTDOWN_GRACE_S)  # the rest of the output (the pipe ends with the processes)
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
    report_end(run_dir, target_rounds, returncode, flwr_home / "superlink.log")
    print(f"{completed_rounds(run_dir)} rounds in {seconds:.1f} s; checkpoint: {run_dir / CHECKPOINT_NAME}; "
          f"history: {run_dir / HISTORY_NAME} and {HISTORY_CSV_NAME}", flush=True)
    return run_dir


