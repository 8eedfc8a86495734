"""The Flower ServerApp: a thin adapter from Flower's grid to DermFed's plan, strategy and records.

Run config (pyproject `[tool.flwr.app.config]`, set by `dermfed simulate` or `flwr run --run-config`):
`config-preset` (YAML path or preset name), `config-overrides` (space-separated key=value),
`run-dir` (where checkpoints and history go; default output_dir/federated-<run id>),
`resume` (continue run-dir from its last completed round), `site-names` (comma-separated,
partition order, for readable histories), `stop-after-round` (0: run all rounds),
`site-registry` (a real federation: the node-key registry of `dermfed deploy register`, which
names every site by its key and holds the key each reply must be signed with),
`run-manifest` / `run-manifest-signature` (a real federation: the operator's signed manifest;
the hospitals check it, and the DermFed config sent to them is the manifest's, not one read
here), `fault-injection` (simulations only; tests).
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common.config import build_config, config_to_json, load_config
from common.data.pipeline import prepare_data
from common.run_manifest import MANIFEST_KEY, RunManifest
from server.deploy.registry import SiteRegistry
from server.federation import federated_pretraining_images, plan_run
from server.monitor import Monitor
from server.rounds import RoundFailed, RunRecorder, write_run_status
from server.strategy import build_strategy

log = logging.getLogger("dermfed.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    if str(run_config.get(MANIFEST_KEY, "")):  # exactly the config the operator signed and the hospitals check
        config = build_config(RunManifest.decode(str(run_config[MANIFEST_KEY])).dermfed_config)
    else:
        config = load_config(str(run_config["config-preset"]), shlex.split(str(run_config.get("config-overrides", ""))))
    run_dir = Path(str(run_config.get("run-dir", "")) or Path(config.output_dir) / f"federated-{context.run_id}")
    try:
        plan = plan_run(config, run_dir, bool(run_config.get("resume", False)))
    except Exception as exc:
        write_run_status(run_dir, "failed", 0, f"{type(exc).__name__}: {exc}")
        raise
    registry_path = str(run_config.get("site-registry", ""))
    registry = SiteRegistry.load(registry_path) if registry_path else None
    stop_after = int(run_config.get("stop-after-round", 0))  # an interruption on purpose (tests, staged runs)
    rounds = min(plan.remaining, stop_after - plan.round_offset) if stop_after else plan.remaining
    prepared = None if registry else prepare_data(config)  # a simulation's pooled data: the server holds it
    recorder = RunRecorder(run_dir, config, plan.history, federated_pretraining_images(config, prepared))
    names = [n for n in str(run_config.get("site-names", "")).split(",") if n]
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

    config_json = config_to_json(config)  # every site builds the same model and training from it
    recorder.write_status("running")
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(plan.initial_shared),
            num_rounds=rounds,
            timeout=config.federation.round_timeout,
            train_config=ConfigRecord({"dermfed-config": config_json}),
            evaluate_config=ConfigRecord({"dermfed-config": config_json}),
            evaluate_fn=after_round,
        )
    except Exception as exc:
        # A round without enough valid updates can be repeated once the sites are fixed, and a checkpoint that
        # could not be written (a full disk: the previous one is intact) once there is room; other failures cannot.
        recorder.write_status("failed", f"{type(exc).__name__}: {exc}",
                              resumable=isinstance(exc, (RoundFailed, OSError)))
        raise
    finished = plan.round_offset + rounds >= config.federation.num_rounds
    recorder.write_status("finished" if finished else "stopped")
    print(f"federated pretraining {'finished' if finished else 'stopped as asked'} after round "
          f"{plan.round_offset + rounds}: checkpoint {run_dir / 'checkpoint.pt'}, history {run_dir / 'history.json'}",
          flush=True)
