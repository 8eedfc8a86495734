"""A run folder, owned in one place: its kind, its file names, its completion, its latest good checkpoint, and
whether (and with what config) it may be resumed.

Every command that writes a run (`pretrain`, `simulate`, `evaluate`, `data summary`, `study`) asks `claim_out` before it
writes anything: a folder holding a run of another kind, or a finished run of the same kind, is refused with one
line (README "Errors"), or, with `--force`, moved aside first (RUN.old-<time>). `dermfed simulate --resume` and
`dermfed deploy run` of a `--resume` manifest both ask `resume_config` / `check_resume` before any process starts
or any file is written: the folder must hold a simulation run with a completed round and rounds left, and the
new config may not change what the run's checkpoints, site states and privacy ledgers were made with
(`LOCKED_KEYS`).

Writes are atomic and disk-full-safe (`common.run_files`): the last good checkpoint is never moved or removed
before the new one is completely written and synced, and `latest_good_checkpoint` falls back, with a warning,
to the previous one when the latest is missing or torn.

Standard library only at import time (the CLI imports this before torch): the checkpoint reader is imported
where it is used.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

if TYPE_CHECKING:
    from common.config import DermFedConfig

log = logging.getLogger("dermfed.run")

# -- kinds and file names --------------------------------------------------------------------------------------

SIMULATE, PRETRAIN, EVALUATE, DATA_SUMMARY, STUDY = "simulate", "pretrain", "evaluate", "data summary", "study"

CONFIG_NAME = "config.yaml"  # the run's resolved config; a resumed simulation adds config.r2.yaml, ...
CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"  # the round (epoch) before: a torn latest checkpoint loses one round only
HISTORY_NAME = "history.json"
HISTORY_CSV_NAME = "history.csv"
STATUS_NAME = "run-status.json"  # a federated run's state (running, finished, stopped, failed), for the CLI
LOCK_NAME = ".run.lock"  # held while a run uses the folder (`RunFolderLock`)
FLOWER_HOME_NAME = ".flower"  # a simulation's private SuperLink home
SITES_NAME = "sites"  # simulated hospitals' state folders
SIMULATED_NODES_NAME = "simulated-node-configs.json"
SUMMARY_NAME = "summary.json"  # written last by `pretrain` and by `data summary`
METRICS_NAME = "metrics.json"  # written last by `evaluate` (before the report)
STUDY_NAME = "study.json"  # `dermfed study`: its steps and how far it got (its sub-runs are subfolders)

# Files only one command writes (a simulation's before its first checkpoint, too).
_MARKERS = (
    (SIMULATE, (STATUS_NAME, SIMULATED_NODES_NAME, SITES_NAME, FLOWER_HOME_NAME, HISTORY_CSV_NAME)),
    (EVALUATE, (METRICS_NAME, "predictions.npz")),
    (DATA_SUMMARY, ("summary.csv", "skipped.csv")),
    (PRETRAIN, ("reconstructions.png",)),
    (STUDY, (STUDY_NAME,)),
)


class RunFolderError(ValueError):
    """A run folder cannot be used as asked (another kind's run, a finished run, nothing to resume); one line."""


def _describe(kind: str) -> str:
    return "a `dermfed data summary`" if kind == DATA_SUMMARY else f"a `dermfed {kind}` run"


def _read_checkpoint(path: Path) -> Optional[dict[str, Any]]:
    from common.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path)
    except (CheckpointError, OSError):
        return None


