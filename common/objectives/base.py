"""The contract every self-supervised objective keeps (one file per objective, registered by name).

An objective is the whole pretraining model: a plain timm encoder (`encoder`, the weights hospitals
exchange and evaluation freezes) plus whatever it trains around it (a VAE's decoder, a masked
model's decoder). It returns PER-SAMPLE loss terms, so DP-SGD clips each image's gradient; it
declares its per-image random draws, so under DP they come from secret generators; it says what
leaves a site and what stays there; it names its metrics and owns the config section
`model.<name>` (a pydantic class, `Settings`). Training, federation, checkpoints, monitors and the
report ask the objective instead of knowing any one of them.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Optional

import timm
import torch
from torch import nn

from common.config.schema import _Section

ENCODER_PREFIX = "encoder."
SHARE_SCOPES = ("encoder", "all")  # federation.share: the encoder only, or the whole objective's model


class ObjectiveSettings(_Section):
    """An objective's own config section (`model.<name>`): unknown keys, NaN, true for a number are errors, as in
    every section."""


def available_encoders() -> list[str]:
    """timm's ConvNeXt family (convnext_atto ... convnext_xxlarge)."""
    return sorted(name for name in timm.list_models("convnext*") if "." not in name)


def create_encoder(name: str = "convnext_tiny", drop_path_rate: float = 0.0) -> nn.Module:
    """A randomly initialised timm ConvNeXt that outputs pooled features (no classifier)."""
    if name not in available_encoders():
        raise ValueError(f"model.encoder={name!r} is not a timm ConvNeXt; choose one of {available_encoders()}")
    return timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate)


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove `_module.` (Opacus GradSampleModule), `module.` (DataParallel/DDP) and
    `_orig_mod.` (torch.compile) prefixes, so checkpoints hold plain state dicts."""
    clean = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in ("_module.", "module.", "_orig_mod."):
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        clean[key] = value
    return clean


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Mixed precision yields half-precision outputs; losses are computed in float32 (float64 for a float64 model)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


class Objective(nn.Module):
    """Base of every objective. Subclasses set the class attributes and implement `from_config`, `forward`,
    `loss_terms` (and, where they have them, `schedule`, `random_streams`, `preview`)."""

    name: ClassVar[str] = ""  # set by `register_objective`
    title: ClassVar[str] = ""  # how reports write it ("VAE"); default: the name
    Settings: ClassVar[type[ObjectiveSettings]] = ObjectiveSettings  # the section model.<name>
    terms: ClassVar[tuple[str, ...]] = ("total",)  # per-sample loss terms, "total" (the one optimised) included;
    # the first is the headline the round log and the report plot
    locked: ClassVar[tuple[str, ...]] = ()  # settings that shape the weights: a resumed run may not change them
    monitors: ClassVar[tuple[str, ...]] = ()  # federation.monitor kinds it supports beyond none and linear-probe
    encoder: nn.Module

    # -- building ---------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, model_config: Any, image_size: int) -> "Objective":
        """The model described by the `model` config section (generic keys plus `model.<name>`)."""
        raise NotImplementedError

    def _normalisation(self) -> None:
        """Inputs are images in [0, 1]; the encoder sees them normalised with its own mean and std, as in evaluation."""
        config = self.encoder.pretrained_cfg
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1), persistent=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features of images in [0, 1] (what a linear probe sees)."""
        return self.encoder((images - self.mean) / self.std)

    # -- training -----------------------------------------------------------------------------------

    def random_streams(self) -> dict[str, tuple[str, int]]:
        """The per-image random draws a training step needs, e.g. {"mask": ("uniform", patches)}: under DP each
        image draws them from its own secret stream (`common.privacy.ImageDraws`), handed to `forward` as `draws`."""
        return {}

    def schedule(self, step: Optional[int]) -> dict[str, float]:
        """Step-dependent loss weights (e.g. a KL warm-up); `step=None`: their final values (evaluation)."""
        return {}

    def forward(self, images: torch.Tensor, draws: Optional[Mapping[str, torch.Tensor]] = None) -> Any:
        raise NotImplementedError

    def loss_terms(self, images: torch.Tensor, output: Any, schedule: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """Per-sample terms, each of shape (batch,), keyed by `terms`; the batch loss is the mean of "total"
        (the reduction Opacus assumes)."""
        raise NotImplementedError

    def as_float(self, output: Any) -> Any:
        """Mixed precision produces half-precision outputs; the loss is computed in float32 (or float64)."""
        return output

    def derived_metrics(self, per_image: Mapping[str, float], image_shape: tuple[int, ...]) -> dict[str, float]:
        """Extra epoch metrics computed from the per-image means of `terms` (e.g. a per-pixel error)."""
        return {}

    @torch.no_grad()
    def preview(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Rows of images in [0, 1] that show what the objective learned (one row per kind); evaluation mode."""
        return [images]

    # -- federation ----------------------------------------------------------------------------------

    def shared_keys(self, scope: str) -> list[str]:
        """State-dict keys that leave a site: `encoder` (the encoder only) or `all` (the whole model)."""
        keys = list(strip_wrapper_prefixes(self.state_dict()))
        if scope == "all":
            return keys
        if scope == "encoder":
            return [k for k in keys if k.startswith(ENCODER_PREFIX)]
        raise ValueError(f"unknown share scope {scope!r}; allowed: {', '.join(SHARE_SCOPES)}")

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder as a plain timm backbone state dict (loads into create_model(name, num_classes=0))."""
        state = strip_wrapper_prefixes(self.state_dict())
        return {k[len(ENCODER_PREFIX):]: v.detach().clone() for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
