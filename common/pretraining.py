"""Centralised pretraining: all sites pooled (the "pooled" arm) or one site (the "local-only" arm).

The same LocalTrainer that a hospital runs in a federated round, on one data set, with a
checkpoint after every epoch and a grid of what the objective learned (`Objective.preview`: for the VAE,
inputs above their reconstructions).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torchvision.utils import save_image

from common.checkpoint import load_checkpoint, save_model_checkpoint
from common.config import DermFedConfig, write_config
from common.data.batches import ImageRows, read_batch, to_device_float
from common.data.catalog import DataError
from common.data.identity import (
    CONTENT_RULE,
    IDENTITY_RULE,
    file_sha256,
    group_identities,
    has_group_ids,
    image_identities,
    with_content,
)
from common.data.pipeline import PreparedData, ensure_data, prepare_data
from common.model import build_model
from common.objectives import Objective
from common.run_files import atomic_write_bytes, atomic_write_text
from common.run_folder import CHECKPOINT_NAME, HISTORY_NAME, PREVIOUS_NAME, SUMMARY_NAME
from common.training import EpochMetrics, LocalTrainer, SiteState, seed_everything

log = logging.getLogger("dermfed.pretrain")


def pretraining_indices(prepared: PreparedData, splits: list[str]) -> np.ndarray:
    """Rows pretraining may see: the configured splits, never the labels."""
    return np.flatnonzero(prepared.catalog.frame["split"].isin(splits).to_numpy())


def pretraining_record(prepared: PreparedData, splits: list[str], cache_dir: Optional[str] = None) -> dict[str, Any]:
    """Which images (and lesions or patients) a pretraining run saw, by normalised name and by content
    (`common.data.identity`): stored in its checkpoint, so that evaluation can refuse an arm that saw one of its
    validation or test images, a copy of one under another name, or another image of a test lesion, whatever format
    reads them. `groups` is None where the data set has no lesion or patient ids (not recorded, rather than none)."""
    frame = with_content(prepared.catalog.frame.iloc[pretraining_indices(prepared, splits)], cache_dir)
    groups = sorted(set(group_identities(frame).dropna())) if has_group_ids(prepared.catalog.frame) else None
    return {"identity": IDENTITY_RULE, "content": CONTENT_RULE, "image_ids": sorted(set(image_identities(frame))),
            "groups": groups, "sha256": sorted(set(frame["sha256"])), "phash": sorted(set(frame["phash"].dropna()))}


STAGE_KEYS = ("arm", "site", "objective", "pretraining_images")  # what a warm start passes on (never weights)


def warm_start_stage(path: str | Path) -> dict[str, Any]:
    """What a run started from the checkpoint at `path` inherits besides its weights: that checkpoint's config,
    position, history and pretraining record (itself composed if it was warm-started too), and the file's SHA-256."""
    path = Path(path)
    file = path / CHECKPOINT_NAME if path.is_dir() else path
    payload = load_checkpoint(file)
    extra = payload.get("extra") or {}
    return {"checkpoint": str(file.resolve()), "sha256": file_sha256(file), "encoder_name": payload["encoder_name"],
            "config": payload["config"], "position": payload["position"], "history": payload.get("history") or [],
            "extra": {k: extra[k] for k in STAGE_KEYS if k in extra}}


def _union(first: Optional[list], second: Optional[list]) -> Optional[list]:
    return None if first is None or second is None else sorted(set(first) | set(second))


def with_warm_start(record: dict[str, Any], stage: dict[str, Any]) -> dict[str, Any]:
    """A run started from another checkpoint's weights has, through them, seen what that checkpoint saw: its record
    is the union of its own images and the warm start's (unknown when either is), and names the warm start."""
    inherited = stage["extra"].get("pretraining_images")
    if not isinstance(inherited, dict) or "image_ids" not in inherited:
        why = inherited.get("unknown") if isinstance(inherited, dict) and "unknown" in inherited else "not recorded"
        return {"unknown": f"warm-started from {stage['checkpoint']}, whose pretraining images are unknown ({why})",
                "warm_start": stage}
    if "unknown" in record:
        return {**record, "warm_start": stage}
    return {"identity": IDENTITY_RULE, "content": CONTENT_RULE,
            **{key: _union(record.get(key), inherited.get(key)) for key in ("image_ids", "groups", "sha256", "phash")},
            "warm_start": stage}