def run_kind(folder: Path) -> Optional[tuple[str, str]]:
    """(kind, what it holds in words) of a run folder, or None for a missing, empty or unknown folder.

    The kind is read from the checkpoint's position (`round`: simulate, `epoch`: pretrain) where there is a readable
    one (the latest, else the previous), else from the files each command writes."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME):
        if (folder / name).is_file() and (payload := _read_checkpoint(folder / name)) is not None:
            position = payload.get("position", {})
            if "round" in position:
                return SIMULATE, f"a `dermfed simulate` run (round {position['round']})"
            if "epoch" in position:
                return PRETRAIN, f"a `dermfed pretrain` checkpoint (epoch {position['epoch']})"
    for kind, names in _MARKERS:
        if any((folder / name).exists() for name in names):
            return kind, _describe(kind)
    return None


# -- the latest good checkpoint, completion ----------------------------------------------------------------------


def latest_good_checkpoint(folder: Path) -> dict[str, Any]:
    """The run's latest readable checkpoint: checkpoint.pt, or the previous one when the latest is missing or torn
    (with a warning). Raises FileNotFoundError when there is none, CheckpointError when neither can be read."""
    from common.checkpoint import CheckpointError, load_checkpoint

    folder = Path(folder)
    try:
        return load_checkpoint(folder / CHECKPOINT_NAME)
    except (CheckpointError, FileNotFoundError) as exc:  # torn, or gone between a rotation's two renames
        if not (folder / PREVIOUS_NAME).is_file():
            raise
        log.warning("%s; falling back to the previous round's %s", exc, PREVIOUS_NAME)
        return load_checkpoint(folder / PREVIOUS_NAME)


def completed_rounds(folder: Path) -> int:
    """Rounds a federated run has completed, by its latest good checkpoint (0: none yet)."""
    try:
        return int(latest_good_checkpoint(folder)["position"]["round"])
    except FileNotFoundError:
        return 0


def is_complete(folder: Path) -> bool:
    """Whether the folder holds a finished run: the one answer every command uses.

    A simulation is finished when its latest good checkpoint reached the rounds its own config asked for; a
    pretraining run when it wrote its summary (after its last epoch and its reconstructions); an evaluation when it
    wrote metrics.json; a data summary when it wrote summary.json; a study when its study.json says it finished."""
    folder = Path(folder)
    found = run_kind(folder)
    if found is None:
        return False
    kind = found[0]
    if kind == SIMULATE:
        try:
            payload = latest_good_checkpoint(folder)
        except (OSError, ValueError):
            return False
        return int(payload["position"].get("round", 0)) >= int(payload["config"]["federation"]["num_rounds"])
    if kind == PRETRAIN:
        return (folder / SUMMARY_NAME).is_file()
    if kind == EVALUATE:
        return (folder / METRICS_NAME).is_file()
    if kind == STUDY:
        return read_json(folder / STUDY_NAME).get("status") == "finished"
    return (folder / SUMMARY_NAME).is_file()


# -- the lock of a live run ----------------------------------------------------------------------------------------


class RunFolderLock:
    """An exclusive lock on a run folder for as long as a run uses it (flock on `.run.lock`, released by the kernel
    when its holder dies). `dermfed simulate` holds it for a simulation (its guard process inherits it); the
    ServerApp of a real federation holds it for a deployed run. While it is held, no other run starts or resumes
    there, `--force` does not move the folder aside, and `deploy run` submits nothing for it. The folder is made
    owner-only (0700) and the lock file 0600 before it is locked: an account that could open the lock file could
    hold it, and so the folder, after the run ends."""

    def __init__(self, folder: Path, holder: str):
        folder = Path(folder)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)  # before the lock file exists: no other account may open it (a flock needs no write
        self.path = folder / LOCK_NAME  # permission) and hold the folder after this run ends
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.fchmod(self.fd, 0o600)  # a lock file an older version created 0644
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise RunFolderError(f"{folder} is in use by a live run ({_holder(self.path)}); wait for it to end or stop "
                                 "it (Ctrl-C or kill PID) before starting or resuming a run there") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{holder}, pid {os.getpid()}".encode())

    def release(self) -> None:
        os.close(self.fd)


def _ancestors() -> set[int]:
    """This process's parent, its parent's parent, ... (Linux /proc); empty where /proc cannot be read."""
    found, pid = set(), os.getppid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as stream:
                pid = int(stream.read().rsplit(")", 1)[1].split()[1])  # field 4, after the command name
        except (OSError, ValueError, IndexError):
            break
    return found


def lock_unless_an_ancestor_holds(folder: Path, holder: str) -> Optional[RunFolderLock]:
    """The folder's lock for this process, or None where an ancestor of it holds it (the `dermfed simulate` that
    started this run's SuperLink, whose ServerApp this is). Any other live holder: RunFolderError, as `RunFolderLock`.
    What a process without a lock of its own may use: a folder is never written by two live runs."""
    try:
        return RunFolderLock(folder, holder)
    except RunFolderError:
        text = _holder(Path(folder) / LOCK_NAME)
        pid = text.rsplit("pid ", 1)[-1].strip()
        if pid.isdigit() and int(pid) in _ancestors():
            return None
        raise


def _holder(lock_path: Path) -> str:
    try:
        return lock_path.read_text().strip() or "pid ?"
    except OSError:
        return "pid ?"


def live_run(folder: Path) -> Optional[str]:
    """Who holds `folder`'s run lock (e.g. "dermfed simulate, pid 123"), or None when no live run uses it."""
    lock_path = Path(folder) / LOCK_NAME
    if not lock_path.is_file():
        return None
    with open(lock_path, "r") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(lock_path)
    return None


# -- claiming a folder for a new run -------------------------------------------------------------------------------


FORCE_REMEDY = "choose another folder, or pass --force to move it aside"


