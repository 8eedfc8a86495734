"""The Flower ServerApp: a thin adapter from Flower's grid to DermFed's plan, strategy and records.

Run config (pyproject `[tool.flwr.app.config]`; keys in `common.flower_keys`, built by
`common.config.transport.flower_run_config` for `dermfed simulate` and `dermfed deploy sign`):
the DermFed config comes from `run-manifest` (a real federation: the operator's signed manifest,
which the hospitals check), else `dermfed-config` (the resolved config as JSON: a simulation),
else `config-preset` (YAML path or preset name) with `config-overrides` (space-separated
key=value); every site reads it from the same run config, once per run, never from a round's
message. `run-manifest-signature` goes with the manifest. `run-dir` (where checkpoints and
history go; default output_dir/federated-<run id>), `resume` (continue run-dir from its last
completed round), `site-names` (comma-separated, partition order, for readable histories),
`stop-after-round` (0: run all rounds), `site-registry` (a real federation: the node-key
registry of `dermfed deploy register`, which names every site by its key and holds the key each
reply must be signed with), `fault-injection` (simulations only; tests).
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common import flower_keys as keys
from common.console_logging import one_line_per_event
from common.config import ConfigPerRun, DermFedConfig
from common.data.pipeline import ensure_data, prepare_data
from common.pretraining import continued_record
from common.run_folder import DEPLOYMENT, STATUS_NAME, RunFolderError, lock_unless_an_ancestor_holds
from server.deploy.registry import SiteRegistry
from server.federation import ResumeError, check_federation_size, federated_pretraining_images, plan_run
from server.monitor import Monitor
from server.rounds import RoundFailed, RunRecorder, owner_only_folder, write_run_status
from server.strategy import build_strategy

log = logging.getLogger("dermfed.server")

one_line_per_event()  # Flower prints its own log lines: no second copy through Opacus's root handler
app = ServerApp()
config_of = ConfigPerRun()  # the run's DermFed config, parsed once per run


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    config = config_of(context.run_id, run_config)
    run_dir = Path(str(run_config.get(keys.RUN_DIR, "")) or Path(config.output_dir) / f"federated-{context.run_id}")
    registry_path = str(run_config.get(keys.SITE_REGISTRY, ""))
    try:  # a real federation: this process is the run, and holds its folder until it ends; a simulation: the
        # `dermfed simulate` that started it (an ancestor) holds it, else (a bare `flwr run`) this process does
        lock = lock_unless_an_ancestor_holds(owner_only_folder(run_dir), "a deployed run's ServerApp" if registry_path
                                             else "a `flwr run` ServerApp")
    except RunFolderError as exc:
        print(f"federated pretraining REFUSED: {exc} (nothing was written there; `flwr run` exits 0 all the same)",
              flush=True)
        raise
    try:
        _federate(grid, context, config, run_dir, registry_path)
    finally:
        if lock is not None:
            lock.release()


def _federate(grid: Grid, context: Context, config: DermFedConfig, run_dir: Path, registry_path: str) -> None:
    run_config = context.run_config
    try:
        plan = plan_run(config, run_dir, bool(run_config.get(keys.RESUME, False)), DEPLOYMENT if registry_path else None)
        registry = SiteRegistry.load(registry_path) if registry_path else None
        if registry is None:  # a simulation's pooled data: the server holds it (`dermfed simulate` made it already)
            ensure_data(config)
            prepared = prepare_data(config)
            # a simulation's virtual hospitals are as many as Flower's federation config says: checked before round 1
            # (a signed run without a registry goes to real hospitals, which refuse it themselves)
            hospitals = [] if run_config.get(keys.RUN_MANIFEST) else \
                check_federation_size(config, prepared, len(list(grid.get_node_ids())))
        else:
            prepared, hospitals = None, []
    except ResumeError as exc:  # the folder was refused as it is: nothing is written into it, not even a status
        print(f"federated pretraining REFUSED: {exc} (the run's files in {run_dir.resolve()} are untouched; `flwr "
              "run` exits 0 all the same)", flush=True)
        raise
    except Exception as exc:
        write_run_status(run_dir, "failed", 0, f"{type(exc).__name__}: {exc}")
        _say_failed(run_dir, 0, exc)
        raise
    stop_after = int(run_config.get(keys.STOP_AFTER_ROUND, 0))  # an interruption on purpose (tests, staged runs)
    rounds = min(plan.remaining, stop_after - plan.round_offset) if stop_after else plan.remaining
    images = federated_pretraining_images(config, prepared)
    if plan.resumed:  # what the earlier rounds saw stays recorded, whoever continues the run (never unknown -> a list)
        images = continued_record(plan.resumed_images, images)
    recorder = RunRecorder(run_dir, config, plan.history, images)
    names = [n for n in str(run_config.get(keys.SITE_NAMES, "")).split(",") if n] or hospitals  # bare `flwr run`
    strategy = build_strategy(config)
    strategy.attach(recorder, plan.expected_shapes, config.federation.min_clients, plan.round_offset,
                    dict(enumerate(names)), registry)
    strategy.import_state(plan.strategy_state)
    monitor = Monitor(config, prepared)

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower calls this before round 1 and after every round: monitor, then checkpoint."""
        shared = arrays.to_torch_state_dict()
        metrics = monitor(shared)
        real_round = plan.round_offset + server_round
        if server_round > 0:
            recorder.record(real_round).monitor = metrics
            recorder.finish(real_round, shared, strategy.export_state())
        return MetricRecord(metrics) if metrics else None

    recorder.write_status("running")
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(plan.initial_shared),
            num_rounds=rounds,
            timeout=config.federation.round_timeout,
            train_config=ConfigRecord(),  # the sites have the run's config from the run config: nothing per round
            evaluate_config=ConfigRecord(),
            evaluate_fn=after_round,
        )
    except Exception as exc:
        # A round without enough valid updates can be repeated once the sites are fixed, and a checkpoint that
        # could not be written (a full disk: the previous one is intact) once there is room; other failures cannot.
        recorder.write_status("failed", f"{type(exc).__name__}: {exc}",
                              resumable=isinstance(exc, (RoundFailed, OSError)))
        _say_failed(run_dir, recorder.completed_round(), exc)
        raise
    finished = plan.round_offset + rounds >= config.federation.num_rounds
    recorder.write_status("finished" if finished else "stopped")
    print(f"federated pretraining {'finished' if finished else 'stopped as asked'} after round "
          f"{plan.round_offset + rounds}: checkpoint {run_dir.resolve() / 'checkpoint.pt'}, history "
          f"{run_dir.resolve() / 'history.json'}", flush=True)


def _say_failed(run_dir: Path, completed: int, exc: Exception) -> None:
    """One line a person sees in `flwr run --stream`, which exits 0 whatever becomes of the run (flwr 1.42)."""
    print(f"federated pretraining FAILED after {completed} completed round(s): {type(exc).__name__}: {exc} "
          f"(recorded in {run_dir.resolve() / STATUS_NAME}; `flwr run` exits 0 all the same)", flush=True)
