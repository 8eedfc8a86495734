"""The bad-input corpus: real files, folders, metadata, configs and checkpoints that users and hospital IT
really produce. Each gets a one-line message that names the file, row or key (exit code 2), or a
counted skip; never a stack trace."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from common.config import load_config, write_config
from server.cli import main
from tests.conftest import write_jpeg

BIN = Path(sys.executable).parent


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def summary(capsys, tmp_path, fmt, root, *overrides):
    return run(capsys, "data", "summary", "--config", "smoke", f"data.format={fmt}", f"data.root={root}",
               f"data.cache_dir={tmp_path / 'cache'}", "--out", str(tmp_path / "out"), *overrides)


# -- files and folders ---------------------------------------------------------------------------------


def test_names_that_are_not_utf8_are_counted_skips_in_summary_and_pretraining(tmp_path, capsys):
    root = tmp_path / "images"
    for i in range(4):
        write_jpeg(root / "clinic_a" / f"ok{i}.jpg", seed=i)
    write_jpeg(root / "clinic_b" / "ok.jpg", seed=9)
    with open(os.path.join(os.fsencode(root / "clinic_a"), b"bad\xff.jpg"), "wb") as stream:
        stream.write((root / "clinic_a" / "ok0.jpg").read_bytes())
    os.makedirs(os.path.join(os.fsencode(root), b"clinic_\xfe"))
    shutil.copy(root / "clinic_b" / "ok.jpg", os.path.join(os.fsencode(root), b"clinic_\xfe", b"x.jpg"))
    code, out, err = summary(capsys, tmp_path, "folder", root)
    assert code == 0, err
    assert "name is not valid UTF-8" in out and "usable images: 5 in 2 sites; skipped: 2" in out
    assert pd.read_csv(tmp_path / "out" / "skipped.csv")["path"].str.contains(r"\\xff|\\xfe").sum() == 2
    code, _, err = run(capsys, "pretrain", "--config", "smoke", "data.format=folder", f"data.root={root}",
                       f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0", "data.test_fraction=0",
                       "--out", str(tmp_path / "pre"))
    assert code == 0, err


@pytest.mark.parametrize("content", ["nothing", "only text files"])
def test_a_folder_without_images_says_so(tmp_path, capsys, content):
    root = tmp_path / "images"
    root.mkdir()
    if content == "only text files":
        (root / "site").mkdir()
        (root / "site" / "notes.txt").write_text("no images here")
    code, _, err = summary(capsys, tmp_path, "folder", root)
    assert code == 2 and "no image file was found under" in err and str(root) in err
    assert ("1 not an image" in err) == (content == "only text files")


def test_symbolic_links_are_followed_once_and_broken_ones_counted(tmp_path, capsys):
    root, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    for i in range(3):
        write_jpeg(root / "clinic_a" / f"a{i}.jpg", seed=i)
        write_jpeg(elsewhere / "clinic_b" / f"b{i}.jpg", seed=10 + i)
    (root / "clinic_b").symlink_to(elsewhere / "clinic_b", target_is_directory=True)  # a site that is a link
    (root / "clinic_a" / "loop").symlink_to(root / "clinic_a", target_is_directory=True)
    (root / "clinic_a" / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    code, out, err = summary(capsys, tmp_path, "folder", root)
    assert code == 0, err
    assert "usable images: 6 in 2 sites; skipped: 2" in out
    assert "symbolic link loop" in out and "broken symbolic link" in out


def test_a_linked_ham10000_image_folder_is_found(ham_sample, tmp_path, capsys):
    root = tmp_path / "ham"
    root.mkdir()
    shutil.copy(ham_sample / "HAM10000_metadata.csv", root)
    for folder in [p for p in ham_sample.iterdir() if p.is_dir()]:
        (root / folder.name).symlink_to(folder, target_is_directory=True)
    code, out, err = summary(capsys, tmp_path, "ham10000", root)
    assert code == 0, err
    assert "usable images: 705 in 4 sites" in out


# -- metadata -------------------------------------------------------------------------------------------


HAM_HEADER = "lesion_id,image_id,dx,dx_type,age,sex,localization,dataset\n"


def _ham_folder(tmp_path, rows: list[str], images=("ISIC_0000001", "ISIC_0000002", "ISIC_0000003")) -> Path:
    root = tmp_path / "ham"
    for i, image_id in enumerate(images):
        write_jpeg(root / "images" / f"{image_id}.jpg", seed=i)
    (root / "HAM10000_metadata.csv").write_text(HAM_HEADER + "".join(rows))
    return root


def test_a_ham10000_csv_with_a_header_and_no_rows(tmp_path, capsys):
    code, _, err = summary(capsys, tmp_path, "ham10000", _ham_folder(tmp_path, []))
    assert code == 2 and "HAM10000_metadata.csv has a header but no rows" in err


def test_rows_without_a_site_are_counted_skips(tmp_path, capsys):
    rows = ["HAM_1,ISIC_0000001,nv,histo,50,male,back,rosendahl\n", "HAM_2,ISIC_0000002,mel,histo,50,male,back,\n",
            "HAM_3,ISIC_0000003,bkl,histo,50,male,back,rosendahl\n"]
    code, out, err = summary(capsys, tmp_path, "ham10000", _ham_folder(tmp_path, rows))
    assert code == 0, err
    assert "usable images: 2 in 1 sites; skipped: 1" in out and "no site in the metadata" in out


def test_one_image_id_with_two_different_lesions_or_labels_is_an_error_that_lists_it(tmp_path, capsys):
    rows = ["HAM_1,ISIC_0000001,nv,histo,50,male,back,rosendahl\n", "HAM_2,ISIC_0000002,bkl,histo,50,male,back,rosendahl\n",
            "HAM_9,ISIC_0000002,mel,histo,50,male,back,rosendahl\n"]
    code, _, err = summary(capsys, tmp_path, "ham10000", _ham_folder(tmp_path, rows))
    assert code == 2 and "ISIC_0000002" in err and "BKL" in err and "MEL" in err and "ISIC_0000001" not in err


def test_exact_duplicate_rows_are_kept_once_and_counted(tmp_path, capsys):
    row = "HAM_1,ISIC_0000001,nv,histo,50,male,back,rosendahl\n"
    rows = [row, row, "HAM_2,ISIC_0000002,mel,histo,50,male,back,rosendahl\n"]
    code, out, err = summary(capsys, tmp_path, "ham10000", _ham_folder(tmp_path, rows, images=("ISIC_0000001", "ISIC_0000002")))
    assert code == 0, err
    assert "usable images: 2 in 1 sites; skipped: 1" in out and "duplicate metadata row" in out


def _isic_gt(tmp_path, header: str, rows: list[str]) -> Path:
    root = tmp_path / "isic"
    for i in range(2):
        write_jpeg(root / f"ISIC_000000{i}.jpg", seed=i)
    (root / "ISIC2018_Task3_GroundTruth.csv").write_text(header + "".join(rows))
    return root


def test_ground_truth_with_words_for_classes_names_the_row_and_column(tmp_path, capsys):
    root = _isic_gt(tmp_path, "image,MEL,NV\n", ["ISIC_0000000,yes,no\n", "ISIC_0000001,0,1\n"])
    code, _, err = summary(capsys, tmp_path, "isic-gt", root)
    assert code == 2 and "row 2" in err and "'yes'" in err and "'MEL'" in err


def test_ground_truth_without_class_columns(tmp_path, capsys):
    root = _isic_gt(tmp_path, "image\n", ["ISIC_0000000\n", "ISIC_0000001\n"])
    code, _, err = summary(capsys, tmp_path, "isic-gt", root)
    assert code == 2 and "has no class columns" in err


def test_isic2019_metadata_listing_an_image_twice(tmp_path, capsys):
    root = tmp_path / "isic2019"
    columns = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    write_jpeg(root / "ISIC_2019_Training_Input" / "ISIC_0000000.jpg")
    (root / "ISIC_2019_Training_GroundTruth.csv").write_text("image," + ",".join(columns) + "\nISIC_0000000,1" + ",0" * 8 + "\n")
    (root / "ISIC_2019_Training_Metadata.csv").write_text(
        "image,age_approx,anatom_site_general,lesion_id,sex\nISIC_0000000,50,back,BCN_1,male\nISIC_0000000,50,back,BCN_2,male\n")
    code, _, err = summary(capsys, tmp_path, "isic2019", root)
    assert code == 2 and "ISIC_2019_Training_Metadata.csv lists 1 image(s) more than once" in err and "ISIC_0000000" in err


# -- configuration ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("train: [\n", "line 2"),
    ("train:\n\tlr: 0.1\n", "never tabs"),
    ("seed: 0\nseed: 1\n", "key 'seed' appears twice (lines 1 and 2)"),
])
def test_broken_yaml_presets_name_the_file_and_line(tmp_path, capsys, text, expected):
    preset = tmp_path / "preset.yaml"
    preset.write_text(text)
    code, _, err = run(capsys, "config", "--config", str(preset))
    assert code == 2 and str(preset) in err and expected in err


@pytest.mark.parametrize("override, expected", [
    ("train.batch_size=true", "batch_size must be a number, got true"),
    ("train.lr=.inf", "train.lr: Input should be a finite number"),
    ("dp.noise_multiplier=.nan", "finite number"),
    ("data.pretrain_splits=[]", "data.pretrain_splits"),
])
def test_overrides_that_would_be_coerced_or_infinite_are_errors(capsys, override, expected):
    code, _, err = run(capsys, "config", "--config", "smoke", override)
    assert code == 2 and expected in err


def test_pretraining_on_an_empty_split_says_which(tmp_path, capsys, synthetic_root):
    root = tmp_path / "images"
    for i in range(6):
        write_jpeg(root / "site" / f"{i}.jpg", seed=i)
    code, _, err = run(capsys, "pretrain", "--config", "smoke", "data.format=folder", f"data.root={root}",
                       f"data.cache_dir={tmp_path / 'cache'}", "data.pretrain_splits=[test]", "data.test_fraction=0")
    assert code == 2 and "data.pretrain_splits=['test'] selects no image" in err and "test_fraction" in err


def test_options_may_follow_the_overrides(tmp_path, capsys, synthetic_root):
    code, out, err = run(capsys, "data", "summary", "--config", "smoke", f"data.root={synthetic_root}",
                         "--out", str(tmp_path / "out"), f"data.cache_dir={tmp_path / 'cache'}")
    assert code == 0, err
    assert (tmp_path / "out" / "summary.json").is_file()


# -- checkpoints -----------------------------------------------------------------------------------------


@pytest.fixture()
def bad_checkpoints(tmp_path, synthetic_root, capsys):
    good = tmp_path / "good"
    assert main(["pretrain", "--config", "smoke", "--out", str(good), f"data.root={synthetic_root}",
                 f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=1"]) == 0
    capsys.readouterr()
    files = {"truncated": tmp_path / "truncated.pt", "empty": tmp_path / "empty.pt", "foreign": tmp_path / "foreign.pt"}
    files["truncated"].write_bytes((good / "checkpoint.pt").read_bytes()[:5000])
    files["empty"].write_bytes(b"")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, files["foreign"])
    return files


EXPECTED_CHECKPOINT_ERRORS = {"truncated": "not a readable DermFed checkpoint", "empty": "is empty (0 bytes)",
                              "foreign": "is not a dermfed-checkpoint-v1 file"}


@pytest.mark.parametrize("kind", ["truncated", "empty", "foreign"])
def test_bad_checkpoints_given_to_evaluate_initial_checkpoint_and_resume(bad_checkpoints, tmp_path, capsys,
                                                                         synthetic_root, kind):
    path = bad_checkpoints[kind]
    common = [f"data.root={synthetic_root}", f"data.cache_dir={tmp_path / 'cache'}"]
    code, _, err = run(capsys, "evaluate", "--config", "smoke", "--checkpoint", str(path), "--out",
                       str(tmp_path / "eval"), *common)
    assert code == 2 and str(path) in err and EXPECTED_CHECKPOINT_ERRORS[kind] in err
    code, _, err = run(capsys, "simulate", "--config", "smoke", "--out", str(tmp_path / "sim"), *common,
                       f"federation.initial_checkpoint={path}")
    assert code == 2 and EXPECTED_CHECKPOINT_ERRORS[kind] in err
    assert not (tmp_path / "sim" / ".flower").exists()  # refused before any process started
    run_dir = tmp_path / "interrupted"
    write_config(load_config("smoke", common), run_dir)
    shutil.copy(path, run_dir / "checkpoint.pt")
    code, _, err = run(capsys, "simulate", "--resume", str(run_dir))
    assert code == 2 and EXPECTED_CHECKPOINT_ERRORS[kind] in err


def test_no_stack_trace_reaches_the_user_and_verbose_shows_it(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("train: [\n")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    quiet = subprocess.run([str(BIN / "dermfed"), "config", "--config", str(preset)], capture_output=True, text=True,
                           env=env)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr and len(quiet.stderr.strip().splitlines()) == 1
    verbose = subprocess.run([str(BIN / "dermfed"), "config", "-v", "--config", str(preset)], capture_output=True,
                             text=True, env=env)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr
