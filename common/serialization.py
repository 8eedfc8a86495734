"""Bytes for what a site keeps between rounds, and plain arrays for what it shares.

Site state (optimizer, DP accountant history, step, private decoder) is written with
torch.save and read back with `weights_only=True`: tensors and plain Python values only,
never arbitrary pickled objects.
"""

from __future__ import annotations

import io
from dataclasses import asdict
from typing import Any, Mapping

import numpy as np
import torch

from common.training import SiteState


def to_bytes(payload: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def from_bytes(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def site_snapshot(round_number: int, state: SiteState, private: Mapping[str, torch.Tensor]) -> bytes:
    """One round's site state and private weights, as bytes."""
    return to_bytes({"round": round_number, "state": asdict(state),
                     "private": {k: v.detach().cpu() for k, v in private.items()}})


def read_site_snapshot(blob: bytes) -> tuple[int, SiteState, dict[str, torch.Tensor]]:
    payload = from_bytes(blob)
    return int(payload["round"]), SiteState(**payload["state"]), dict(payload["private"])


def to_numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def to_torch(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}
