"""What Flower's simulation engine costs over the same training in one plain loop.

    .venv/bin/python benchmarks/federated_overhead.py [--config demo] [--rounds 3] [key=value ...]

Measured in one run, on the same data, model, seeds and local steps:
(a) `dermfed simulate`: a local SuperLink, N virtual hospitals in Ray, N rounds, checkpoints;
(b) a plain loop: the same SiteRunners trained one after the other in this process, with
    FedAvg done in NumPy.
It prints (a)/(b) and the bytes each client uploads per round (the shared tensors; the
scalar metrics add about a hundred bytes).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from client.site import SiteRunner, simulation_site_data
from common.checkpoint import load_checkpoint
from common.config import load_config
from common.data.partition import partition_catalog
from common.data.pipeline import ensure_data, prepare_data
from server.federation import initial_shared_weights
from simulations.runner import run_simulation


def plain_loop(config, workdir: Path) -> tuple[float, dict[str, torch.Tensor], int]:
    prepared = prepare_data(config)
    parts, _ = partition_catalog(prepared.catalog, config.data.partition, config.data.num_partitions,
                                 config.data.dirichlet_alpha, config.seed)
    started = time.perf_counter()
    runners = [SiteRunner(config, simulation_site_data(config, i, len(parts)), workdir / f"site{i}") for i in range(len(parts))]
    weights = initial_shared_weights(config)
    for round_number in range(1, config.federation.num_rounds + 1):
        outputs = [runner.train_round(round_number, weights) for runner in runners]
        total = sum(o.metrics["num-examples"] for o in outputs)
        weights = {k: sum(o.shared[k] * (o.metrics["num-examples"] / total) for o in outputs) for k in weights}
    upload = sum(v.numel() * v.element_size() for v in outputs[0].shared.values())
    return time.perf_counter() - started, weights, upload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="dermfed-fedbench-"))
    config = load_config(args.config, [f"federation.num_rounds={args.rounds}", f"data.root={workdir / 'data'}",
                                       f"data.cache_dir={workdir / 'cache'}", "train.progress=false", *args.overrides])
    ensure_data(config)  # data generation and the cache are not part of either timing
    started = time.perf_counter()
    run_dir = run_simulation(config, workdir / "simulation")
    simulated = time.perf_counter() - started
    loop_seconds, loop_weights, upload = plain_loop(config, workdir / "loop")
    final = load_checkpoint(run_dir)["extra"]["shared"]
    same = all(torch.allclose(final[k], loop_weights[k].to(final[k].device, final[k].dtype), atol=1e-5) for k in final)
    shared_keys = len(final)
    print(f"\n{config.model.encoder} at {config.data.image_size}px, {args.rounds} rounds, "
          f"{len(load_checkpoint(run_dir)['history'][0]['sites'])} hospitals, share={config.federation.share}")
    print(f"simulation (flwr run, local SuperLink, Ray): {simulated:8.1f} s")
    print(f"plain loop, same steps:                      {loop_seconds:8.1f} s")
    print(f"simulation / plain loop:                     {simulated / loop_seconds:8.2f}")
    print(f"upload per client per round: {upload:,} bytes ({upload / 2**20:.1f} MiB, {shared_keys} tensors)")
    print(f"final weights equal (atol 1e-5): {same}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
