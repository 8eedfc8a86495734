"""The leak guard compares images, not names: a reviewer's attempts to slip a test image past it.

Pretraining reads a data set through one format and evaluation through another (the folder format
names an image by its path, the metadata formats by id; a copy may change case and suffix); or
pretraining sees one image of a lesion and evaluation tests another image of the same lesion.
Each is a leak the guard must refuse, through the real CLI.
"""

import re
import shutil

import pandas as pd
import pytest

from common.data.identity import group_identities, image_identity
from server.cli import main


@pytest.mark.parametrize("name", ["HAM10000_images/ISIC_0024308.jpg", "ISIC_0024308", "isic_0024308.JPG",
                                  "HAM10000_images_part_1\\ISIC_0024308.jpeg", "ISIC_0024308_downsampled.jpg"])
def test_one_image_has_one_identity_in_every_format(name):
    assert image_identity(name) == "isic_0024308"


def test_a_suffix_that_is_not_an_image_suffix_stays():
    assert image_identity("scan.v2") == "scan.v2" and image_identity("a/b/c.tif") == "c"


def test_an_image_without_a_lesion_id_has_no_lesion_identity():
    frame = pd.DataFrame({"image_id": ["a", "b", "c"], "group": ["HAM_0000118", "b", " HAM_0000118 "]})
    assert group_identities(frame).tolist() == ["ham_0000118", None, "ham_0000118"]


