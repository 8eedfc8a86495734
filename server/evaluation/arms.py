"""The arms of the study: each a frozen encoder feeding an identical head.

A  federated: the encoder under study, `--checkpoint` (a `dermfed simulate` run, or any pretraining run)
B  imagenet:  ConvNeXt-Tiny with ImageNet weights (timm): --imagenet-weights, the HF cache, or the Hub when online;
              named "ImageNet" only when the weights are known to be timm's (see `imagenet_arm`)
C  random:    the same architecture as A, randomly initialised (what pretraining adds at all)
D  pooled:    a centrally pretrained encoder (`dermfed pretrain`)
E  local:     one site's local-only encoder (`dermfed pretrain data.site=NAME`)

The key names the slot (the command-line option); a checkpoint arm's label names what its
checkpoint records it is (`provenance.py`): "A: pooled VAE encoder (2 epochs, DP-SGD off)" for a
pooled run passed as `--checkpoint`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from common.checkpoint import CHECKPOINT_FORMAT, frozen_encoder, load_checkpoint
from common.data.catalog import DataError
from common.data.identity import file_sha256
from server.evaluation.leakage import EXTERNAL, NO_PRETRAINING, PretrainingImages, pretraining_images
from server.evaluation.provenance import checkpoint_provenance

ARM_LABELS = {
    "imagenet": "B: ImageNet ConvNeXt-Tiny",
    "random": "C: random init (control)",
}
# SHA-256 of weights files known to be timm's published ImageNet-1k weights, per timm model name: the one place that
# lists them. convnext_tiny.fb_in1k's model.safetensors (https://huggingface.co/timm/convnext_tiny.fb_in1k): the hash two
# independent public projects pin for that URL; it could not be checked against the Hub from where this was written.
# A file from timm's own download or the Hugging Face cache is also recognised by its cache entry
# (`_cache_entry_matches`). Add a hash only from the Hub's own record of the file (its Git LFS oid).
KNOWN_IMAGENET_SHA256: dict[str, frozenset[str]] = {
    "convnext_tiny.fb_in1k": frozenset({"08b9dc9c3a3a29421de7996761e176501896d1ae7fc3085cf56a643772329276"}),
}
CHECKPOINT_LETTERS = {"federated": "A", "pooled": "D", "local": "E"}
EXPECTED_KIND = {"federated": "federated", "pooled": "pooled", "local": "local-only"}


class ArmUnavailable(RuntimeError):
    """This arm cannot run here; the message says how to provide what it needs."""


class WeightsFileError(ArmUnavailable):
    """The file given as --imagenet-weights is not ImageNet weights of the arm's architecture; says what it is."""


@dataclass
class Arm:
    key: str
    label: str
    encoder: nn.Module
    source: str
    pretraining: PretrainingImages = NO_PRETRAINING  # which images it pretrained on (leak check)
    provenance: Optional[dict[str, Any]] = None  # checkpoint arms: what the checkpoint records it is


def _frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


def checkpoint_arm(key: str, path: str | Path, cache_dir: Optional[str] = None) -> Arm:
    """A pretraining run's encoder, labelled by its slot's letter and what the checkpoint records it is; its pretraining
    images checked against its own config's data where that is on this machine (`leakage.pretraining_images`)."""
    payload = load_checkpoint(path)  # read once: federated checkpoints are large
    provenance = checkpoint_provenance(payload)
    if provenance.kind != EXPECTED_KIND[key]:
        print(f"note: the {key} slot holds a {provenance.kind} checkpoint ({path}); it is labelled as what it is", flush=True)
    if provenance.claimed:
        print(f"note: checkpoint {path} calls itself {provenance.claimed!r} but its position {payload['position']} is a "
              f"{provenance.kind} run's; it is labelled by its position", flush=True)
    return Arm(key, f"{CHECKPOINT_LETTERS[key]}: {provenance.describe()}", frozen_encoder(payload),
               f"{payload['encoder_name']} from {Path(path)} ({payload['position']})",
               pretraining_images(payload, cache_dir, str(path)), provenance.as_dict())


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


