"""Checkpoints: plain state dicts, the resolved config, the position (epoch or round), history.

No Opacus (`_module.`), DDP (`module.`) or torch.compile (`_orig_mod.`) prefixes: the encoder
entry loads with strict=True into `timm.create_model(<encoder>, num_classes=0)`. Files load
with `torch.load(weights_only=True)`: tensors and plain Python values only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import timm
import torch

from common.config import DermFedConfig, build_config
from common.model import encoder_state_dict, strip_wrapper_prefixes
from common.objectives import Objective
from common.run_files import atomic_torch_save
from common.run_folder import CHECKPOINT_NAME, PREVIOUS_NAME  # noqa: F401 - the run folder owns its file names

CHECKPOINT_FORMAT = "dermfed-checkpoint-v1"


def save_checkpoint(path: str | Path, *, config: DermFedConfig, encoder_state: dict[str, torch.Tensor],
                    vae_state: Optional[dict[str, torch.Tensor]] = None, position: dict[str, int],
                    history: list[dict[str, Any]], extra: Optional[dict[str, Any]] = None,
                    previous: Optional[str | Path] = None) -> Path:
    """`vae_state`: the objective's whole model (stored under "vae", the key's name before objectives, so that old
    and new checkpoints read alike); None when only the encoder is shared.

    Write atomically (`common.run_files`): a failed or interrupted save leaves the last good file as it was.

    With `previous` (e.g. checkpoint.prev.pt), the file it replaces is kept under that name."""
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "encoder_name": config.model.encoder,
        "encoder": {k: v.detach().cpu() for k, v in strip_wrapper_prefixes(encoder_state).items()},
        "vae": {k: v.detach().cpu() for k, v in strip_wrapper_prefixes(vae_state).items()} if vae_state else None,
        "config": config.model_dump(mode="json"),
        "position": dict(position),
        "history": history,
        "extra": extra or {},
    }
    return atomic_torch_save(path, payload, previous)


def save_model_checkpoint(path: str | Path, model: Objective, config: DermFedConfig, position: dict[str, int],
                        history: list[dict[str, Any]], extra: Optional[dict[str, Any]] = None,
                        previous: Optional[str | Path] = None) -> Path:
    return save_checkpoint(path, config=config, encoder_state=encoder_state_dict(model),
                           vae_state=strip_wrapper_prefixes(model.state_dict()), position=position,
                           history=history, extra=extra, previous=previous)


class CheckpointError(ValueError):
    """A file that should be a DermFed checkpoint cannot be used as one; the message names it."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file, or `checkpoint.pt` inside a run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no DermFed checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the run that wrote it was probably interrupted; "
                              f"use the run folder's {PREVIOUS_NAME} or run it again")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load fails in many ways on a torn or foreign file
        raise CheckpointError(f"{path} is not a readable DermFed checkpoint ({type(exc).__name__}): it is truncated "
                              f"or another kind of file; use the run folder's {PREVIOUS_NAME}, or the run that wrote "
                              "it") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} file (a checkpoint of another program?); "
                              "pass a checkpoint written by dermfed pretrain or dermfed simulate")
    return payload


def checkpoint_config(payload: dict[str, Any]) -> DermFedConfig:
    return build_config(payload["config"])


def load_frozen_encoder(path: str | Path) -> torch.nn.Module:
    """The checkpoint's encoder as a timm backbone (num_classes=0), strictly loaded, in eval mode."""
    return frozen_encoder(load_checkpoint(path))


def frozen_encoder(payload: dict[str, Any]) -> torch.nn.Module:
    """The encoder of an already loaded checkpoint, as a frozen timm backbone."""
    encoder = timm.create_model(payload["encoder_name"], pretrained=False, num_classes=0)
    encoder.load_state_dict(payload["encoder"], strict=True)
    return encoder.eval().requires_grad_(False)
