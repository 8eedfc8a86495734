"""The HAM10000 loader on the real sample: 705 images, 4 sites, lesions never split."""

import pandas as pd

from common.data.pipeline import prepare_data
from common.data.formats import load_catalog


def test_sample_has_705_images_in_4_sites_and_counts_missing_rows(ham_sample, data_config):
    config = data_config("data.format=ham10000", f"data.root={ham_sample}")
    catalog = load_catalog(config.data)
    assert len(catalog) == 705
    assert catalog.sites == ["rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"]
    assert catalog.frame["site"].value_counts().to_dict() == {
        "vidir_molemax": 234, "vidir_modern": 193, "rosendahl": 191, "vienna_dias": 87}
    assert len(catalog.skipped) == 10015 - 705
    assert set(catalog.skipped["reason"]) == {"image file missing"}
    assert catalog.classes == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC"]
    assert catalog.frame["label"].value_counts()["NV"] == 250


def test_real_images_decode_and_no_lesion_crosses_splits(ham_sample, data_config):
    config = data_config("data.format=ham10000", f"data.root={ham_sample}", "data.image_size=32")
    prepared = prepare_data(config)
    frame = prepared.catalog.frame
    assert len(frame) == 705  # every real image is usable
    assert prepared.store.get(0).shape == (32, 32, 3)
    splits_per_lesion = frame.groupby("group")["split"].nunique()
    assert (splits_per_lesion == 1).all()
    assert frame["group"].nunique() == 699
    # stratified by site: every site is on every side of the split
    assert (pd.crosstab(frame["site"], frame["split"]) > 0).all().all()
    fractions = frame["split"].value_counts(normalize=True)
    assert 0.08 < fractions["test"] < 0.25 and 0.08 < fractions["val"] < 0.25


def test_splits_are_reproducible_and_depend_on_seed(ham_sample, data_config):
    first = prepare_data(data_config("data.format=ham10000", f"data.root={ham_sample}", "data.image_size=32"))
    again = prepare_data(data_config("data.format=ham10000", f"data.root={ham_sample}", "data.image_size=32"))
    other = prepare_data(data_config("data.format=ham10000", f"data.root={ham_sample}", "data.image_size=32", "seed=1"))
    assert first.catalog.frame["split"].tolist() == again.catalog.frame["split"].tolist()
    assert first.catalog.frame["split"].tolist() != other.catalog.frame["split"].tolist()


def test_one_site_only_for_the_local_only_arm_keeps_the_pooled_split(ham_sample, data_config):
    """The local-only arm's site keeps the pooled split: none of its pretraining images is a pooled test image."""
    from common.data.pipeline import prepare_data

    common = ["data.format=ham10000", f"data.root={ham_sample}"]
    pooled = prepare_data(data_config(*common)).catalog.frame.set_index("image_id")["split"]
    for site, count in {"vienna_dias": 87, "rosendahl": 191}.items():
        prepared = prepare_data(data_config(*common, f"data.site={site}"))
        frame = prepared.catalog.frame
        assert len(frame) == len(prepared.store) == count and prepared.catalog.sites == [site]
        assert (frame.set_index("image_id")["split"] == pooled.loc[frame["image_id"]]).all()
        pretrained = frame[frame["split"] == "train"]["image_id"]
        assert (pooled.loc[pretrained] != "test").all() and (pooled.loc[pretrained] != "val").all()


def test_pretraining_view_has_no_labels(ham_sample, data_config):
    catalog = load_catalog(data_config("data.format=ham10000", f"data.root={ham_sample}").data)
    view = catalog.pretraining_view()
    assert view.frame["label"].isna().all() and view.classes == []
    assert len(view) == len(catalog)