def _architecture(model_name: str) -> str:
    """`convnext_tiny.fb_in1k` -> `ConvNeXt-Tiny`, as the report names it."""
    architecture = model_name.split(".")[0]
    return {"convnext_tiny": "ConvNeXt-Tiny"}.get(architecture, architecture)


def _cache_entry_matches(path: Path, digest: str) -> bool:
    """A Hugging Face cache file links to its blob, named by the Hub's SHA-256 of the file (Git LFS oid)."""
    return path.is_symlink() and path.resolve().name == digest


def _load(model_name: str, path: Path) -> nn.Module:
    """timm's model with the weights of `path`, as timm loads a pretrained file; a file that is not those weights
    is a one-line error naming it."""
    try:
        return timm.create_model(model_name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path)))
    except Exception as exc:  # noqa: BLE001 - torch.load, safetensors and load_state_dict fail in many ways
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise DataError(f"--imagenet-weights {path} does not hold {_architecture(model_name)} weights that timm can load "
                        f"as {model_name} ({type(exc).__name__}: {first}); pass the model.safetensors or "
                        f"pytorch_model.bin of timm/{model_name}") from None


def _labelled(model_name: str, model: nn.Module, path: Path, where: str, verified: bool) -> Arm:
    """Arm B named by what is known of its weights: ImageNet only when they are known to be timm's."""
    digest = file_sha256(path)
    if verified or digest in KNOWN_IMAGENET_SHA256.get(model_name, frozenset()):
        return Arm("imagenet", ARM_LABELS["imagenet"], _frozen(model),
                   f"{model_name} ImageNet-1k weights {where} (sha256 {digest})", EXTERNAL)
    label = f"B: {_architecture(model_name)}, unverified weights (sha256 {digest[:12]}..., {path.name})"
    unknown = PretrainingImages(None, None, f"unknown: weights from {path} (sha256 {digest}) that are not known to be "
                                            f"timm's ImageNet-1k {model_name}; what they were trained on is not known")
    return Arm("imagenet", label, _frozen(model), f"{model_name} weights {where} (sha256 {digest}; not verified)", unknown)


def imagenet_arm(model_name: str, weights_file: Optional[str]) -> Arm:
    """ConvNeXt-Tiny with ImageNet weights: from a file, the Hugging Face cache, or (online) the Hub, as timm does.

    Named "ImageNet" when the weights are known to be timm's: downloaded by timm from the Hub, or a
    Hugging Face cache entry whose content matches the Hub's hash of it, or a file whose SHA-256 is
    in `KNOWN_IMAGENET_SHA256`; any other file is named by its name and hash, "not verified", and
    its pretraining images are unknown. A file that does not hold the architecture's weights is a
    one-line error. Offline (`HF_HUB_OFFLINE=1`, or no network) and with neither a file nor a
    filled cache, the arm is unavailable with a message that names the fixes; the other arms still run.
    """
    architecture = model_name.split(".")[0]
    if weights_file:
        path = Path(weights_file).expanduser()
        model = load_imagenet_file(path, model_name)  # a file that is not such weights: says what it is
        return _labelled(model_name, model, path, f"from {path}", _cache_entry_matches(path, file_sha256(path)))
    cached = cached_imagenet_file(model_name)
    if cached is not None:
        return _labelled(model_name, _load(model_name, cached), cached, f"from the Hugging Face cache ({cached})",
                         _cache_entry_matches(cached, file_sha256(cached)))
    fixes = (f"Provide them either (1) as a file: dermfed evaluate ... --imagenet-weights /path/to/{architecture}.safetensors "
             f"(the model.safetensors or pytorch_model.bin of timm/{model_name} on the Hugging Face Hub), or "
             f"(2) by filling the Hugging Face cache on a machine with internet access "
             f"(python -c \"import timm; timm.create_model('{model_name}', pretrained=True)\") and copying "
             f"~/.cache/huggingface to this machine (or pointing HF_HOME at it).")
    if _offline():
        raise ArmUnavailable(f"ImageNet weights for {model_name} are not on this machine and downloads are off "
                             f"(HF_HUB_OFFLINE). {fixes}")
    unreachable = _hub_unreachable()
    if unreachable:  # fail in seconds, not after the Hub client's minute of retries
        raise ArmUnavailable(f"ImageNet weights for {model_name} are not on this machine and the Hugging Face Hub "
                             f"cannot be reached ({unreachable}). {fixes}")
    try:  # online: fetch from the Hub exactly as timm does, into the Hugging Face cache
        model = timm.create_model(model_name, pretrained=True, num_classes=0)
    except Exception as exc:  # noqa: BLE001 - any download failure leaves the other arms running
        raise ArmUnavailable(f"ImageNet weights for {model_name} could not be downloaded ({type(exc).__name__}: "
                             f"{exc}). {fixes}") from None
    downloaded = cached_imagenet_file(model_name)
    digest = f" (sha256 {file_sha256(downloaded)})" if downloaded is not None else ""
    return Arm("imagenet", ARM_LABELS["imagenet"], _frozen(model),
               f"{model_name} ImageNet-1k weights downloaded by timm from the Hugging Face Hub{digest}", EXTERNAL)


