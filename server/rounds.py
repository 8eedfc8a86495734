"""What the server does around each round, in plain Python (Flower stays in the app adapters).

- `screen_update`: a client update with NaN/Inf, wrong keys or wrong shapes is never averaged.
- `RunRecorder`: per-round history (aggregated and per-site metrics, who was left out and
  why, monitor results) to history.json / history.csv and the console, and a checkpoint
  after every completed round so an interrupted run resumes from its last completed round.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from common.checkpoint import save_checkpoint
from common.config import DermFedConfig, write_config
from common.model import ENCODER_PREFIX
from common.objectives import get_objective
from common.run_files import atomic_write_text
from common.run_folder import (CHECKPOINT_NAME, CONFIG_NAME, HISTORY_CSV_NAME, HISTORY_NAME, PREVIOUS_NAME,
                               STATUS_NAME, latest_good_checkpoint)

log = logging.getLogger("dermfed.server")


def owner_only_folder(run_dir: Path) -> Path:
    """A run folder only its owner can open: histories name sites and nodes, checkpoints hold the model."""
    Path(run_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    return Path(run_dir)


def write_run_status(run_dir: Path, state: str, completed_round: int, reason: str = "", resumable: bool = False) -> None:
    """How the run stands (`running`, `finished`, `stopped`, `failed`), for the CLI's closing message."""
    owner_only_folder(run_dir)
    status = {"state": state, "completed_round": completed_round, "reason": reason, "resumable": resumable}
    atomic_write_text(Path(run_dir) / STATUS_NAME, json.dumps(status, indent=1))  # never half-written


class RoundFailed(RuntimeError):
    """Fewer valid updates than federation.min_clients: the round cannot be aggregated."""


def screen_update(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
                  metrics: Mapping[str, float]) -> Optional[str]:
    """Why an update must not be aggregated, or None when it is sound."""
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        return f"wrong keys (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]})"
    for key, value in arrays.items():
        if tuple(value.shape) != tuple(expected[key]):
            return f"wrong shape for {key}: {tuple(value.shape)} instead of {tuple(expected[key])}"
        if not np.issubdtype(value.dtype, np.floating):  # text or integers: np.isfinite would raise, failing the round
            return f"{key} holds {value.dtype} values, not floating point weights"
        if not np.isfinite(value).all():
            return f"non-finite values (NaN/Inf) in {key}"
    weight = metrics.get("num-examples")
    if weight is None or not math.isfinite(float(weight)) or float(weight) <= 0:
        return f"num-examples must be a positive number, got {weight!r}"
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class RoundRecord:
    round: int
    sites: list[dict[str, Any]] = field(default_factory=list)
    excluded: list[dict[str, Any]] = field(default_factory=list)
    train: dict[str, float] = field(default_factory=dict)
    evaluate: dict[str, float] = field(default_factory=dict)
    monitor: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