def move_aside(folder: Path) -> Path:
    """Rename `folder` to FOLDER.old-<time> (never over anything): where a `--force` keeps the old run."""
    folder = Path(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = folder.with_name(f"{folder.name}.old-{stamp}")
    counter = 1
    while target.exists():
        counter += 1
        target = folder.with_name(f"{folder.name}.old-{stamp}-{counter}")
    lock_path = folder / LOCK_NAME
    if not lock_path.is_file():
        folder.rename(target)
        return target
    with open(lock_path, "r") as lock:  # a live run holds it: its processes still write there by path
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderError(f"{folder} is in use by a live run ({_holder(lock_path)}); --force moves only a run "
                                 "that has ended: stop it first (Ctrl-C or kill PID)") from None
        folder.rename(target)  # under the lock: no run can start there in between
    return target


def refusal(folder: Path, kind: str, option: str = "--out", remedy: str = FORCE_REMEDY) -> Optional[str]:
    """Why `folder` may not receive a new run of `kind`, or None: it holds a run of another kind, or a finished
    run of this kind (an unfinished one is simply started again, except a simulation's, which `--resume`
    continues). `remedy` ends the message: what else the user may do."""
    folder = Path(folder)
    found = run_kind(folder)
    if found is None:
        return None
    if found[0] != kind:
        return f"{option} {folder} holds {found[1]}, not a `dermfed {kind}` run; writing there would mix the two: {remedy}"
    if kind == SIMULATE:
        if completed_rounds_or_none(folder) != 0:
            return f"{option} {folder} already holds a federated run; continue it with --resume, or {remedy}"
        return f"{option} {folder} holds a federated run that completed no round: {remedy}"
    if is_complete(folder):
        return f"{option} {folder} holds {_describe(kind)} that finished: {remedy}"
    return None


def completed_rounds_or_none(folder: Path) -> Optional[int]:
    """Completed rounds, or None where the checkpoints cannot be read (a torn run still is a run)."""
    try:
        return completed_rounds(folder)
    except (OSError, ValueError):
        return None if (Path(folder) / CHECKPOINT_NAME).exists() else 0


def claim_out(folder: Path, kind: str, force: bool = False, option: str = "--out") -> Optional[Path]:
    """Make `folder` ready for a new run of `kind`, before anything is written: refuse it (RunFolderError) when it
    holds another kind's run or a finished run; with `force`, move that run aside and return where it went."""
    why = refusal(folder, kind, option)
    if why is None:
        return None
    if not force:
        raise RunFolderError(why)
    return move_aside(folder)


# -- resuming a simulation -------------------------------------------------------------------------------------------

# What a resumed run may not change: the data, the split, the objective and the model's shapes (the objective
# names its own: `Objective.locked`), what is shared and how it is aggregated, whether and how privacy is
# accounted, and the warm start (its images are in the record evaluation's leak check reads, which a resumed run
# makes again from its config). Everything else (rounds, schedules, timeouts, monitor, ...) may change, and is recorded as a new
# revision of the run's config.
LOCKED_KEYS = ("seed", "data.", "synth.", "model.objective", "model.encoder", "model.drop_path_rate", "federation.share",
               "federation.strategy", "federation.initial_checkpoint", "dp.enabled", "dp.accountant", "dp.delta")
FREE_KEYS = ("data.cache_dir", "data.use_cache", "output_dir", "run_name")


def config_revisions(folder: Path) -> list[Path]:
    """The run's configs in order: config.yaml (the original), then config.r2.yaml, config.r3.yaml, ..."""
    folder = Path(folder)
    revisions = sorted(folder.glob("config.r*.yaml"), key=lambda p: int(p.name[len("config.r"):-len(".yaml")]))
    return [folder / CONFIG_NAME, *revisions]


def latest_config_file(folder: Path) -> Path:
    return [p for p in config_revisions(folder) if p.is_file()][-1]


def resumable_rounds(folder: Path, option: str = "--resume") -> int:
    """The rounds a resumable simulation run has completed; RunFolderError for anything else (another kind's run,
    no run at all, a run that completed no round, unreadable checkpoints). Reads only."""
    folder = Path(folder)
    found = run_kind(folder)
    if found and found[0] != SIMULATE:
        raise RunFolderError(f"{option} {folder} holds {found[1]}, not a simulation run; start a new run "
                             "(dermfed simulate --out NEW_FOLDER)")
    has_checkpoint = any((folder / name).exists() for name in (CHECKPOINT_NAME, PREVIOUS_NAME))
    if not (folder / CONFIG_NAME).is_file() or (found is None and not has_checkpoint):
        raise RunFolderError(f"{option} {folder}: no federated run there (no {CONFIG_NAME} of a `dermfed simulate` "
                             "run); start a new run (dermfed simulate --out NEW_FOLDER)")
    try:
        done = completed_rounds(folder)
    except (OSError, ValueError) as exc:
        raise RunFolderError(f"{option} {folder}: its checkpoints cannot be read ({exc}); start the run again in a "
                             "new folder") from None
    if done == 0:
        raise RunFolderError(f"{option} {folder}: the run completed no round, so there is nothing to resume; start "
                             "it again (with another --out, or --force to move this one aside)")
    return done


def locked_changes(folder: Path, config: "DermFedConfig") -> dict[str, tuple[Any, Any]]:
    """The locked keys `config` changes against the run's original config.yaml: key -> (original, new)."""
    from common.config import flatten_config, load_config
    from common.objectives import locked_keys

    original = flatten_config(load_config(Path(folder) / CONFIG_NAME))
    locked = LOCKED_KEYS + locked_keys(config.model)
    return {key: (original.get(key), value) for key, value in flatten_config(config).items()
            if value != original.get(key) and key.startswith(locked) and not key.startswith(FREE_KEYS)}


def locked_fingerprint(config: "DermFedConfig") -> str:
    """A digest of `config`'s locked settings: a site's saved state (optimizer, private weights) continues only a run
    with the same ones (`client.site`), whatever run the coordinator says it continues."""
    import hashlib

    from common.config import flatten_config
    from common.objectives import locked_keys

    locked = LOCKED_KEYS + locked_keys(config.model)
    values = {key: value for key, value in flatten_config(config).items()
              if key.startswith(locked) and not key.startswith(FREE_KEYS)}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


SIMULATION, DEPLOYMENT = "simulation", "deployment"  # who runs a federated run's hospitals


def simulated(folder: Path) -> bool:
    """Whether a federated run's hospitals were simulated: their states are in the run folder (`sites/`, with the
    node configs `dermfed simulate` gave them); a real federation's hospitals keep theirs at home."""
    return (Path(folder) / SITES_NAME).is_dir() or (Path(folder) / SIMULATED_NODES_NAME).is_file()


def check_resume(folder: Path, config: "DermFedConfig", option: str = "--resume", by: Optional[str] = None) -> int:
    """Whether `config` may continue the run in `folder`: a resumable federated run, rounds left, no locked key
    changed, and, when `by` says who would continue it (SIMULATION or DEPLOYMENT), hospitals of the same kind as
    the run's (a simulation would continue a real federation's run on other images, and real hospitals hold none
    of a simulation's site states). Returns the completed rounds; raises RunFolderError naming what is wrong.
    Reads only."""
    done = resumable_rounds(folder, option)
    if by == SIMULATION and not simulated(folder):
        raise RunFolderError(f"{option} {folder} holds a real federation's run (its hospitals keep their own states "
                             "and privacy ledgers): a simulation would continue it on other images. Continue it at "
                             "the hospitals (`dermfed deploy sign --resume`, then `dermfed deploy run`)")
    if by == DEPLOYMENT and simulated(folder):
        raise RunFolderError(f"{option} {folder} holds a simulation's run (its virtual hospitals' states are in "
                             f"{SITES_NAME}/): real hospitals cannot continue it. Continue it with `dermfed simulate "
                             "--resume`, or sign a new run")
    if changed := locked_changes(folder, config):
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise RunFolderError(f"{option} {folder} cannot change {listed}: the run's checkpoints, site states and "
                             "privacy ledgers were made with the original values. Start a new run for that")
    total = config.federation.num_rounds
    if done >= total:
        raise RunFolderError(f"{option} {folder} already completed federation.num_rounds={total} rounds; raise "
                             "federation.num_rounds to continue it")
    return done


def resume_config(folder: Path, overrides: Iterable[str] = (), option: str = "--resume",
                  by: Optional[str] = SIMULATION) -> "DermFedConfig":
    """The config a resumed simulation continues with: its latest revision plus `overrides`, parsed and validated
    once, together, then checked (`check_resume`). Writes nothing."""
    from common.config import load_config

    resumable_rounds(folder, option)  # before its config is read: a folder of another kind has none to read
    config = load_config(latest_config_file(folder), list(overrides))
    check_resume(folder, config, option, by)
    return config


def read_json(path: Path) -> dict[str, Any]:
    """A run's small JSON record, or {} when it is missing or unreadable."""
    try:
        value = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    except (ValueError, OSError):
        return {}
    return value if isinstance(value, dict) else {}


def read_status(folder: Path) -> dict[str, Any]:
    return read_json(Path(folder) / STATUS_NAME)
