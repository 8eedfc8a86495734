"""The file in which a site keeps what it needs between rounds (one per round).

Site state (optimizer, DP accountant history, step, private decoder) is written with
torch.save and read back with `weights_only=True`: tensors and plain Python values only,
never arbitrary pickled objects.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

import torch

from common.run_files import atomic_torch_save
from common.training import SiteState


def _snapshot_payload(round_number: int, state: SiteState, private: Mapping[str, torch.Tensor],
                      made_with: str) -> dict[str, Any]:
    # fields by reference: dataclasses.asdict would deep-copy every optimizer tensor first
    return {"round": round_number, "state": {f.name: getattr(state, f.name) for f in fields(state)}, "made_with": made_with,
            "private": {k: v.detach().cpu() for k, v in private.items()}}


def write_site_snapshot(path: Path, round_number: int, state: SiteState, private: Mapping[str, torch.Tensor],
                        made_with: str = "") -> Path:
    """One round's site state and private weights (`made_with`: a digest of the settings that made them), streamed
    straight into `path`, atomically and synced: no in-memory copy of hundreds of MB."""
    payload = _snapshot_payload(round_number, state, private, made_with)
    return atomic_torch_save(path, payload)


def read_site_snapshot(source: Path) -> tuple[int, SiteState, dict[str, torch.Tensor], str]:
    """(round, state, private weights, made_with: "" in snapshots written before it was recorded)."""
    payload = torch.load(source, map_location="cpu", weights_only=True)
    return (int(payload["round"]), SiteState(**payload["state"]), dict(payload["private"]),
            str(payload.get("made_with", "")))