def weights_file_kind(path: Path) -> str:
    """What a file is, from its first bytes: 'safetensors', 'torch' (zip or legacy pickle), or a description."""
    size = path.stat().st_size
    if size == 0:
        return "an empty file"
    with open(path, "rb") as stream:
        head = stream.read(4096)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    header = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    if 0 < header <= size - 8 and head[8:9] == b"{":
        return "safetensors"
    try:
        from PIL import Image

        with Image.open(path) as image:
            return f"an image ({image.format} {image.size[0]}x{image.size[1]})"
    except Exception:  # noqa: BLE001 - not an image: go on guessing
        pass
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "neither a safetensors nor a torch file"


def load_imagenet_file(path: Path, model_name: str) -> nn.Module:
    """`model_name` (timm) with the ImageNet weights in `path`, or a WeightsFileError that says what the file is."""
    wanted = (f"--imagenet-weights takes the model.safetensors or pytorch_model.bin of timm/{model_name} "
              "(Hugging Face Hub)")
    if not path.is_file():
        raise WeightsFileError(f"--imagenet-weights {path}: no such file; {wanted}")
    kind = weights_file_kind(path)
    if kind not in ("safetensors", "torch"):
        raise WeightsFileError(f"--imagenet-weights {path} is {kind}, not a weights file; {wanted}")
    if kind == "torch":
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torn, or pickled objects that weights_only refuses
            raise WeightsFileError(f"--imagenet-weights {path} is a torch file that cannot be read as plain tensors "
                                   f"({type(exc).__name__}); {wanted}") from None
        if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
            raise WeightsFileError(f"--imagenet-weights {path} is a DermFed checkpoint ({payload.get('encoder_name')} "
                                   "pretrained by DermFed), not ImageNet weights; give DermFed runs as --checkpoint, "
                                   f"--pooled or --local. {wanted}")
    try:
        return timm.create_model(model_name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path)))
    except Exception as exc:  # noqa: BLE001 - timm reports missing/unexpected keys and shape mismatches as RuntimeError
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise WeightsFileError(f"--imagenet-weights {path} is a {kind} file whose weights do not fit {model_name} "
                               f"({reason}); {wanted}") from None


def _hub_unreachable(timeout: float = 3.0) -> Optional[str]:
    """Why the Hugging Face Hub cannot be reached from here, or None when a connection opens."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout=timeout).close()
    except OSError as exc:
        return f"{endpoint.hostname}: {exc}"
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
