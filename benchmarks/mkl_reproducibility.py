"""What MKL's strict reproducibility mode (`MKL_CBWR=AUTO,STRICT`, set by `common/__init__.py`) buys and costs.

    .venv/bin/python benchmarks/mkl_reproducibility.py [--steps 8] [--repeats 6]

Each variant runs in its own process (MKL reads the variable at its first computation):
(a) MKL's default (the variable removed before anything computes), (b) AUTO,STRICT. For each it
prints (1) whether `--repeats` identical training calls of a site whose last batch holds one image
(what made tests/test_client.py's restarted site differ from a steady one on a busy machine) give
bit-identical weights, and (2) CPU training throughput of the demo model (ConvNeXt-Tiny VAE, 64 px,
batch 16), images/s over `--steps` timed steps after 2 warm-up steps. Run it beside CPU-bound work
to see (1) fail without the mode: on an idle machine MKL's threads happen to agree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def measure(steps: int, repeats: int) -> dict:
    import common  # noqa: F401 - sets MKL_CBWR unless the environment did
    if os.environ.get("DERMFED_BENCH_MKL_DEFAULT"):
        del os.environ["MKL_CBWR"]  # before MKL's first computation: MKL's own default
    import numpy as np
    import torch

    from common.config import load_config
    from common.data.batches import ImageRows
    from common.data.stores import MemmapStore
    from common.model import build_model
    from common.training import LocalTrainer, SiteState, seed_everything

    def trained(config, images) -> dict:
        seed_everything(0, 1)
        model = build_model(config.model, config.data.image_size)
        LocalTrainer(config, model, images).train(SiteState())
        return {k: v.clone() for k, v in model.state_dict().items()}

    small = load_config("smoke", ["train.max_steps=null", "train.epochs=1"])
    pixels = np.random.default_rng(1).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)  # batches of 8 and 1
    images = ImageRows(MemmapStore(pixels), np.arange(9))
    first = trained(small, images)
    identical = sum(all(torch.equal(first[k], again[k]) for k in first)
                    for again in (trained(small, images) for _ in range(repeats - 1)))

    def demo(max_steps: int):
        return load_config("demo", ["data.image_size=64", "train.batch_size=16", "train.progress=false",
                                    f"train.max_steps={max_steps}"])

    pixels = np.random.default_rng(2).integers(0, 256, (16 * steps, 64, 64, 3), dtype=np.uint8)
    images = ImageRows(MemmapStore(pixels), np.arange(len(pixels)))
    model = build_model(demo(2).model, 64)
    LocalTrainer(demo(2), model, images).train(SiteState())  # warm-up
    timed = LocalTrainer(demo(steps), model, images)
    started = time.perf_counter()
    timed.train(SiteState())
    seconds = time.perf_counter() - started
    return {"mkl_cbwr": os.environ.get("MKL_CBWR", "(unset: MKL's default)"), "threads": torch.get_num_threads(),
            "identical": f"{identical + 1}/{repeats}", "images_per_s": 16 * steps / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.steps, args.repeats)))
        return
    rows = []
    for default in (True, False):
        env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
        env.update({"DERMFED_BENCH_MKL_DEFAULT": "1"} if default else {"MKL_CBWR": "AUTO,STRICT"})
        env["TQDM_DISABLE"] = "1"
        done = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps), "--repeats",
                               str(args.repeats)], env=env, cwd=PROJECT, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{'MKL_CBWR':<24} {'threads':>7} {'bit-identical runs':>19} {'demo img/s':>11}")
    for row in rows:
        print(f"{row['mkl_cbwr']:<24} {row['threads']:>7} {row['identical']:>19} {row['images_per_s']:>11.2f}")
    print(f"strict / default throughput: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.3f}")


if __name__ == "__main__":
    main()
