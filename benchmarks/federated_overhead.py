"""What Flower's simulation engine costs over the same training in one plain loop.

    .venv/bin/python benchmarks/federated_overhead.py [--config demo] [--rounds 3] [--repeats 3] [key=value ...]

Measured in one run, on the same data, model, seeds and local steps:
(a) `dermfed simulate`: a local SuperLink, N virtual hospitals in Ray, N rounds, checkpoints;
(b) a plain loop: the same SiteRunners trained one after the other in this process (each
    writing its snapshot per round, as a hospital does), with FedAvg done in NumPy.
The two are interleaved and repeated (`benchmarks/interleave.py`); it prints the median ratio
(a)/(b) with its lowest and highest value, where the simulation's time goes (outside the
rounds: processes, imports, Ray, SuperLink; each round as the server saw it; the sites'
own training), that both end with the same global weights, and the bytes each client uploads
per round.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common.checkpoint import load_checkpoint
from common.config import load_config
from common.data.pipeline import ensure_data
from in_process import fedavg, hospital_count, site_runners  # benchmarks/, this script's folder
from interleave import interleaved, ratios, summary
from server.federation import initial_shared_weights
from simulations.runner import run_simulation


class PlainLoop:
    """The same local steps in this process; keeps what the last run measured."""

    def __init__(self, config, workdir: Path):
        self.config, self.workdir, self.runs = config, workdir, 0
        self.weights: dict[str, torch.Tensor] = {}
        self.upload = 0
        self.training: list[float] = []

    def __call__(self) -> float:
        config = self.config
        self.runs += 1
        folder = self.workdir / f"loop{self.runs}"
        count = hospital_count(config)
        started = time.perf_counter()
        runners = site_runners(config, count, folder)
        weights = initial_shared_weights(config)
        training = 0.0
        for round_number in range(1, config.federation.num_rounds + 1):
            outputs = [runner.train_round(round_number, weights) for runner in runners]
            training += sum(o.metrics["seconds"] for o in outputs)
            weights = fedavg(outputs, [o.shared for o in outputs])
        seconds = time.perf_counter() - started
        self.weights, self.training = weights, self.training + [training]
        self.upload = sum(v.numel() * v.element_size() for v in outputs[0].shared.values())
        shutil.rmtree(folder, ignore_errors=True)
        return seconds


class Simulation:
    """`dermfed simulate`'s own entry point; keeps each run's history (round and site seconds)."""

    def __init__(self, config, workdir: Path):
        self.config, self.workdir, self.runs = config, workdir, 0
        self.histories: list[list[dict]] = []
        self.final: dict[str, torch.Tensor] = {}

    def __call__(self) -> float:
        self.runs += 1
        started = time.perf_counter()
        run_dir = run_simulation(self.config, self.workdir / f"simulation{self.runs}")
        seconds = time.perf_counter() - started
        self.histories.append(json.loads((run_dir / "history.json").read_text()))
        self.final = load_checkpoint(run_dir)["extra"]["shared"]
        shutil.rmtree(run_dir, ignore_errors=True)
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant, interleaved")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="dermfed-fedbench-"))
    config = load_config(args.config, [f"federation.num_rounds={args.rounds}", f"data.root={workdir / 'data'}",
                                       f"data.cache_dir={workdir / 'cache'}", "train.progress=false", *args.overrides])
    ensure_data(config)  # data generation and the cache are not part of either timing
    simulation, loop = Simulation(config, workdir), PlainLoop(config, workdir)
    seconds = interleaved({"simulation": simulation, "plain loop": loop}, args.repeats,
                          progress=lambda text: print(f"[benchmark] {text} s", flush=True))
    same = all(torch.allclose(simulation.final[k], loop.weights[k].to(simulation.final[k].dtype), atol=1e-5)
               for k in simulation.final)
    rounds = [[entry["seconds"] for entry in history] for history in simulation.histories]
    site_training = [sum(site["seconds"] for entry in history for site in entry["sites"]) for history in simulation.histories]
    outside = [total - sum(r) for total, r in zip(seconds["simulation"], rounds)]
    hospitals = len(simulation.histories[0][0]["sites"])
    print(f"\n{config.model.encoder} at {config.data.image_size}px, {args.rounds} rounds, {hospitals} hospitals, "
          f"share={config.federation.share}, compression={config.federation.compression}")
    print(f"seconds, median [lowest, highest] of {args.repeats} interleaved runs of each:")
    lines = [("simulation (flwr run, local SuperLink, Ray)", seconds["simulation"]),
             ("  outside the rounds (processes, imports, Ray)", outside),
             *[(f"  round {n + 1}, as the server saw it", [r[n] for r in rounds]) for n in range(args.rounds)],
             ("  the sites' own training, summed over sites", site_training),
             ("plain loop, same steps", seconds["plain loop"]),
             ("  the sites' own training, summed over sites", loop.training)]
    for label, values in lines:
        print(f"{label:<50}{summary(values, 1):>22}")
    print(f"{'simulation / plain loop (per run pair)':<50}{summary(ratios(seconds['simulation'], seconds['plain loop'])):>22}")
    print(f"upload per client per round: {loop.upload:,} bytes ({loop.upload / 2**20:.1f} MiB, {len(simulation.final)} tensors)")
    print(f"final weights equal (atol 1e-5): {same}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
