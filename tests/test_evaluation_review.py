"""An independent reviewer's attempts to make `dermfed evaluate` and `dermfed report` credit the wrong thing.

Each test goes through the real CLI (or the function the CLI calls) on tiny synthetic data:
- a federated run warm-started from a checkpoint that pretrained on the test images;
- test images copied under other names, byte for byte or resized and re-encoded, into the pretraining data;
- a checkpoint whose record lists fewer images than it pretrained on, or calls itself another kind of run;
- a data set without lesion ids recorded as "no lesions" rather than "lesions unknown";
- verdicts drawn from a handful of test lesions;
- a damaged metrics.json, junk ImageNet weights, an encoder giving NaN features: one line, exit 2;
- the report's header and pretraining section when arm A is listed late or not evaluated.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from common.checkpoint import load_checkpoint, save_checkpoint
from common.config import build_config, load_config
from server.cli import main

# One worker runs this whole module: its module-scoped fixtures are computed once (pyproject: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_evaluation_review")

FAST = ["evaluation.epochs=1", "evaluation.seeds=[0]", "evaluation.bootstrap_replicates=100"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, synthetic_root):
    """Two pooled checkpoints on the smoke synthetic data: one pretrained on the training split only (no leak), one
    on every split (it saw the test images)."""
    folder = tmp_path_factory.mktemp("review")
    common = [f"data.root={synthetic_root}", f"data.cache_dir={folder / 'cache'}"]
    assert main(["pretrain", "--config", "smoke", "--out", str(folder / "train-only"), *common, "train.max_steps=1"]) == 0
    assert main(["pretrain", "--config", "smoke", "--out", str(folder / "all"), *common, "train.max_steps=1",
                 "data.pretrain_splits=[train,val,test]"]) == 0
    return folder, common


@pytest.fixture(scope="module")
def plain_eval(work):
    """A clean evaluation: arm A (train-only) and random init, on the smoke data's handful of test lesions."""
    folder, common = work
    out = folder / "plain-eval"
    assert main(["evaluate", "--config", "smoke", "--checkpoint", str(folder / "train-only"), "--out", str(out), *common,
                 *FAST, "evaluation.arms=[random,federated]"]) == 0
    return out


def _warm_started(folder, common, initial, name, dp_history=False):
    """What `dermfed simulate federation.initial_checkpoint=INITIAL` records: a federated checkpoint (1 round, 2 sites)
    pretrained on the training split, its record written by the server's own function."""
    from common.data.pipeline import prepare_data
    from server.federation import federated_pretraining_images

    config = load_config("smoke", [*common, f"federation.initial_checkpoint={initial}"])
    record = federated_pretraining_images(config, prepare_data(config))
    epsilon = 2.0 if dp_history else None
    history = [{"round": 1, "sites": [{"site": "site_0", "epsilon": epsilon}, {"site": "site_1", "epsilon": epsilon}],
                "excluded": [], "train": {}, "evaluate": {}, "monitor": {}, "seconds": 1.0}]
    weights = load_checkpoint(initial)["encoder"]
    path = folder / name / "checkpoint.pt"
    save_checkpoint(path, config=config, encoder_state=weights, position={"round": 1}, history=history,
                    extra={"arm": "federated", "pretraining_images": record})
    return path


# -- 1. warm starts ------------------------------------------------------------------------------


def test_a_run_warm_started_from_a_checkpoint_that_saw_the_test_images_is_refused(work, capsys):
    """The federated run itself pretrained on the training split only; its warm start saw every split."""
    folder, common = work
    federated = _warm_started(folder, common, folder / "all", "warm-from-all")
    capsys.readouterr()
    code = main(["evaluate", "--config", "smoke", "--checkpoint", str(federated.parent), "--out", str(folder / "e1"),
                 *common, *FAST, "evaluation.arms=[federated]"])
    message = capsys.readouterr().err
    assert code == 2, message
    assert re.search(r"arm federated \(A: federated VAE encoder .*warm-started from a pooled VAE encoder.*\) pretrained "
                     r"on [1-9]\d* test", message), message
    assert "warm start" in message and len(message.strip().splitlines()) == 1
    assert not (folder / "e1" / "metrics.json").exists()


