"""The arms of the study: each a frozen encoder feeding an identical head.

A  federated: the global encoder of a `dermfed simulate` checkpoint
B  imagenet:  ConvNeXt-Tiny with ImageNet weights (timm), from --imagenet-weights or the HF cache
C  random:    the same architecture as A, randomly initialised (what pretraining adds at all)
D  pooled:    a centrally pretrained VAE encoder (`dermfed pretrain`)
E  local:     one site's local-only VAE encoder (`dermfed pretrain data.site=NAME`)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import timm
import torch
from torch import nn

from common.checkpoint import frozen_encoder, load_checkpoint

ARM_LABELS = {
    "federated": "A: federated VAE encoder",
    "imagenet": "B: ImageNet ConvNeXt-Tiny",
    "random": "C: random init (control)",
    "pooled": "D: pooled VAE encoder (control)",
    "local": "E: local-only VAE encoder (control)",
}


class ArmUnavailable(RuntimeError):
    """This arm cannot run here; the message says how to provide what it needs."""


@dataclass
class Arm:
    key: str
    label: str
    encoder: nn.Module
    source: str


def _frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


def checkpoint_arm(key: str, path: str | Path) -> Arm:
    payload = load_checkpoint(path)  # read once: federated checkpoints are large
    return Arm(key, ARM_LABELS[key], frozen_encoder(payload),
               f"{payload['encoder_name']} from {Path(path)} ({payload['position']})")


def random_arm(encoder_name: str, seed: int) -> Arm:
    torch.manual_seed(seed)
    model = timm.create_model(encoder_name, pretrained=False, num_classes=0)
    return Arm("random", ARM_LABELS["random"], _frozen(model), f"{encoder_name}, random init (seed {seed})")


def cached_imagenet_file(model_name: str, cache_dir: Optional[str] = None) -> Optional[Path]:
    """The weights file of `model_name` in the local Hugging Face cache, if any; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    config = timm.models.get_pretrained_cfg(model_name)
    repo = getattr(config, "hf_hub_id", None) if config is not None else None
    if not repo:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
        if isinstance(found, str):
            return Path(found)
    return None


def imagenet_arm(model_name: str, weights_file: Optional[str]) -> Arm:
    """ConvNeXt-Tiny with ImageNet weights: from a file, or from a filled Hugging Face cache (never downloads)."""
    architecture = model_name.split(".")[0]
    if weights_file:
        path = Path(weights_file).expanduser()
        if not path.is_file():
            raise ArmUnavailable(f"--imagenet-weights {path}: no such file")
        origin = str(path)
    else:
        cached = cached_imagenet_file(model_name)
        if cached is None:
            raise ArmUnavailable(
                f"ImageNet weights for {model_name} are not on this machine. Provide them either "
                f"(1) as a file: dermfed evaluate ... --imagenet-weights /path/to/{architecture}.safetensors (the "
                f"model.safetensors or pytorch_model.bin of timm/{model_name} on the Hugging Face Hub), or "
                f"(2) by filling the Hugging Face cache on a machine with internet access "
                f"(python -c \"import timm; timm.create_model('{model_name}', pretrained=True)\") and copying "
                f"~/.cache/huggingface to this machine (or pointing HF_HOME at it).")
        path, origin = cached, f"the Hugging Face cache ({cached})"
    model = timm.create_model(model_name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path)))
    return Arm("imagenet", ARM_LABELS["imagenet"], _frozen(model), f"{model_name} ImageNet weights from {origin}")
