"""Planning a federated run: where it starts (seed, checkpoint or resume point) and with what.

Plain Python: the ServerApp adapter turns this plan into Flower calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from common.checkpoint import CheckpointError, load_checkpoint
from common.config import DermFedConfig
from common.data.pipeline import PreparedData
from common.model import ENCODER_PREFIX, build_model, shared_state
from common.pretraining import pretraining_record, warm_start_stage, with_warm_start
from common.run_folder import SIMULATE, RunFolderError, check_resume, completed_rounds_or_none, refusal, run_kind
from common.training import seed_everything
from server.rounds import load_resume_point

log = logging.getLogger("dermfed.server")


class ResumeError(RuntimeError):
    """The run folder cannot be resumed as asked."""


@dataclass
class RunPlan:
    config: DermFedConfig
    run_dir: Path
    round_offset: int  # rounds already completed
    remaining: int
    initial_shared: dict[str, torch.Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)
    strategy_state: dict[str, Any] = field(default_factory=dict)
    resumed_images: Optional[dict[str, Any]] = None  # a resumed run: its checkpoint's record of pretraining images
    resumed: bool = False

    @property
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.initial_shared.items()}


def initial_shared_weights(config: DermFedConfig) -> dict[str, torch.Tensor]:
    """Round-0 global weights: seeded random init, or `federation.initial_checkpoint`."""
    seed_everything(config.seed, 40_000)
    model = build_model(config.model, config.data.image_size)
    shared = shared_state(model, config.federation.share)
    if config.federation.initial_checkpoint:
        payload = load_checkpoint(config.federation.initial_checkpoint)
        objective = (payload.get("config") or {}).get("model", {}).get("objective", "vae")  # before objectives: vae
        if payload["vae"] and objective != config.model.objective and config.federation.share == "all":
            raise ResumeError(f"federation.initial_checkpoint was trained with model.objective={objective}, but this run "
                              f"shares the whole model of model.objective={config.model.objective}")
        if payload["encoder_name"] != config.model.encoder:
            raise ResumeError(f"federation.initial_checkpoint holds {payload['encoder_name']}, "
                              f"but model.encoder={config.model.encoder}")
        source = payload["vae"] or {ENCODER_PREFIX + k: v for k, v in payload["encoder"].items()}
        missing = set(shared) - set(source)
        if missing:
            raise ResumeError(f"federation.initial_checkpoint lacks {len(missing)} shared weights "
                              f"(e.g. {sorted(missing)[:2]}); share=all needs a checkpoint of the whole model")
        shared = {k: source[k].clone() for k in shared}
    return shared


def plan_run(config: DermFedConfig, run_dir: Path, resume: bool, by: Optional[str] = None) -> RunPlan:
    """Where the run starts. A new run never starts over a folder holding a completed round or another kind's run
    (a `flwr run` without `dermfed` in front: nothing else checked the folder); a folder `dermfed simulate` prepared
    for it holds no round yet. `by`: DEPLOYMENT for a real federation's ServerApp, which never continues a simulation's
    run (`check_resume`), however it was submitted."""
    total = config.federation.num_rounds
    if not resume:
        found = run_kind(run_dir)
        if found is not None and (found[0] != SIMULATE or completed_rounds_or_none(run_dir) != 0):
            raise ResumeError(refusal(run_dir, SIMULATE, option="run-dir", remedy="give another run-dir"))
        return RunPlan(config, run_dir, 0, total, initial_shared_weights(config))
    try:  # the same check `dermfed simulate --resume` and `dermfed deploy run` made before starting anything
        check_resume(run_dir, config, option="resume", by=by)
    except RunFolderError as exc:
        raise ResumeError(str(exc)) from None
    point = load_resume_point(run_dir)
    done = point["round"]
    log.info("resuming %s after round %d of %d", run_dir, done, total)
    return RunPlan(config, run_dir, done, total - done, dict(point["shared"]), point["history"], point["strategy"],
                   point["pretraining_images"], resumed=True)


def federated_pretraining_images(config: DermFedConfig, prepared: Optional[PreparedData]) -> dict[str, Any]:
    """Which images the sites pretrain on, for evaluation's leak check, and what a warm start brings with it.

    In a simulation the server holds the pooled data (`prepared`) the virtual hospitals are cut
    from: every row of `data.pretrain_splits`, whatever the partition. In a real federation
    (`prepared` is None) the hospitals' images are theirs and their names never reach the
    coordinator: recorded as unknown. A run started from `federation.initial_checkpoint` has seen,
    through its weights, whatever that checkpoint saw: the record is the union of both (unknown if
    the warm start's is), and names the warm start, so evaluation labels and checks it as such.
    """
    if prepared is None:
        record: dict[str, Any] = {"unknown": "a real federation: the hospitals' images are not known to the coordinator"}
    else:
        record = pretraining_record(prepared, config.data.pretrain_splits, config.data.cache_dir)
    if not config.federation.initial_checkpoint:
        return record
    try:
        stage = warm_start_stage(config.federation.initial_checkpoint)
    except (OSError, CheckpointError) as exc:  # a resumed run whose warm start has gone since: unknown, never none
        return {"unknown": f"warm-started from {config.federation.initial_checkpoint}, which cannot be read now "
                           f"({type(exc).__name__}: {exc})", "warm_start": {"checkpoint": config.federation.initial_checkpoint}}
    return with_warm_start(record, stage)


def check_federation_size(config: DermFedConfig, prepared: PreparedData, supernodes: int) -> list[str]:
    """A simulation runs one SuperNode per hospital of its pooled data: refuse any other number before round 1,
    with the command that fixes it (a bare `flwr run` gets the SuperNodes of Flower's federation, 2 by default).
    Returns the hospitals' names, in partition order."""
    from common.config import ConfigError
    from common.data.partition import partition_catalog

    parts, names = partition_catalog(prepared.catalog, config.data.partition, config.data.num_partitions,
                                     config.data.dirichlet_alpha, config.seed)
    if supernodes != len(parts):
        raise ConfigError(f"this run's config makes {len(parts)} hospitals ({', '.join(names)}) but Flower's federation "
                          f"simulates {supernodes} SuperNodes: run `flwr run . --stream --federation-config "
                          f"\"num-supernodes={len(parts)}\"` (or `dermfed simulate`, which sets it itself)")
    return names