def test_a_warm_started_run_is_named_with_its_warm_start_and_dp_is_credited_only_if_every_stage_had_it(work):
    folder, common = work
    federated = _warm_started(folder, common, folder / "train-only", "warm-from-train", dp_history=True)
    assert main(["evaluate", "--config", "smoke", "--checkpoint", str(federated.parent), "--out", str(folder / "e2"),
                 *common, *FAST, "evaluation.arms=[federated]"]) == 0
    arm = json.loads((folder / "e2" / "metrics.json").read_text())["arms"][0]
    assert arm["label"].startswith("A: federated VAE encoder (1 round, 2 sites), warm-started from a pooled VAE encoder "
                                   "(1 epoch); DP-SGD not in every stage"), arm["label"]
    assert arm["provenance"]["dp"] is False and arm["provenance"]["stage_dp"] is True
    assert arm["pretraining_overlap"]["source"].count("warm start") >= 1
    assert arm["pretraining_overlap"]["pretraining_images"] > 0


# -- 2. copies under other names -----------------------------------------------------------------


@pytest.mark.parametrize("copy", ["bytes", "resized"])
def test_test_images_copied_under_other_names_into_the_pretraining_data_are_found(work, synthetic_root, tmp_path, copy,
                                                                                  capsys):
    """A hospital folder of the test images renamed `scan_000.jpg`, ...: byte-identical, or twice the size as PNG."""
    folder, common = work
    metadata = pd.read_csv(synthetic_root / "synthetic_metadata.csv")
    test_ids = metadata.loc[metadata["split"] == "test", "image_id"].tolist()
    hospital = tmp_path / "hospital" / "images"
    hospital.mkdir(parents=True)
    for number, image_id in enumerate(test_ids):
        source = synthetic_root / "images" / f"{image_id}.jpg"
        if copy == "bytes":
            shutil.copy(source, hospital / f"scan_{number:03d}.jpg")
        else:
            with Image.open(source) as image:
                image.resize((image.width * 2, image.height * 2), Image.Resampling.BICUBIC).save(hospital / f"scan_{number:03d}.png")
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    assert main(["pretrain", "--config", "smoke", "--out", str(tmp_path / "pre"), "data.format=folder",
                 f"data.root={tmp_path / 'hospital'}", cache, "data.pretrain_splits=[train,val,test]",
                 "train.max_steps=1"]) == 0
    capsys.readouterr()
    code = main(["evaluate", "--config", "smoke", "--checkpoint", str(tmp_path / "pre"), "--out", str(tmp_path / "eval"),
                 f"data.root={synthetic_root}", cache, *FAST, "evaluation.arms=[federated]"])
    message = capsys.readouterr().err
    assert code == 2, message
    how = r"0 by name, (\d+) by file hash, (\d+) by pixel hash"
    found = re.search(rf"pretrained on {len(test_ids)} test \({how}\)", message)
    assert found, message
    if copy == "bytes":
        assert int(found.group(1)) == len(test_ids)
    else:
        assert int(found.group(1)) == 0 and int(found.group(2)) == len(test_ids)


# -- 4. no lesion ids is not "no lesions" --------------------------------------------------------


def test_pretraining_on_a_data_set_without_lesion_ids_leaves_its_lesions_unknown_not_none(work, synthetic_root,
                                                                                          tmp_path):
    """A folder of the training images has no lesion ids: the record must say lesions unknown (None), not "it saw no
    lesion" ([]), and the verdicts are qualified since other images of its lesions could be in the test split."""
    folder, common = work
    metadata = pd.read_csv(synthetic_root / "synthetic_metadata.csv")
    hospital = tmp_path / "hospital" / "images"
    hospital.mkdir(parents=True)
    for image_id in metadata.loc[metadata["split"] == "train", "image_id"]:
        shutil.copy(synthetic_root / "images" / f"{image_id}.jpg", hospital / f"{image_id}.jpg")
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    assert main(["pretrain", "--config", "smoke", "--out", str(tmp_path / "pre"), "data.format=folder",
                 f"data.root={tmp_path / 'hospital'}", cache, "data.pretrain_splits=[train,val,test]",
                 "train.max_steps=1"]) == 0
    payload = load_checkpoint(tmp_path / "pre")
    assert payload["extra"]["pretraining_images"]["groups"] is None
    payload["extra"]["pretraining_images"]["groups"] = []  # as checkpoints before this fix recorded it
    torch.save(payload, tmp_path / "pre" / "checkpoint.pt")
    assert main(["evaluate", "--config", "smoke", "--checkpoint", str(tmp_path / "pre"), "--out", str(tmp_path / "eval"),
                 f"data.root={synthetic_root}", cache, *FAST, "evaluation.arms=[federated,random]"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    arm = metrics["arms"][0]
    assert arm["pretraining_overlap"]["pretraining_groups"] is None and arm["pretraining_overlap"]["test_same_lesion"] is None
    assert all(any("not their lesions" in c for c in comparison["caveats"]) for comparison in metrics["comparisons"])


# -- 5. a record is checked against its checkpoint -----------------------------------------------


def test_a_record_that_leaves_out_the_test_images_it_pretrained_on_is_refused(work, tmp_path, capsys):
    folder, common = work
    payload = load_checkpoint(folder / "all")
    honest = load_checkpoint(folder / "train-only")["extra"]["pretraining_images"]
    payload["extra"]["pretraining_images"] = honest  # the train-only list, on a checkpoint that saw every split
    (tmp_path / "doctored").mkdir()
    torch.save(payload, tmp_path / "doctored" / "checkpoint.pt")
    capsys.readouterr()
    code = main(["evaluate", "--config", "smoke", "--checkpoint", str(tmp_path / "doctored"), "--out",
                 str(tmp_path / "eval"), *common, *FAST, "evaluation.arms=[federated]"])
    message = capsys.readouterr().err
    assert code == 2 and "record of pretraining images lacks" in message, message
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_a_checkpoint_that_calls_itself_federated_is_labelled_by_its_position_and_unverified(work, tmp_path):
    folder, common = work
    payload = load_checkpoint(folder / "train-only")
    payload["extra"]["arm"] = "federated"
    (tmp_path / "claims").mkdir()
    torch.save(payload, tmp_path / "claims" / "checkpoint.pt")
    assert main(["evaluate", "--config", "smoke", "--checkpoint", str(tmp_path / "claims"), "--out",
                 str(tmp_path / "eval"), *common, *FAST, "evaluation.arms=[federated]"]) == 0
    label = json.loads((tmp_path / "eval" / "metrics.json").read_text())["arms"][0]["label"]
    assert label.startswith("A: pooled VAE encoder (1 epoch, DP-SGD off)") and "unverified" in label, label
    assert "'federated'" in label


# -- 3. verdicts on a handful of lesions; 8-10. what the report says ---------------------------------


def test_too_few_test_lesions_give_intervals_but_no_verdict(plain_eval, work, tmp_path):
    metrics = json.loads((plain_eval / "metrics.json").read_text())
    lesions = metrics["comparisons"][0]["test_groups"]
    assert 0 < lesions < 30 and metrics["head"]["min_test_groups"] == 30
    for comparison in metrics["comparisons"]:
        assert comparison["excludes_zero"] is None and comparison["low"] is not None
        assert "no verdict: too few test lesions to decide" in comparison["words"]
        assert "better" not in comparison["words"] and "no difference shown" not in comparison["words"]
    report = (plain_eval / "report.html").read_text()
    assert "No verdict." in report and "too few test lesions to decide" in report
    folder, common = work
    assert main(["evaluate", "--config", "smoke", "--checkpoint", str(folder / "train-only"), "--out",
                 str(tmp_path / "eval"), *common, *FAST, "evaluation.arms=[random,federated]",
                 f"evaluation.min_test_groups={lesions}"]) == 0
    allowed = json.loads((tmp_path / "eval" / "metrics.json").read_text())["comparisons"]
    assert all(c["excludes_zero"] in (True, False) and "no verdict" not in c["words"] for c in allowed)


def test_the_report_names_arm_a_wherever_it_ran_and_says_what_intervals_cover(plain_eval):
    metrics = json.loads((plain_eval / "metrics.json").read_text())
    assert [arm["key"] for arm in metrics["arms"]] == ["random", "federated"]
    report = (plain_eval / "report.html").read_text()
    label = next(arm["label"] for arm in metrics["arms"] if arm["key"] == "federated")
    assert f"The encoder under study, arm {label}" in report and "A: did not run" not in report
    assert "Pretraining history of arm A" in report
    assert "does not cover redrawing the split" in report
    recall = metrics["arms"][0]["per_class_recall"]
    assert all("lesions" in r["covers"] for r in recall.values() if r["mean"] is not None)


def test_the_pretraining_of_an_arm_that_was_not_evaluated_is_not_shown(work, tmp_path):
    folder, common = work
    assert main(["evaluate", "--config", "smoke", "--checkpoint", str(folder / "train-only"), "--out",
                 str(tmp_path / "eval"), *common, *FAST, "evaluation.arms=[random]"]) == 0
    report = (tmp_path / "eval" / "report.html").read_text()
    assert "was not evaluated" in report and "Pretraining history of arm A" not in report
    assert "Reconstruction loss during pretraining" not in report


def test_predictions_keep_each_test_images_site_and_lesion(plain_eval, synthetic_root):
    predictions = np.load(plain_eval / "predictions.npz")
    seed = json.loads((plain_eval / "metrics.json").read_text())["data"]["split_seeds"][0]
    metadata = pd.read_csv(synthetic_root / "synthetic_metadata.csv").set_index("image_id")
    ids = predictions[f"split{seed}_image_id"]
    assert list(predictions[f"split{seed}_group"]) == list(metadata.loc[ids, "lesion_id"])
    assert list(predictions[f"split{seed}_site"]) == list(metadata.loc[ids, "dataset"])


# -- 7. bad input: one line, exit 2 --------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "format", "not-an-object", "missing-keys"])
def test_a_damaged_metrics_file_is_one_line_and_exit_2(plain_eval, tmp_path, damage, capsys):
    run = tmp_path / "run"
    shutil.copytree(plain_eval, run)
    text = (run / "metrics.json").read_text()
    metrics = json.loads(text)
    damaged = {"truncated": text[: len(text) // 2],
               "format": json.dumps({**metrics, "format": "someone-elses-v9"}),
               "not-an-object": "[1, 2]",
               "missing-keys": json.dumps({k: v for k, v in metrics.items() if k != "data"})}[damage]
    (run / "metrics.json").write_text(damaged)
    capsys.readouterr()
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dermfed: error: ") and "metrics.json" in err and len(err.strip().splitlines()) == 1, err
    assert "unexpected error" not in err and "Traceback" not in err


def test_junk_imagenet_weights_are_one_line_and_exit_2(work, tmp_path, capsys):
    folder, common = work
    junk = tmp_path / "weights.safetensors"
    junk.write_bytes(b"this is not a weights file" * 10)
    capsys.readouterr()
    code = main(["evaluate", "--config", "smoke", "--checkpoint", str(folder / "train-only"), "--out",
                 str(tmp_path / "eval"), *common, *FAST, "evaluation.arms=[imagenet]", "--imagenet-weights", str(junk)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"--imagenet-weights {junk}" in err and len(err.strip().splitlines()) == 1, err


def test_an_encoder_giving_nan_features_is_one_line_and_exit_2(work, tmp_path, capsys):
    folder, common = work
    payload = load_checkpoint(folder / "train-only")
    payload["encoder"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                          for k, v in payload["encoder"].items()}
    (tmp_path / "nan").mkdir()
    torch.save(payload, tmp_path / "nan" / "checkpoint.pt")
    capsys.readouterr()
    code = main(["evaluate", "--config", "smoke", "--checkpoint", str(tmp_path / "nan"), "--out", str(tmp_path / "eval"),
                 *common, *FAST, "evaluation.arms=[federated]"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "NaN or infinite features" in err and len(err.strip().splitlines()) == 1, err


def test_a_warm_start_that_is_gone_leaves_the_record_unknown_never_empty(work, tmp_path):
    """A resumed run whose warm start was deleted: its images are unknown, so the verdicts are qualified."""
    from server.federation import federated_pretraining_images

    folder, common = work
    config = build_config(load_config("smoke", [*common, f"federation.initial_checkpoint={tmp_path / 'gone.pt'}"])
                          .model_dump(mode="json"))
    record = federated_pretraining_images(config, None)
    assert "unknown" in record and "gone.pt" in record["unknown"]
