"""Partitioning pooled data into simulated hospitals: natural, IID, Dirichlet."""

import numpy as np
import pandas as pd
import pytest

from common.data.catalog import Catalog, DataError
from common.data.partition import partition_catalog


def make_catalog(n_groups=300, images_per_group=2, classes=("MEL", "NV", "BCC"), sites=("a", "b", "c"), seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        label, site = classes[rng.integers(len(classes))], sites[g % len(sites)]
        for i in range(images_per_group):
            rows.append(dict(image_id=f"img{g}_{i}", path=f"/x/{g}_{i}.jpg", site=site, group=f"L{g}", label=label))
    return Catalog(pd.DataFrame(rows), list(classes), "test", None)  # type: ignore[arg-type]


def _check_disjoint_cover(parts, catalog):
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == len(catalog)
    owner = np.empty(len(catalog), dtype=int)
    for k, rows in enumerate(parts):
        owner[rows] = k
    # no lesion is held by two hospitals
    assert (pd.Series(owner).groupby(catalog.frame["group"].to_numpy()).nunique() == 1).all()


def test_natural_partition_is_the_sites():
    catalog = make_catalog()
    parts, names = partition_catalog(catalog, "natural", 99, 0.5, seed=0)
    assert names == ["a", "b", "c"]
    for rows, name in zip(parts, names):
        assert set(catalog.frame.iloc[rows]["site"]) == {name}
    _check_disjoint_cover(parts, catalog)


def test_iid_partition_sizes_and_determinism():
    catalog = make_catalog()
    parts, names = partition_catalog(catalog, "iid", 4, 0.5, seed=3)
    assert names == [f"part-{i}" for i in range(4)]
    assert sorted(len(p) for p in parts) == [150, 150, 150, 150]
    _check_disjoint_cover(parts, catalog)
    again, _ = partition_catalog(catalog, "iid", 4, 0.5, seed=3)
    other, _ = partition_catalog(catalog, "iid", 4, 0.5, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def _label_skew(catalog, parts):
    """Mean total-variation distance between each partition's label mix and the pooled mix."""
    pooled = catalog.frame["label"].value_counts(normalize=True)
    distances = []
    for rows in parts:
        mix = catalog.frame.iloc[rows]["label"].value_counts(normalize=True).reindex(pooled.index, fill_value=0)
        distances.append(0.5 * np.abs(mix - pooled).sum())
    return float(np.mean(distances))


def test_dirichlet_small_alpha_skews_labels_more_than_large_alpha():
    catalog = make_catalog(n_groups=600)
    skew_small = np.mean([_label_skew(catalog, partition_catalog(catalog, "dirichlet", 5, 0.1, seed=s)[0]) for s in range(3)])
    skew_large = np.mean([_label_skew(catalog, partition_catalog(catalog, "dirichlet", 5, 100.0, seed=s)[0]) for s in range(3)])
    assert skew_small > 0.25 > 0.1 > skew_large


def test_dirichlet_is_deterministic_and_disjoint():
    catalog = make_catalog()
    parts, _ = partition_catalog(catalog, "dirichlet", 3, 0.5, seed=1)
    again, _ = partition_catalog(catalog, "dirichlet", 3, 0.5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    _check_disjoint_cover(parts, catalog)


def test_dirichlet_needs_labels_and_partitions_need_groups():
    unlabelled = make_catalog().pretraining_view()
    with pytest.raises(DataError, match="needs labels"):
        partition_catalog(unlabelled, "dirichlet", 3, 0.5, seed=0)
    with pytest.raises(DataError, match="exceeds"):
        partition_catalog(make_catalog(n_groups=5), "iid", 10, 0.5, seed=0)
