"""The embedded synthetic data: deterministic, read by the loaders, shortcut only in train/val."""

import hashlib

import numpy as np
import pandas as pd

from common.config import load_config
from common.data.pipeline import prepare_data
from common.data.synthetic import generate, render_lesion, sample_lesion, shortcut_matches_class


def _digest(folder):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted((folder / "images").iterdir()))).hexdigest()


def test_same_seed_same_bytes_other_seed_other_images(tmp_path, smoke_config, synthetic_root):
    again = tmp_path / "again"
    generate(smoke_config, again, progress=False)
    assert _digest(again) == _digest(synthetic_root)
    assert (again / "synthetic_metadata.csv").read_text() == (synthetic_root / "synthetic_metadata.csv").read_text()
    other = tmp_path / "other"
    generate(smoke_config.model_copy(update={"seed": 1}), other, progress=False)
    assert _digest(other) != _digest(synthetic_root)


def test_loader_reads_it_with_sites_groups_and_predefined_splits(synthetic_root, data_config):
    prepared = prepare_data(data_config(f"data.root={synthetic_root}"))
    frame = prepared.catalog.frame
    assert prepared.catalog.sites == ["hospital_1", "hospital_2", "hospital_3"]
    assert set(prepared.catalog.classes) == {"NV", "MEL", "BKL"}
    assert set(frame["split"]) == {"train", "val", "test"}
    assert (frame.groupby("group")["split"].nunique() == 1).all()
    assert frame["group"].nunique() < len(frame)  # several images of one lesion


def test_shortcut_artifact_tracks_class_in_training_but_not_in_test(tmp_path):
    config = load_config("demo", ["synth.lesions_per_site=60", "synth.image_size=48"])
    meta = generate(config, tmp_path, progress=False)
    meta = meta.assign(label=meta["dx"].str.upper())
    train, test = meta[meta["split"] == "train"], meta[meta["split"] == "test"]
    assert shortcut_matches_class(train, "mel").mean() > 0.8
    assert 0.3 < shortcut_matches_class(test, "mel").mean() < 0.7
    off = generate(load_config("demo", ["synth.lesions_per_site=60", "synth.image_size=48", "synth.shortcut=false"]),
                   tmp_path / "off", progress=False)
    train_off = off[off["split"] == "train"].assign(label=lambda f: f["dx"].str.upper())
    assert shortcut_matches_class(train_off, "mel").mean() < 0.75


def test_clinical_features_differ_by_class():
    """Melanomas are larger and more variegated than nevi (ABCD rule), on average."""
    rng = np.random.default_rng(0)

    def lesion_stats(dx):
        pixels = [render_lesion(sample_lesion(dx, rng), 64, rng) for _ in range(40)]
        dark = [(p.mean(axis=2) < 0.55).mean() for p in pixels]
        spread = [p[p.mean(axis=2) < 0.55].std(axis=0).sum() if (p.mean(axis=2) < 0.55).any() else 0 for p in pixels]
        return np.mean(dark), np.mean(spread)

    nv_area, nv_colours = lesion_stats("nv")
    mel_area, mel_colours = lesion_stats("mel")
    assert mel_area > 1.5 * nv_area
    assert mel_colours > nv_colours


def test_every_site_has_its_own_acquisition(synthetic_root):
    meta = pd.read_csv(synthetic_root / "synthetic_metadata.csv")
    assert meta.groupby("dataset")["image_id"].count().min() > 0
    from common.data.synthetic import site_profiles

    profiles = site_profiles(4, 0)
    assert len({p.colour_cast for p in profiles}) == 4
    assert len({p.downsample for p in profiles}) > 1
