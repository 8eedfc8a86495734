"""What kind of dermfed run a folder already holds, so that no command continues, or writes over, another's.

`dermfed simulate --resume` needs a simulation run; `pretrain`, `data summary` and `evaluate` write their
config.yaml and results into `--out`, so each refuses a folder holding a run of another kind (README "Errors").
The kind is read from the checkpoint's position (`round`: simulate, `epoch`: pretrain) where there is one,
else from the files each command writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from common.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint

SIMULATE, PRETRAIN, EVALUATE, DATA_SUMMARY = "simulate", "pretrain", "evaluate", "data summary"

# Files only one command writes (a simulation's before its first checkpoint, too).
_MARKERS = (
    (SIMULATE, ("run-status.json", "simulated-node-configs.json", "sites", ".flower", "history.csv")),
    (EVALUATE, ("metrics.json", "predictions.npz")),
    (DATA_SUMMARY, ("summary.csv", "skipped.csv")),
    (PRETRAIN, ("reconstructions.png",)),
)


def run_kind(folder: Path) -> Optional[tuple[str, str]]:
    """(kind, what it holds in words) of a run folder, or None for a missing, empty or unknown folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / CHECKPOINT_NAME).is_file():
        try:
            position = load_checkpoint(folder).get("position", {})
        except (CheckpointError, OSError):
            position = {}  # a torn checkpoint: the command that reads it says so; the other files still tell
        if "round" in position:
            return SIMULATE, f"a `dermfed simulate` run (round {position['round']})"
        if "epoch" in position:
            return PRETRAIN, f"a `dermfed pretrain` checkpoint (epoch {position['epoch']})"
    for kind, names in _MARKERS:
        if any((folder / name).exists() for name in names):
            return kind, f"a `dermfed {kind}` run" if kind != DATA_SUMMARY else "a `dermfed data summary`"
    return None


def refuse_other_kind(folder: Path, kind: str, option: str = "--out") -> Optional[str]:
    """Why `folder` may not receive a run of `kind` (it holds another kind's run), or None."""
    found = run_kind(folder)
    if found is None or found[0] == kind:
        return None
    return (f"{option} {folder} holds {found[1]}, not a `dermfed {kind}` run; writing there would mix the two: "
            "choose another folder")
