"""How close the training engine comes to the hardware, with and without DP-SGD.

    .venv/bin/python benchmarks/engine_throughput.py [--size 64|224] [--batch 32] [--steps 12] [--repeats 5]
                                                     [--encoder convnext_tiny]

On whatever device is present (default size: 224 on a GPU, 64 on the CPU), three variants,
each in a process of its own that lives for the whole run (so that its peak memory is its own):
(a) bare: a plain PyTorch loop over device-resident tensors, same model, loss and optimizer,
    channels-last and bfloat16 autocast on a GPU (float32 on the CPU): the ceiling;
(b) engine: `LocalTrainer` on real cached images (the HAM10000 sample beside the project, or
    the synthetic data), with its data path, augmentation and metrics (one training call per
    measurement, as one federated round is);
(c) engine with DP-SGD (ghost clipping, Poisson sampling with mean batch size --batch).
Each process builds its model and warms up once; then every repeat asks each variant for
--steps timed steps, in an order rotated per repeat (`benchmarks/interleave.py`), and the
ratios engine/bare and DP/no-DP are taken within each repeat. It prints images/s per variant
and the median ratio with its lowest and highest value over the repeats.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from interleave import interleaved, ratios, summary  # benchmarks/, this script's folder

PROJECT = Path(__file__).resolve().parent.parent
HAM_SAMPLE = PROJECT.parent / "shared" / "data" / "ham10000-sample"
RESULT = "RESULT "  # a worker's answer line (anything else on its stdout is a library talking)


def _config(args, dp: bool):
    from common.config import load_config

    data = (["data.format=ham10000", f"data.root={HAM_SAMPLE}"] if (HAM_SAMPLE / "HAM10000_metadata.csv").is_file()
            else [f"data.root={Path(tempfile.gettempdir()) / 'dermfed-bench-synthetic'}"])
    overrides = [*data, f"data.cache_dir={Path(tempfile.gettempdir()) / 'dermfed-bench-cache'}",
                 f"data.image_size={args.size}", f"model.encoder={args.encoder}", "model.vae.latent_dim=128",
                 "model.vae.decoder_width=32", f"train.batch_size={args.batch}", "train.epochs=1000",
                 "train.progress=false", "data.val_fraction=0", "data.test_fraction=0"]
    if dp:
        overrides += ["dp.enabled=true", "dp.noise_multiplier=1.0"]
    return load_config("demo", overrides)


def _peak(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def bare(args) -> Callable[[], dict]:
    """Set up the ceiling once; the returned function times `args.steps` steps."""
    import torch

    from common.model import build_model
    from common.training import autocast_dtype, resolve_device

    config = _config(args, dp=False)
    device = resolve_device("auto")
    torch.manual_seed(0)
    model = build_model(config.model, args.size).to(device)
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)
    dtype = autocast_dtype(device, True)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(images)
        loss = model.loss_terms(images, out, model.schedule(None))["total"].mean()
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    _synchronize(device, reset=True)

    def measure() -> dict:
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        _synchronize(device)
        seconds = time.perf_counter() - started
        return {"variant": "bare", "images_per_second": args.batch * args.steps / seconds, "peak_mib": _peak(device),
                "device": _device_name(device)}

    return measure


def _synchronize(device, reset: bool = False) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        if reset:
            torch.cuda.reset_peak_memory_stats()


def engine(args, dp: bool) -> Callable[[], dict]:
    """Set up the engine once (data, cache, model, a 2-step warm-up call); the returned function runs one training
    call of `args.steps` steps, continuing the state of the previous one."""
    import torch

    from common.data.batches import ImageRows
    from common.data.pipeline import ensure_data, prepare_data
    from common.data.splits import split_indices
    from common.model import build_model
    from common.training import LocalTrainer, SiteState

    config = _config(args, dp)
    ensure_data(config)
    prepared = prepare_data(config)
    images = ImageRows(prepared.store, split_indices(prepared.catalog, "train"))
    torch.manual_seed(0)
    model = build_model(config.model, args.size)
    warm = config.model_copy(update={"train": config.train.model_copy(update={"max_steps": 2})})
    LocalTrainer(warm, model, images).train(SiteState())  # kernels and allocator warm; the cache exists
    trainer = LocalTrainer(config.model_copy(update={"train": config.train.model_copy(update={"max_steps": args.steps})}),
                           model, images)
    _synchronize(trainer.device, reset=True)
    state = SiteState()

    def measure() -> dict:
        nonlocal state
        started = time.perf_counter()
        result = trainer.train(state)
        _synchronize(trainer.device)
        seconds = time.perf_counter() - started
        state = result.state
        return {"variant": "engine + DP" if dp else "engine", "images_per_second": result.images / seconds,
                "peak_mib": _peak(trainer.device), "device": _device_name(trainer.device), "images": len(images),
                "skipped_steps": sum(e.skipped_steps for e in result.epochs)}

    return measure


def serve(args) -> None:
    """A worker: set up one variant, then answer each `measure` line on stdin with one RESULT line."""
    measure = bare(args) if args.serve == "bare" else engine(args, dp=args.serve == "dp")
    print(RESULT + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "measure":
            break
        print(RESULT + json.dumps(measure()), flush=True)


class Worker:
    """One variant's process, asked for a measurement at a time."""

    def __init__(self, variant: str, args):
        command = [sys.executable, __file__, "--serve", variant, "--size", str(args.size), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--encoder", args.encoder]
        self.variant = variant
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=PROJECT)
        self.last: dict = self._answer()

    def _answer(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT):])
        raise RuntimeError(f"the {self.variant} worker ended (exit code {self.process.wait()}); see its stderr above")

    def measure(self) -> float:
        self.process.stdin.write("measure\n")
        self.process.stdin.flush()
        self.last = self._answer()
        return self.last["images_per_second"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=None, help="default: 224 on a GPU, 64 on the CPU")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per variant, interleaved")
    parser.add_argument("--encoder", default="convnext_tiny")
    parser.add_argument("--serve", choices=["bare", "engine", "dp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.size is None:
        import torch

        args.size = 224 if torch.cuda.is_available() else 64
    if args.serve:
        serve(args)
        return
    workers = {}
    try:
        for variant in ("bare", "engine", "dp"):  # set up one at a time: start-up is not measured
            workers[variant] = Worker(variant, args)
            print(f"ready: {variant}", file=sys.stderr, flush=True)
        speeds = interleaved({name: worker.measure for name, worker in workers.items()}, args.repeats,
                             progress=lambda text: print(text, file=sys.stderr, flush=True))
    finally:
        for worker in workers.values():
            worker.close()
    last = {name: worker.last for name, worker in workers.items()}
    print(f"{args.encoder} VAE at {args.size}x{args.size}, batch {args.batch}, {args.steps} timed steps per measurement, "
          f"{args.repeats} interleaved repeats, {last['bare']['device']}; engine data: {last['engine']['images']} "
          "cached images")
    print(f"{'variant':<14}{'images/s: median [lowest, highest]':>42}{'peak MiB':>10}")
    for name, values in speeds.items():
        print(f"{last[name]['variant']:<14}{summary(values, 1):>42}{last[name]['peak_mib']:>10.0f}")
    print(f"engine / bare:  {summary(ratios(speeds['engine'], speeds['bare']))}  (median [lowest, highest] of the "
          "per-repeat ratios; target >= 0.9)")
    print(f"DP / no-DP:     {summary(ratios(speeds['engine'], speeds['dp']))}  (time per image; target <= 2.0)")


if __name__ == "__main__":
    main()
