"""What DP-SGD costs: seconds per step and peak memory of the VAE with and without DP.

    .venv/bin/python benchmarks/vae_dp_cost.py [--size 64] [--batch 16] [--steps 5] [--encoders convnext_atto convnext_tiny]

Each (encoder, DP on/off) variant runs in its own subprocess so that peak memory (max RSS on
CPU, max allocated on CUDA) belongs to that variant alone; the variants run one after the
other in one invocation and the table prints the DP/no-DP ratios side by side. DP uses the
same path as training: Opacus make_private with functorch per-sample gradients, Poisson
sampling off so every step sees a full batch.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(encoder: str, dp: bool, size: int, batch: int, steps: int, device: str) -> dict:
    import torch

    from common.config import load_config
    from common.model import build_vae
    from common.training import LocalTrainer, SiteState

    overrides = [f"model.encoder={encoder}", f"data.image_size={size}", f"train.batch_size={batch}",
                 f"train.max_steps={steps}", "train.epochs=1000", f"train.device={device}", "train.progress=false",
                 "model.latent_dim=128", "model.decoder_width=32"]
    if dp:
        overrides += ["dp.enabled=true", "dp.noise_multiplier=1.0", "dp.poisson_sampling=false"]
    config = load_config("demo", overrides)
    images = torch.rand(batch * (steps + 2), 3, size, size)

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i]

    torch.manual_seed(0)
    trainer = LocalTrainer(config, build_vae(config.model, size), Images())
    warm = LocalTrainer(config.model_copy(update={"train": config.train.model_copy(update={"max_steps": 2})}),
                        trainer.model, Images())
    warm.train(SiteState())  # allocator and kernels warm
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = trainer.train(SiteState())
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if trainer.device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
        device_name = torch.cuda.get_device_name()
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        device_name = f"CPU ({torch.get_num_threads()} threads)"
    return {"encoder": encoder, "dp": dp, "seconds_per_step": seconds / result.steps,
            "images_per_second": result.images / seconds, "peak_mib": peak_mib, "device": device_name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--encoders", nargs="+", default=["convnext_atto", "convnext_tiny"])
    parser.add_argument("--one", nargs=2, metavar=("ENCODER", "DP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1] == "1", args.size, args.batch, args.steps, args.device)))
        return
    rows = []
    for encoder in args.encoders:
        for dp in (False, True):
            command = [sys.executable, __file__, "--one", encoder, "1" if dp else "0", "--size", str(args.size),
                       "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
            print(f"measured {encoder} dp={dp}", file=sys.stderr, flush=True)
    print(f"VAE training step, {args.size}x{args.size}, batch {args.batch}, {args.steps} timed steps, {rows[0]['device']}")
    print(f"{'encoder':<16}{'s/step':>10}{'s/step DP':>12}{'DP/no-DP':>10}{'img/s':>9}{'img/s DP':>10}"
          f"{'peak MiB':>10}{'peak DP':>10}{'mem ratio':>11}")
    for plain, private in zip(rows[::2], rows[1::2]):
        print(f"{plain['encoder']:<16}{plain['seconds_per_step']:>10.3f}{private['seconds_per_step']:>12.3f}"
              f"{private['seconds_per_step'] / plain['seconds_per_step']:>10.2f}{plain['images_per_second']:>9.1f}"
              f"{private['images_per_second']:>10.1f}{plain['peak_mib']:>10.0f}{private['peak_mib']:>10.0f}"
              f"{private['peak_mib'] / plain['peak_mib']:>11.2f}")


if __name__ == "__main__":
    main()
