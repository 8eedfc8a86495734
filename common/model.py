"""What every objective's model has in common: the shared/private split, partial loads, plain state dicts.

The models themselves are the objectives (`common.objectives`, chosen by `model.objective`): each is a
randomly initialised timm ConvNeXt (`encoder`, a plain `timm.create_model(name, num_classes=0)`, so
its state dict loads with `strict=True` into a fresh timm model and is what hospitals exchange and
evaluation freezes) plus whatever its objective trains around it.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from common.objectives import (
    ENCODER_PREFIX,
    Objective,
    available_encoders,
    build_model,
    create_encoder,
    strip_wrapper_prefixes,
)

__all__ = ["ENCODER_PREFIX", "available_encoders", "build_model", "create_encoder", "encoder_state_dict",
           "load_partial_state", "private_state", "share_scope", "shared_keys", "shared_state", "strip_wrapper_prefixes"]

SHARE_ALIASES = {"vae": "all"}  # federation.share=vae (configs before the objectives registry) is share=all


def share_scope(scope: str) -> str:
    return SHARE_ALIASES.get(scope, scope)


def encoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder as a plain timm backbone state dict (loads into create_model(name, num_classes=0))."""
    return Objective.encoder_state_dict(model)  # type: ignore[arg-type]  - any module with an `encoder.` prefix


def shared_keys(model: Objective, scope: str) -> list[str]:
    """State-dict keys that leave a site: the encoder only (default) or the whole model (`all`); the objective decides."""
    return model.shared_keys(share_scope(scope))


def shared_state(model: Objective, scope: str) -> dict[str, torch.Tensor]:
    state = strip_wrapper_prefixes(model.state_dict())
    return {k: state[k].detach().clone() for k in shared_keys(model, scope)}


def private_state(model: Objective, scope: str) -> dict[str, torch.Tensor]:
    """What stays at the site: e.g. the VAE's decoder and latent heads when only the encoder is shared."""
    shared = set(shared_keys(model, scope))
    return {k: v.detach().clone() for k, v in strip_wrapper_prefixes(model.state_dict()).items() if k not in shared}


def load_partial_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load some of the model's keys (shared or private); unknown keys or shapes are errors."""
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            raise KeyError(f"{key!r} is not a parameter of this model")
        if tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(f"{key!r}: shape {tuple(value.shape)} does not match the model's {tuple(own[key].shape)}")
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in state.items()}}, strict=True)