class RunRecorder:
    """History and checkpoints of one federated run, in its run folder."""

    def __init__(self, run_dir: Path, config: DermFedConfig, history: Optional[list[dict[str, Any]]] = None,
                 pretraining_images: Optional[dict[str, Any]] = None):
        self.run_dir, self.config = Path(run_dir), config
        self.pretraining_images = pretraining_images or {"unknown": "not recorded"}
        self.history: list[dict[str, Any]] = list(history or [])
        self.current: Optional[RoundRecord] = None
        self.started = time.perf_counter()
        owner_only_folder(self.run_dir)
        if not (self.run_dir / CONFIG_NAME).is_file():  # a resumed run keeps its original config (revisions beside it)
            write_config(config, self.run_dir)

    def write_status(self, state: str, reason: str = "", resumable: bool = False) -> None:
        write_run_status(self.run_dir, state, self.completed_round(), reason, resumable)

    def completed_round(self) -> int:
        return max((h["round"] for h in self.history), default=0)

    def begin(self, round_number: int) -> RoundRecord:
        self.current = RoundRecord(round_number)
        self.started = time.perf_counter()
        return self.current

    def record(self, round_number: int) -> RoundRecord:
        if self.current is None or self.current.round != round_number:
            return self.begin(round_number)
        return self.current

    def finish(self, round_number: int, shared: Mapping[str, torch.Tensor], strategy_state: dict[str, Any]) -> None:
        """Close a completed round: checkpoint, then history files, then the console line.

        The checkpoint comes first: if it cannot be written (a full disk), the exception ends the run with
        the previous round's checkpoint and history untouched, so the history never claims a round
        that has no checkpoint.
        """
        record = self.record(round_number)
        record.seconds = time.perf_counter() - self.started
        entry = _jsonable(record.__dict__.copy())
        history = [h for h in self.history if h["round"] != round_number] + [entry]
        self._save_checkpoint(round_number, shared, strategy_state, history)
        self.history = history
        self._write_history()
        self._print(record, get_objective(self.config.model.objective).terms)
        self.current = None

    def _write_history(self) -> None:
        atomic_write_text(self.run_dir / HISTORY_NAME, json.dumps(self.history, indent=2))
        rows = []
        for entry in self.history:
            row = {"round": entry["round"], "seconds": entry["seconds"], "sites": len(entry["sites"]),
                   "excluded": len(entry["excluded"])}
            row.update({f"train_{k}": v for k, v in entry["train"].items()})
            row.update({f"evaluate_{k}": v for k, v in entry["evaluate"].items()})
            row.update({f"monitor_{k}": v for k, v in entry["monitor"].items()})
            for site in entry["sites"]:
                row[f"epsilon_{site['site']}"] = site.get("epsilon")
            rows.append(row)
        columns = list(dict.fromkeys(k for row in rows for k in row))
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.run_dir / HISTORY_CSV_NAME, table.getvalue())

    def _save_checkpoint(self, round_number: int, tensors: Mapping[str, torch.Tensor], strategy_state: dict[str, Any],
                         history: list[dict[str, Any]]) -> None:
        encoder = {k[len(ENCODER_PREFIX):]: v for k, v in tensors.items() if k.startswith(ENCODER_PREFIX)}
        save_checkpoint(self.run_dir / CHECKPOINT_NAME, config=self.config, encoder_state=encoder,
                        previous=self.run_dir / PREVIOUS_NAME,  # the last two rounds stay on disk
                        vae_state=dict(tensors) if self.config.federation.share == "all" else None,
                        position={"round": round_number}, history=history,
                        extra={"shared": dict(tensors), "arm": "federated", "pretraining_images": self.pretraining_images,
                               "strategy": {name: {k: torch.from_numpy(np.array(v, copy=True)) for k, v in moments.items()}
                                            for name, moments in strategy_state.items()}})

    @staticmethod
    def _print(record: RoundRecord, terms: tuple[str, ...]) -> None:
        """One line per round; the losses are the objective's terms (the first one per site)."""
        train = record.train

        def site(s: dict[str, Any]) -> str:
            parts = [f"{terms[0]} {s[terms[0]]:.1f}"] if terms[0] in s else []
            if s.get("epsilon") not in (None, math.inf):
                parts.append(f"eps {s['epsilon']:.2f}")
            return f"{s['site']}: {' '.join(parts) or 'ok'}"

        sites = ", ".join(site(s) for s in record.sites)
        left_out = f"; left out: {', '.join(e['site'] + ' (' + e['reason'] + ')' for e in record.excluded)}" if record.excluded else ""
        monitor = f"; monitor {record.monitor}" if record.monitor else ""
        losses = (", ".join(f"{key} {train[key]:.2f}" for key in terms if key in train)
                  if "total" in train else "no losses leave DP sites")
        images = sum(float(s.get("images-seen", 0.0)) for s in record.sites)  # none under DP: it stays at the site
        speed = f", {images / record.seconds:.1f} images/s" if images and record.seconds > 0 else ""
        print(f"[round {record.round}] {len(record.sites)} sites, {losses} ({record.seconds:.1f} s{speed}) [{sites}]"
              f"{left_out}{monitor}", flush=True)


def load_resume_point(run_dir: Path) -> dict[str, Any]:
    """The last completed round of a run folder (its latest good checkpoint): round, shared arrays, history,
    strategy state, its record of pretraining images."""
    payload = latest_good_checkpoint(run_dir)
    strategy = {name: {k: v.numpy() for k, v in moments.items()}
                for name, moments in payload["extra"].get("strategy", {}).items()}
    return {"round": int(payload["position"]["round"]), "shared": payload["extra"]["shared"],
            "history": payload["history"], "strategy": strategy, "config": payload["config"],
            "pretraining_images": (payload.get("extra") or {}).get("pretraining_images")}