def test_pretraining_through_the_folder_format_and_testing_through_another_is_refused(synthetic_root, tmp_path, capsys):
    """The issue's HAM10000 case on synthetic data: the folder format names images `images/syn0_..._0.JPG` (a copy with
    another case and suffix), the synthetic format `SYN0_..._0`; the old guard compared names and found 0 overlap."""
    folder = tmp_path / "hospital" / "images"
    folder.mkdir(parents=True)
    for image in (synthetic_root / "images").glob("*.jpg"):
        shutil.copy(image, folder / f"{image.stem.lower()}.JPG")
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    assert main(["pretrain", "--config", "smoke", "--out", str(tmp_path / "pre"), "data.format=folder",
                 f"data.root={tmp_path / 'hospital'}", cache, "data.pretrain_splits=[train,val,test]", "train.max_steps=1"]) == 0
    capsys.readouterr()
    code = main(["evaluate", "--config", "smoke", "--checkpoint", str(tmp_path / "pre"), "--out", str(tmp_path / "eval"),
                 f"data.root={synthetic_root}", cache, "evaluation.epochs=1", "evaluation.seeds=[0]"])
    message = capsys.readouterr().err
    test_images = int((pd.read_csv(synthetic_root / "synthetic_metadata.csv")["split"] == "test").sum())
    assert code == 2, message
    assert re.search(rf"arm federated \(A: pooled VAE encoder [^)]*\)\) pretrained on {test_images} test "
                     rf"\({test_images} by name, \d+ by file hash, \d+ by pixel hash\) and [1-9]\d* validation images", message), message
    assert "file stem, case-insensitive" in message
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_another_image_of_a_pretrained_lesion_in_the_test_split_is_refused(synthetic_root, tmp_path, capsys):
    """Pretraining saw image 0 of each lesion, evaluation tests image 1 of the same lesions: no name in common."""
    metadata = pd.read_csv(synthetic_root / "synthetic_metadata.csv")
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    metadata[metadata["image_id"].str.endswith("_0")].to_csv(first, index=False)
    metadata[metadata["image_id"].str.endswith("_1")].to_csv(second, index=False)
    shared_test = int(((metadata["split"] == "test") & metadata["image_id"].str.endswith("_1")).sum())
    assert shared_test > 0
    common = [f"data.root={synthetic_root}", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["pretrain", "--config", "smoke", "--out", str(tmp_path / "pre"), *common, f"data.metadata_csv={first}",
                 "data.pretrain_splits=[train,val,test]", "train.max_steps=1"]) == 0
    capsys.readouterr()
    code = main(["evaluate", "--config", "smoke", "--checkpoint", str(tmp_path / "pre"), "--out", str(tmp_path / "eval"),
                 *common, f"data.metadata_csv={second}", "evaluation.epochs=1", "evaluation.seeds=[0]"])
    message = capsys.readouterr().err
    assert code == 2, message
    assert re.search(rf"pretrained on 0 test and 0 validation images of this evaluation, and on another image of the "
                     rf"lesion \(or patient\) of {shared_test} test and \d+ validation images", message), message
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_an_older_record_of_raw_names_is_read_as_identities(synthetic_root, tmp_path):
    from common.checkpoint import load_checkpoint
    from server.evaluation.leakage import pretraining_images

    assert main(["pretrain", "--config", "smoke", "--out", str(tmp_path / "pre"), f"data.root={synthetic_root}",
                 f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=1"]) == 0
    payload = load_checkpoint(tmp_path / "pre")
    recorded = payload["extra"]["pretraining_images"]
    assert recorded["image_ids"] and all(i == i.lower() for i in recorded["image_ids"]) and recorded["groups"]
    payload["extra"]["pretraining_images"] = {"image_ids": [f"images/{i.upper()}.jpg" for i in recorded["image_ids"]]}
    older = pretraining_images(payload)
    assert older.image_ids == frozenset(recorded["image_ids"]) and older.groups is None and "older record" in older.source


@pytest.mark.parametrize("override", ["data.test_fraction=0 data.val_fraction=0", "data.pretrain_splits=[train,val,test]",
                                      "seed=99"])
def test_a_simulated_hospital_cannot_pretrain_on_images_the_runs_record_leaves_out(synthetic_root, tmp_path,
                                                                                   override):
    """Attack (wave 3), as a reviewer: `dermfed simulate --node-config SITE:'dermfed-overrides=...'` gave one simulated
    hospital its own data split (or seed), so it pretrained on images that the run's config (which the server records
    for the leak guard, and the guard verifies against) puts in the test split: the guard then certified an arm that
    had seen test images. A simulated hospital's data are the pooled data's partition: its node config may not change
    `data.*` or `seed` (the cache's location aside); the ClientApp refuses it, as `dermfed simulate` does up front."""
    from flwr.app import Context, RecordDict

    from client.client_app import _RUNNERS, train
    from common.config import ConfigError, load_config
    from server.federation import federated_pretraining_images
    from common.data.pipeline import prepare_data
    from common.model import build_model, shared_state
    from simulations.node_configs import check_node_configs
    from tests.flower_helpers import run_config_of, train_message

    config = load_config("smoke", [f"data.root={synthetic_root}", f"data.cache_dir={tmp_path / 'cache'}",
                                   "train.max_steps=1"])
    recorded = set(federated_pretraining_images(config, prepare_data(config))["image_ids"])
    node = {"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path / "state"), "dermfed-overrides": override}
    context = Context(run_id=8, node_id=4, node_config=node, state=RecordDict(), run_config=run_config_of(config))
    shared = shared_state(build_model(config.model, config.data.image_size), config.federation.share)
    _RUNNERS.clear()
    try:
        reply = train(train_message(4, shared, {"server-round": 1}), context)
        runner = _RUNNERS.get((8, 4))
        if runner is not None:  # it trained: on exactly what the record says, or the guard is blind
            frame = runner.data.prepared.catalog.frame
            trained = {image_identity(i) for i in frame["image_id"].iloc[runner.data.train_rows]}
            assert trained <= recorded, f"{len(trained - recorded)} images trained on but not recorded"
        assert reply.has_error(), "the simulated hospital trained with its own data settings"
        assert reply.error.reason.startswith("config-error"), reply.error.reason
    finally:
        _RUNNERS.clear()
    with pytest.raises(ConfigError, match="dermfed-overrides"):
        check_node_configs({"hospital_1": {"dermfed-overrides": override}}, ["hospital_1", "hospital_2", "hospital_3"])
