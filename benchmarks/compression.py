"""What `federation.compression` saves on the wire and what it costs the encoder, side by side in one run.

    .venv/bin/python benchmarks/compression.py [--config demo] [--rounds 3] [key=value ...]

For none / fp16 / int8, on the same data, model, seeds and local steps: the configured sites train
round after round in this process (the hospitals' own code, `client.site.SiteRunner`); each
reply is decoded onto the global weights as the server does (`common.compression.apply_update`)
and averaged by example count (FedAvg). Printed per variant: the bytes one hospital uploads per
round, as Flower serialises its ArrayRecord (protobuf), and the final global encoder's
linear-probe balanced accuracy: the server monitor's probe (`server.monitor`, a balanced logistic
regression on frozen features, fitted on half of the lesions, scored on the other half), here on
every labelled image of the data set (the validation split alone is a few dozen images at demo scale).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.common.serde import array_record_to_proto

from common.compression import apply_update
from common.config import load_config
from common.data.batches import read_batch, to_device_float
from common.data.pipeline import ensure_data, prepare_data
from in_process import fedavg, hospital_count, site_runners  # benchmarks/, this script's folder
from common.model import build_model, load_partial_state
from server.federation import initial_shared_weights
from server.monitor import Monitor

CODECS = ("none", "fp16", "int8")


def federate(config, workdir: Path) -> tuple[dict[str, torch.Tensor], int, float]:
    """(final global weights, bytes one hospital uploads per round, seconds) of one variant."""
    count = hospital_count(config)
    started = time.perf_counter()
    runners = site_runners(config, count, workdir)
    weights = initial_shared_weights(config)
    codec = config.federation.compression
    for round_number in range(1, config.federation.num_rounds + 1):
        outputs = [runner.train_round(round_number, weights) for runner in runners]
        upload = len(array_record_to_proto(ArrayRecord(outputs[0].shared)).SerializeToString())
        if codec != "none":
            sent = {k: v.numpy() for k, v in weights.items()}
            decoded = [{k: torch.from_numpy(v) for k, v in apply_update(sent, o.shared, codec).items()} for o in outputs]
        else:
            decoded = [o.shared for o in outputs]
        weights = fedavg(outputs, decoded)
    return weights, upload, time.perf_counter() - started


@torch.no_grad()
def probe_accuracy(config, weights: dict[str, torch.Tensor]) -> float:
    """The monitor's linear probe of the frozen global encoder, on every image of the data set."""
    prepared = prepare_data(config)
    rows = np.arange(len(prepared.catalog))
    images = to_device_float(read_batch(prepared.store, rows), torch.device("cpu"))
    monitor = Monitor(config, prepared)
    monitor._model = build_model(config.model, config.data.image_size).eval()
    load_partial_state(monitor._model, weights)
    return monitor._linear_probe(prepared, rows, images).get("probe-balanced-accuracy", float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="dermfed-compression-"))
    defaults = [f"data.root={workdir / 'data'}", f"data.cache_dir={workdir / 'cache'}"]  # overrides win
    base = load_config(args.config, [*defaults, f"federation.num_rounds={args.rounds}", "train.progress=false",
                                     *args.overrides])
    ensure_data(base)  # data generation and the cache are not part of any timing
    rows = []
    for codec in CODECS:
        config = load_config(args.config, [*defaults, f"federation.num_rounds={args.rounds}", "train.progress=false",
                                           *args.overrides,
                                           f"federation.compression={codec}"])
        weights, upload, seconds = federate(config, workdir / codec)
        probe = probe_accuracy(config, weights)
        rows.append((codec, upload, probe, seconds))
    float32 = rows[0][1]
    print(f"\n{base.model.encoder} at {base.data.image_size}px, {args.rounds} rounds, {base.data.format} data "
          f"({base.data.root}), dp.enabled={base.dp.enabled}, seed {base.seed}")
    print(f"{'compression':<12}{'bytes/hospital/round':>22}{'x float32':>11}{'probe bal. acc.':>17}{'seconds':>9}")
    for codec, upload, probe, seconds in rows:
        print(f"{codec:<12}{upload:>22,}{upload / float32:>11.4f}{probe:>17.4f}{seconds:>9.1f}")
    spread = np.ptp([row[2] for row in rows])
    print(f"largest accuracy difference between variants: {100 * spread:.1f} points")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