def continued_record(earlier: Optional[dict[str, Any]], record: dict[str, Any]) -> dict[str, Any]:
    """The record of a resumed run: it has seen what its earlier rounds saw and what it sees now, so the union of the
    two (unknown when either is, or when the earlier checkpoint recorded nothing). A run continued by other hospitals
    (a bare `flwr run` simulation resuming a real federation's folder) never trades "unknown" for a list."""
    for part, why in ((earlier, "its earlier rounds"), (record, "the resumed rounds")):
        if not isinstance(part, dict) or "image_ids" not in part:
            reason = part.get("unknown") if isinstance(part, dict) and "unknown" in part else "not recorded"
            return {"unknown": f"a resumed run whose {why} saw images not known here ({reason})",
                    **({"warm_start": record["warm_start"]} if "warm_start" in record else {})}
    return {**record, **{key: _union(earlier.get(key), record.get(key)) for key in ("image_ids", "groups", "sha256", "phash")}}


@torch.no_grad()
def save_reconstruction_grid(model: Objective, images: torch.Tensor, path: Path) -> Path:
    """One row per image row of the objective's preview (top row: the inputs)."""
    rows = model.preview(images)
    png = io.BytesIO()
    save_image(torch.cat([row.cpu() for row in rows]), png, format="png", nrow=len(images), padding=2, pad_value=1.0)
    return atomic_write_bytes(path, png.getvalue())


def run_pretraining(config: DermFedConfig, out: Path) -> dict[str, Any]:
    """Train on the configured data (pooled, or `data.site` only); write checkpoint, history, grid."""
    ensure_data(config)  # the synthetic data if absent, the cache: written here, explicitly, never by reading
    prepared = prepare_data(config)
    indices = pretraining_indices(prepared, config.data.pretrain_splits)
    if len(indices) == 0:
        sizes = prepared.catalog.frame["split"].value_counts().to_dict()
        raise DataError(f"data.pretrain_splits={config.data.pretrain_splits} selects no image: the split sizes are "
                        f"{sizes} (data.val_fraction={config.data.val_fraction}, data.test_fraction="
                        f"{config.data.test_fraction}); choose splits that hold images")
    out.mkdir(parents=True, exist_ok=True)
    write_config(config, out)
    seed_everything(config.seed, 10_000)
    model = build_model(config.model, config.data.image_size)
    images = ImageRows(prepared.store, indices)
    site = config.data.site or "pooled"
    trainer = LocalTrainer(config, model, images, site=site)
    seen = pretraining_record(prepared, config.data.pretrain_splits, config.data.cache_dir)
    history: list[dict[str, Any]] = []
    arm = "local-only" if config.data.site else "pooled"
    log.info("%s pretraining on %d images (%s), %d steps per epoch, %d epochs", arm, len(images),
             ", ".join(prepared.catalog.sites), trainer.steps_per_epoch, config.train.epochs)

    def checkpoint(metrics: EpochMetrics, state: SiteState) -> None:
        history.append(metrics.as_dict())
        eps = f", epsilon {metrics.epsilon:.2f}" if metrics.epsilon is not None else ""
        losses = ", ".join(f"{key} {metrics.losses[key]:.2f}" for key in model.terms)
        print(f"epoch {metrics.epoch}: {losses}, {metrics.images_per_second:.1f} img/s{eps}", flush=True)
        save_model_checkpoint(out / CHECKPOINT_NAME, model, config, {"epoch": metrics.epoch, "step": state.step},
                            history, extra={"arm": arm, "site": site, "images": len(images), "pretraining_images": seen},
                            previous=out / PREVIOUS_NAME)  # checkpoint first: history.json never claims a lost epoch
        atomic_write_text(out / HISTORY_NAME, json.dumps(history, indent=2))

    result = trainer.train(SiteState(), on_epoch_end=checkpoint)
    sample = to_device_float(read_batch(prepared.store, indices[:8]), torch.device("cpu"))  # as they are: no augmentation
    grid = save_reconstruction_grid(model, sample, out / "reconstructions.png")
    summary = {"run": str(out), "arm": arm, "site": site, "images": len(images), "steps": result.steps,
               "final": history[-1] if history else None, "grid": str(grid)}
    if result.privacy is not None:
        summary["privacy"] = {"epsilon": result.privacy.epsilon, "delta": result.privacy.delta,
                              "noise_multiplier": result.privacy.noise_multiplier}
    atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2))
    return summary
