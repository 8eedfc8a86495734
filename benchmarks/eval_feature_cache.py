"""Evaluation wall time with cached frozen features against recomputing the encoder every epoch.

    .venv/bin/python benchmarks/eval_feature_cache.py [--encoder convnext_tiny] [--size 64] [--epochs 10]

Both variants run here, one after the other, on the same synthetic demo data, checkpoint,
head and seed; `evaluation.augment=true` is the variant that must recompute features of the
training images every epoch.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common.config import load_config
from common.data.pipeline import ensure_data, prepare_data
from common.pretraining import run_pretraining
from server.evaluation.run import run_evaluation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="convnext_tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dermfed-evalbench-"))
    common = [f"data.root={work / 'data'}", f"data.cache_dir={work / 'cache'}", f"data.image_size={args.size}",
              f"model.encoder={args.encoder}", "train.max_steps=1", "train.progress=false",
              f"evaluation.epochs={args.epochs}", "evaluation.seeds=[0]", "evaluation.arms=[federated]"]
    config = load_config("demo", common)
    ensure_data(config)
    prepared = prepare_data(config)
    run_pretraining(config, work / "pretrain")
    timings = {}
    for augment in (False, True):
        variant = load_config("demo", [*common, f"evaluation.augment={str(augment).lower()}"])
        started = time.perf_counter()
        run_evaluation(variant, work / "pretrain", work / f"eval-{augment}")
        timings[augment] = time.perf_counter() - started
    print(f"\n{args.encoder} at {args.size}px, {len(prepared.catalog)} images, {args.epochs} head epochs, 1 seed, 1 arm")
    print(f"cached features (encoder runs once per split): {timings[False]:7.1f} s")
    print(f"recomputed every epoch (augmentation on):      {timings[True]:7.1f} s")
    print(f"speedup of caching: {timings[True] / timings[False]:.1f}x")


if __name__ == "__main__":
    main()
