"""Bytes for what a site keeps between rounds.

Site state (optimizer, DP accountant history, step, private decoder) is written with
torch.save and read back with `weights_only=True`: tensors and plain Python values only,
never arbitrary pickled objects.
"""

from __future__ import annotations

import io
from dataclasses import asdict
from typing import Any, Mapping

import torch

from common.training import SiteState


def to_bytes(payload: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def from_bytes(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def site_snapshot(round_number: int, state: SiteState, private: Mapping[str, torch.Tensor], made_with: str = "") -> bytes:
    """One round's site state and private weights, as bytes; `made_with`: what settings made them (a digest)."""
    return to_bytes({"round": round_number, "state": asdict(state), "made_with": made_with,
                     "private": {k: v.detach().cpu() for k, v in private.items()}})


def read_site_snapshot(blob: bytes) -> tuple[int, SiteState, dict[str, torch.Tensor], str]:
    """(round, state, private weights, made_with: "" in snapshots written before it was recorded)."""
    payload = from_bytes(blob)
    return (int(payload["round"]), SiteState(**payload["state"]), dict(payload["private"]),
            str(payload.get("made_with", "")))
