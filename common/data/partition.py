"""Pooled data -> N simulated hospitals, with flwr-datasets' partitioners.

Partitions are made over lesion groups, not single images, so that no lesion is held by two
hospitals. `natural` uses each image's acquisition site; `iid` shuffles groups (seeded) and
splits them evenly; `dirichlet` skews each hospital's label mix with concentration `alpha`
(small alpha: each hospital sees few classes).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from common.data.catalog import Catalog, DataError


def _group_table(catalog: Catalog) -> pd.DataFrame:
    frame = catalog.frame.reset_index(drop=True).assign(row=np.arange(len(catalog)))
    return frame.groupby("group", sort=True).agg(
        site=("site", "first"), label=("label", "first"), rows=("row", list)
    ).reset_index()


def _rows(groups: pd.DataFrame, group_positions: list[int]) -> np.ndarray:
    rows = [row for position in group_positions for row in groups["rows"].iloc[position]]
    return np.sort(np.asarray(rows, dtype=np.int64))


def partition_catalog(
    catalog: Catalog, scheme: str, num_partitions: int, alpha: float, seed: int
) -> tuple[list[np.ndarray], list[str]]:
    """Row indices of each partition, and a name for each (the site, or `part-K`)."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    groups = _group_table(catalog)
    if scheme == "natural":
        ordered = groups.sort_values("site", kind="stable").reset_index(drop=True)
        partitioner = NaturalIdPartitioner(partition_by="site")
        partitioner.dataset = Dataset.from_dict({"site": ordered["site"].tolist(), "position": list(range(len(ordered)))})
        names = [partitioner.partition_id_to_natural_id[i] for i in range(partitioner.num_partitions)]
        parts = [_rows(ordered, partitioner.load_partition(i)["position"]) for i in range(partitioner.num_partitions)]
        return parts, names
    if num_partitions > len(groups):
        raise DataError(f"data.num_partitions={num_partitions} exceeds the {len(groups)} lesion groups available")
    if scheme == "iid":
        order = np.random.default_rng(seed).permutation(len(groups))
        shuffled = groups.iloc[order].reset_index(drop=True)
        partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = Dataset.from_dict({"position": list(range(len(shuffled)))})
        parts = [_rows(shuffled, partitioner.load_partition(i)["position"]) for i in range(num_partitions)]
    elif scheme == "dirichlet":
        if not catalog.labelled:
            raise DataError("data.partition=dirichlet needs labels; this data set is unlabelled (use iid or natural)")
        min_size = max(1, min(10, len(groups) // (2 * num_partitions)))
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_size,
            self_balancing=False,
            seed=seed,
        )
        partitioner.dataset = Dataset.from_dict({"label": groups["label"].tolist(), "position": list(range(len(groups)))})
        parts = [_rows(groups, partitioner.load_partition(i)["position"]) for i in range(num_partitions)]
    else:
        raise DataError(f"unknown data.partition={scheme!r}; allowed: natural, iid, dirichlet")
    return parts, [f"part-{i}" for i in range(num_partitions)]


def check_partitions(catalog: Catalog, parts: list[np.ndarray], names: list[str], pretrain_splits: list[str],
                     batch_size: int, min_images: int) -> None:
    """Refuse, before any process starts, hospitals too small to train: fewer images than a batch or than
    `data.min_site_images`, or none in the pretraining splits. The message lists every partition's size."""
    split = catalog.frame["split"].to_numpy()
    floor = max(batch_size, min_images)
    sizes = [(name, len(rows), int(np.isin(split[rows], pretrain_splits).sum())) for name, rows in zip(names, parts)]
    small = [name for name, total, training in sizes if total < floor or training == 0]
    if small:
        listed = ", ".join(f"{name} {total} ({training} for pretraining)" for name, total, training in sizes)
        raise DataError(f"hospital(s) {', '.join(small)} hold too few images: each needs at least {floor} "
                        f"(train.batch_size={batch_size}, data.min_site_images={min_images}) and at least one in "
                        f"data.pretrain_splits={pretrain_splits}. Partition sizes: {listed}. Use fewer partitions "
                        "(data.num_partitions), a larger data.dirichlet_alpha, or a smaller train.batch_size")
