"""What the checkpoint arms (federated, pooled, local) share: a pretraining run's encoder, named by its own record.

The option a checkpoint is passed in gives the arm its letter; what the checkpoint records it is
(`server/evaluation/provenance.py`) gives its words: "A: pooled VAE encoder (2 epochs, DP-SGD
off)" for a pooled run passed as `--checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from server.evaluation.arms.registry import Arm


def checkpoint_arm(key: str, letter: str, expected_kind: str, path: str | Path, cache_dir: Optional[str] = None) -> Arm:
    """A pretraining run's encoder, labelled by its slot's letter and what the checkpoint records it is; its pretraining
    images checked against its own config's data where that is on this machine (`leakage.pretraining_images`).
    `key` and `letter` are the built arm's (`EvaluationArm.key`/`tag`: `federated-2` and `A2` for a second input)."""
    from common.checkpoint import frozen_encoder, load_checkpoint
    from server.evaluation.leakage import pretraining_images
    from server.evaluation.provenance import checkpoint_provenance

    payload = load_checkpoint(path)  # read once: federated checkpoints are large
    provenance = checkpoint_provenance(payload)
    if provenance.kind != expected_kind:
        print(f"note: the {key} slot holds a {provenance.kind} checkpoint ({path}); it is labelled as what it is", flush=True)
    if provenance.claimed:
        print(f"note: checkpoint {path} calls itself {provenance.claimed!r} but its position {payload['position']} is a "
              f"{provenance.kind} run's; it is labelled by its position", flush=True)
    return Arm(key, f"{letter}: {provenance.describe()}", frozen_encoder(payload),
               f"{payload['encoder_name']} from {Path(path)} ({payload['position']})",
               pretraining_images(payload, cache_dir, str(path)), provenance.as_dict())
