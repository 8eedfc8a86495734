"""A simulated run's folder over its life: the lock while it runs, the config revision a resume records, the
hospitals' node configs, and what to tell the user when it ends or is interrupted (`common.run_folder` owns the
names and the resume check)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from client import simulated_nodes
from common.config import ConfigError, DermFedConfig, flatten_config, load_config, write_config
from common.run_folder import (CHECKPOINT_NAME, CONFIG_NAME, SITES_NAME, RunFolderError, RunFolderLock,
                               completed_rounds, config_revisions, read_status)
from common.run_folder import resume_config as _checked_resume_config
from simulations.processes import SimulationError


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


class RunLock(RunFolderLock):
    """The run folder's lock (`common.run_folder.RunFolderLock`), held by `dermfed simulate` for as long as the run
    or its guard lives; a folder in use is refused as RunRefused."""

    def __init__(self, run_dir: Path):
        try:
            super().__init__(run_dir, "dermfed simulate")
        except RunFolderError as exc:
            raise RunRefused(str(exc)) from None


def resume_config(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> DermFedConfig:
    """The config a resumed run continues with (`common.run_folder.resume_config`: the run's latest revision plus
    `overrides`, validated together, checked against the original); refused as RunRefused. Writes nothing."""
    try:
        return _checked_resume_config(run_dir, overrides)
    except RunFolderError as exc:
        raise RunRefused(str(exc)) from None


def write_revision(config: DermFedConfig, run_dir: Path) -> Path:
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


def write_node_configs(run_dir: Path, names: list[str], resume: bool,
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


def report_end(run_dir: Path, target_rounds: int, flwr_code: int, superlink_log: Path) -> None:
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
