"""The federation without Flower, for benchmarks: the hospitals' own code (`client.site.SiteRunner`) trained one
after the other in this process, and FedAvg by example count, as the server does it."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from client.site import RoundOutput, SiteRunner, simulation_site_data
from common.data.partition import partition_catalog
from common.data.pipeline import prepare_data


def hospital_count(config) -> int:
    """How many simulated hospitals `data.partition` makes of the data (prepares the data once, untimed)."""
    prepared = prepare_data(config)
    parts, _ = partition_catalog(prepared.catalog, config.data.partition, config.data.num_partitions,
                                 config.data.dirichlet_alpha, config.seed)
    return len(parts)


def site_runners(config, count: int, folder: Path) -> list[SiteRunner]:
    """Each simulated hospital's runner, with its state folder under `folder`."""
    return [SiteRunner(config, simulation_site_data(config, i, count), folder / f"site{i}") for i in range(count)]


def fedavg(outputs: Sequence[RoundOutput], weights: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of each reply's `weights` (decoded where compressed), weighted by its `num-examples`."""
    total = sum(o.metrics["num-examples"] for o in outputs)
    return {k: sum(w[k] * (o.metrics["num-examples"] / total) for w, o in zip(weights, outputs)) for k in weights[0]}
