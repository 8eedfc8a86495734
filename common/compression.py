"""Compressed updates (`federation.compression`): what a site sends instead of its float32 weights.

A site sends its update relative to the global weights it received (delta = local - global),
plus the residual it kept from earlier rounds (error feedback), quantised per output channel
(dim 0; one scale for a tensor of fewer than two dimensions) with stochastic rounding, so the
quantisation is unbiased and what one round loses the next round sends. The residual stays at
the site (its private state). The server adds the decoded delta to the global weights it sent
before anything reads the reply's arrays.

- `int8`: q = floor(x / s + u), u ~ U[0, 1), s = max|x| / 127 per channel: int8 values and one float32
  scale per channel (about 0.25x of float32; the scales add 4 bytes per output channel).
- `fp16`: x / s, s = max|x| per channel, stochastically rounded to float16: about 0.5x.

Everything a site sends is computed from its delta (under DP: the noised weights DP-SGD
produced, minus the global ones) and from the generator's draws: post-processing, no privacy cost.

Plain torch (no Flower): the adapters carry the payload's tensors as any other arrays.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch

CODECS = ("none", "fp16", "int8")
SCALE_SUFFIX = "::scale"  # payload key of a tensor's per-channel scales
INT8_LEVELS = 127
FP16_DROPPED_BITS = 13  # float32 has 23 mantissa bits, float16 10
FP16_SMALLEST_NORMAL = 2.0 ** -14
FP16_SUBNORMAL_STEP = 2.0 ** -24

Tensors = Mapping[str, torch.Tensor]


class CompressionError(ValueError):
    """A payload that does not decode to the expected tensors (wrong keys, dtypes or shapes)."""


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from several integers, without touching torch's global generator (no DP only)."""
    generator = torch.Generator()
    generator.manual_seed(int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0]))
    return generator


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as (channels, values per channel): dim 0 is the output channel; one row below 2 dims."""
    return tensor.reshape(tensor.shape[0], -1) if tensor.dim() >= 2 else tensor.reshape(1, -1)


def _stochastic_fp16(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 in [-1, 1] to float16, rounded up or down with probability proportional to the distance (unbiased)."""
    values = values.contiguous()
    noise = torch.randint(0, 1 << FP16_DROPPED_BITS, values.shape, generator=generator, dtype=torch.int32)
    mask = ~((1 << FP16_DROPPED_BITS) - 1)
    normal = ((values.view(torch.int32) + noise) & mask).view(torch.float32)  # magnitude rounded, carries included
    uniform = torch.rand(values.shape, generator=generator)
    subnormal = torch.floor(values / FP16_SUBNORMAL_STEP + uniform) * FP16_SUBNORMAL_STEP  # float16's fixed grid there
    return torch.where(values.abs() < FP16_SMALLEST_NORMAL, subnormal, normal).to(torch.float16)


def encode(update: Tensors, codec: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The payload of a float update: for each key its quantised values (its shape) and `key::scale` (channels,)."""
    if codec not in ("fp16", "int8"):
        raise ValueError(f"no encoder for compression {codec!r}; allowed: fp16, int8")
    payload: dict[str, torch.Tensor] = {}
    for key, tensor in update.items():
        if not tensor.is_floating_point():
            raise TypeError(f"{key}: only floating-point tensors are compressed, not {tensor.dtype}")
        rows = _rows(tensor.detach().cpu().float())
        peak = rows.abs().amax(dim=1)
        scale = peak / INT8_LEVELS if codec == "int8" else peak
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)  # an all-zero channel sends zeros
        scaled = rows / safe
        if codec == "int8":
            uniform = torch.rand(scaled.shape, generator=generator)
            values = torch.floor(scaled + uniform).clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
        else:
            values = _stochastic_fp16(scaled, generator)
        payload[key] = values.reshape(tensor.shape)
        payload[key + SCALE_SUFFIX] = scale
    return payload


def _tensor(key: str, value: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A payload array as a tensor; one that is not numeric (Flower carries any NumPy dtype, text included) is a
    CompressionError naming it, so the server leaves that reply out instead of failing the round."""
    if isinstance(value, torch.Tensor):
        return value
    array = np.array(value, copy=True)  # Flower's arrays are read-only
    if array.dtype.kind not in "biufc":
        raise CompressionError(f"{key}: {array.dtype} values, not numbers")
    return torch.from_numpy(array)


def decode(payload: Mapping[str, torch.Tensor | np.ndarray], codec: str,
           shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The float32 update a payload stands for; `shapes`: the expected keys and shapes (what the server sent)."""
    dtype = {"int8": torch.int8, "fp16": torch.float16}.get(codec)
    if dtype is None:
        raise ValueError(f"no decoder for compression {codec!r}; allowed: fp16, int8")
    wanted = set(shapes) | {key + SCALE_SUFFIX for key in shapes}
    if set(payload) != wanted:
        missing, extra = sorted(wanted - set(payload)), sorted(set(payload) - wanted)
        raise CompressionError(f"compressed update has the wrong keys (missing {missing[:3]}, unexpected {extra[:3]})")
    update: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        values, scale = _tensor(key, payload[key]), _tensor(key + SCALE_SUFFIX, payload[key + SCALE_SUFFIX])
        channels = shape[0] if len(shape) >= 2 else 1
        if values.dtype != dtype or tuple(values.shape) != tuple(shape):
            raise CompressionError(f"{key}: {values.dtype} {tuple(values.shape)} instead of {dtype} {tuple(shape)}")
        if scale.dtype != torch.float32 or tuple(scale.shape) != (channels,):
            raise CompressionError(f"{key}: scales {scale.dtype} {tuple(scale.shape)} instead of float32 ({channels},)")
        rows = _rows(values.float()) * scale.unsqueeze(1)
        update[key] = rows.reshape(shape)
    return update


def compress_update(local: Tensors, received: Tensors, residual: Optional[Tensors], codec: str,
                    generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(payload, new residual): the update local - received, plus the residual, encoded; what was not sent is kept."""
    corrected = {}
    for key, value in local.items():
        delta = value.detach().cpu().float() - received[key].detach().cpu().float()
        corrected[key] = delta + residual[key] if residual else delta
    payload = encode(corrected, codec, generator)
    sent = decode(payload, codec, {key: tuple(value.shape) for key, value in corrected.items()})
    return payload, {key: corrected[key] - sent[key] for key in corrected}


def apply_update(global_weights: Mapping[str, np.ndarray], payload: Mapping[str, torch.Tensor | np.ndarray],
                 codec: str) -> dict[str, np.ndarray]:
    """The server's side: the global weights it sent plus the decoded update, float32."""
    update = decode(payload, codec, {key: tuple(value.shape) for key, value in global_weights.items()})
    return {key: np.asarray(global_weights[key], dtype=np.float32) + update[key].numpy() for key in global_weights}
