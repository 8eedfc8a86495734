"""Arm B: ConvNeXt-Tiny with ImageNet weights (timm), the transfer-learning baseline of the study.

Its weights come from `--imagenet-weights FILE`, the Hugging Face cache, or (online) the Hub as timm
fetches them; the model is `evaluation.imagenet_model`. It is named "ImageNet" only when the weights
are known to be timm's (see `imagenet_arm`); any other file is named by its name and hash, its
pretraining images unknown.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Optional
from urllib.parse import urlparse

from server.evaluation.arms.registry import Arm, ArmContext, ArmInput, ArmUnavailable, EvaluationArm, register_arm

if TYPE_CHECKING:  # torch and timm are imported when the arm builds: `dermfed` reads the registry for every command
    from torch import nn

    from common.config import DermFedConfig

IMAGENET_LABEL = "B: ImageNet ConvNeXt-Tiny"
# SHA-256 of weights files known to be timm's published ImageNet-1k weights, per timm model name: the one place that
# lists them. convnext_tiny.fb_in1k's model.safetensors (https://huggingface.co/timm/convnext_tiny.fb_in1k): the hash two
# independent public projects pin for that URL; it could not be checked against the Hub from where this was written.
# A file from timm's own download or the Hugging Face cache is also recognised by its cache entry
# (`_cache_entry_matches`). Add a hash only from the Hub's own record of the file (its Git LFS oid).
KNOWN_IMAGENET_SHA256: dict[str, frozenset[str]] = {
    "convnext_tiny.fb_in1k": frozenset({"08b9dc9c3a3a29421de7996761e176501896d1ae7fc3085cf56a643772329276"}),
}


class WeightsFileError(ArmUnavailable):
    """The file given as --imagenet-weights is not ImageNet weights of the arm's architecture; says what it is."""


def _frozen(model: "nn.Module") -> "nn.Module":
    return model.eval().requires_grad_(False)


def cached_imagenet_file(model_name: str, cache_dir: Optional[str] = None) -> Optional[Path]:
    """The weights file of `model_name` in the local Hugging Face cache, if any; never touches the network."""
    import timm
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


def _load(model_name: str, path: Path) -> "nn.Module":
    """timm's model with the weights of `path`, as timm loads a pretrained file; a file that is not those weights
    is a one-line error naming it."""
    import timm

    from common.data.catalog import DataError

    try:
        return timm.create_model(model_name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path)))
    except Exception as exc:  # noqa: BLE001 - torch.load, safetensors and load_state_dict fail in many ways
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise DataError(f"--imagenet-weights {path} does not hold {_architecture(model_name)} weights that timm can load "
                        f"as {model_name} ({type(exc).__name__}: {first}); pass the model.safetensors or "
                        f"pytorch_model.bin of timm/{model_name}") from None


def _labelled(model_name: str, model: "nn.Module", path: Path, where: str, verified: bool) -> Arm:
    """Arm B named by what is known of its weights: ImageNet only when they are known to be timm's."""
    from common.data.identity import file_sha256
    from server.evaluation.leakage import EXTERNAL, PretrainingImages

    digest = file_sha256(path)
    if verified or digest in KNOWN_IMAGENET_SHA256.get(model_name, frozenset()):
        return Arm("imagenet", IMAGENET_LABEL, _frozen(model),
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
    import timm

    from common.data.identity import file_sha256
    from server.evaluation.leakage import EXTERNAL

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
    return Arm("imagenet", IMAGENET_LABEL, _frozen(model),
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


def load_imagenet_file(path: Path, model_name: str) -> "nn.Module":
    """`model_name` (timm) with the ImageNet weights in `path`, or a WeightsFileError that says what the file is."""
    import timm
    import torch

    from common.checkpoint import CHECKPOINT_FORMAT

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


@register_arm
class ImagenetArm(EvaluationArm):
    name = "imagenet"
    letter = "B"
    description = ("ConvNeXt-Tiny with ImageNet weights, named ImageNet only when the weights are known to be timm's "
                   "(any other file: by its name and hash, its pretraining images unknown)")
    input = ArmInput("--imagenet-weights", "file", "FILE", runs_without=True,
                     help="arm B's ImageNet weights file (default: the Hugging Face cache, offline)")

    def check(self, given: str, config: "DermFedConfig") -> None:
        load_imagenet_file(Path(given), config.evaluation.imagenet_model)  # a wrong file: refused before any arm runs

    def build(self, given: Optional[str], context: ArmContext) -> Arm:
        return imagenet_arm(context.config.evaluation.imagenet_model, given)
