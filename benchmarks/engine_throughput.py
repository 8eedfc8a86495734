"""How close the training engine comes to the hardware, with and without DP-SGD.

    .venv/bin/python benchmarks/engine_throughput.py [--size 64|224] [--batch 32] [--steps 12] [--encoder convnext_tiny]

On whatever device is present (default size: 224 on a GPU, 64 on the CPU), in one run, each
variant in its own process (so that its peak memory is its own):
(a) bare: a plain PyTorch loop over device-resident tensors, same model, loss and optimizer,
    channels-last and bfloat16 autocast on a GPU (float32 on the CPU): the ceiling;
(b) engine: `LocalTrainer` on real cached images (the HAM10000 sample beside the project, or
    the synthetic data), with its data path, augmentation and metrics;
(c) engine with DP-SGD (ghost clipping, Poisson sampling with mean batch size --batch).
It prints images/s and peak memory of each, and the ratios engine/bare and DP/no-DP.
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

PROJECT = Path(__file__).resolve().parent.parent
HAM_SAMPLE = PROJECT.parent / "shared" / "data" / "ham10000-sample"


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


def bare(args) -> dict:
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
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"variant": "bare", "images_per_second": args.batch * args.steps / seconds, "peak_mib": _peak(device),
            "device": _device_name(device)}


def engine(args, dp: bool) -> dict:
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
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = trainer.train(SiteState())
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"variant": "engine + DP" if dp else "engine", "images_per_second": result.images / seconds,
            "peak_mib": _peak(trainer.device), "device": _device_name(trainer.device), "images": len(images),
            "skipped_steps": sum(e.skipped_steps for e in result.epochs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=None, help="default: 224 on a GPU, 64 on the CPU")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--encoder", default="convnext_tiny")
    parser.add_argument("--one", choices=["bare", "engine", "dp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.size is None:
        import torch

        args.size = 224 if torch.cuda.is_available() else 64
    if args.one:
        result = bare(args) if args.one == "bare" else engine(args, dp=args.one == "dp")
        print(json.dumps(result))
        return
    rows = {}
    for variant in ("bare", "engine", "dp"):
        command = [sys.executable, __file__, "--one", variant, "--size", str(args.size), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--encoder", args.encoder]
        output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=PROJECT).stdout
        rows[variant] = json.loads(output.strip().splitlines()[-1])
        print(f"measured {variant}", file=sys.stderr, flush=True)
    print(f"{args.encoder} VAE at {args.size}x{args.size}, batch {args.batch}, {args.steps} timed steps, "
          f"{rows['bare']['device']}; engine data: {rows['engine']['images']} cached images")
    print(f"{'variant':<14}{'images/s':>10}{'peak MiB':>10}")
    for row in rows.values():
        print(f"{row['variant']:<14}{row['images_per_second']:>10.1f}{row['peak_mib']:>10.0f}")
    print(f"engine / bare:  {rows['engine']['images_per_second'] / rows['bare']['images_per_second']:.2f}")
    print(f"DP / no-DP:     {rows['engine']['images_per_second'] / rows['dp']['images_per_second']:.2f} "
          "(time per image; target <= 2.0)")


if __name__ == "__main__":
    main()
