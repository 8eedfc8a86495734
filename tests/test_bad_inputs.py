"""The bad-input corpus: real files, folders, metadata, configs and checkpoints that users and hospital IT
really produce. Each gets a one-line message that names the file, row or key (exit code 2), or a
counted skip; never a stack trace, never a signal, never a silently wrong result.

The first sections are the original corpus; `CASES` below is issue 20's (inputs a new user tried), one row per
input with the message fragments its one line must hold; then the full disk, and signals at any moment. Cases
that are about the process itself (permissions, a closed pipe, a SIGBUS, a signal) run the real `dermfed`
executable; the others call its `main` in this process (the same code, without the start-up cost)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import pytest
import torch

from common.config import load_config, write_config
from server.cli import main
from tests.conftest import write_jpeg

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


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


def test_a_link_to_a_folder_holding_the_root_is_a_counted_skip(tmp_path, capsys):
    """`rootlink -> /` inside a site: the walk read the whole file system (and called what it found images)."""
    root = tmp_path / "images"
    for i in range(2):
        write_jpeg(root / "clinic_a" / f"a{i}.jpg", seed=i)
    write_jpeg(tmp_path / "beside.jpg", seed=9)  # in the parent folder: found through `parent`, never read
    (root / "clinic_a" / "rootlink.jpg").symlink_to("/", target_is_directory=True)
    (root / "clinic_a" / "parent").symlink_to(tmp_path, target_is_directory=True)
    code, out, err = summary(capsys, tmp_path, "folder", root)
    assert code == 0, err
    assert "usable images: 2 in 1 sites; skipped: 2" in out, out
    assert re.search(r"^link leads outside data.root\s+2$", out, re.MULTILINE), out


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


# -- issue 20's corpus: one row per input ------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """`make(tmp, synthetic_root)` writes the input under the test's folder and returns dermfed's arguments."""

    make: Callable[[Path, Path], list[str]]
    code: int
    fragments: tuple[str, ...]  # in the last line of stderr (an error), or anywhere in the output (a success)
    check: Optional[Callable[[Path, str, str], None]] = None  # more to assert on what was left on disk
    process: bool = False  # the real `dermfed` executable (its own exit code, permissions, pipes)
    no_dac: bool = False  # as root without CAP_DAC_OVERRIDE: file permissions apply as to any other user


def _summary_args(tmp: Path, fmt: str, root: Path, *overrides: str) -> list[str]:
    return ["data", "summary", "--config", "smoke", f"data.format={fmt}", f"data.root={root}",
            f"data.cache_dir={tmp / 'cache'}", "--out", str(tmp / "out"), *overrides]


def _ham(tmp: Path, rows: list[str], header: str = HAM_HEADER, n_images: int = 3) -> Path:
    root = tmp / "ham"
    for i in range(n_images):
        write_jpeg(root / "images" / f"ISIC_000000{i + 1}.jpg", seed=i)
    (root / "HAM10000_metadata.csv").write_text(header + "".join(rows))
    return root


SPLIT_HEADER = HAM_HEADER.strip() + ",split\n"


def _ham_split(tmp: Path, splits: tuple[str, str, str], lesions: tuple[str, str, str] = ("HAM_1", "HAM_1", "HAM_3")):
    rows = [f"{lesion},ISIC_000000{i + 1},nv,histo,50,male,back,rosendahl,{split}\n"
            for i, (lesion, split) in enumerate(zip(lesions, splits))]
    return _summary_args(tmp, "ham10000", _ham(tmp, rows, SPLIT_HEADER))


def _synthetic_with_split(tmp: Path, synthetic_root: Path, row: int, value: str) -> list[str]:
    root = tmp / "synthetic"
    shutil.copytree(synthetic_root, root)
    frame = pd.read_csv(root / "synthetic_metadata.csv", dtype=str)
    frame.loc[row, "split"] = value
    frame.to_csv(root / "synthetic_metadata.csv", index=False)
    return _summary_args(tmp, "synthetic", root)


def _trailing_space(tmp: Path, _: Path) -> list[str]:
    rows = ["HAM_1,ISIC_0000001,nv,histo,50,male,back,rosendahl \n", "HAM_2,ISIC_0000002,mel,histo,50,male,back,rosendahl\n",
            "HAM_3,ISIC_0000003,bkl,histo,50,male,back, rosendahl\n"]
    return _summary_args(tmp, "ham10000", _ham(tmp, rows))


def _two_unicode_forms(tmp: Path, _: Path) -> list[str]:
    rows = ["HAM_1,ISIC_0000001,nv,histo,50,male,back,r\u00f6sendahl\n", "HAM_2,ISIC_0000002,mel,histo,50,male,back,ro\u0308sendahl\n",
            "HAM_3,ISIC_0000003,bkl,histo,50,male,back,r\u00f6sendahl\n"]
    return _summary_args(tmp, "ham10000", _ham(tmp, rows))


def _repeated_header_column(tmp: Path, _: Path) -> list[str]:
    rows = [f"HAM_{i},ISIC_000000{i},nv,histo,50,male,back,rosendahl,vidir_modern\n" for i in (1, 2, 3)]
    return _summary_args(tmp, "ham10000", _ham(tmp, rows, HAM_HEADER.strip() + ",dataset\n"))


def _misnamed_lesion_groupings(tmp: Path, _: Path) -> list[str]:
    args = _numeric_names(tmp, _)
    (tmp / "isic" / "ISIC2018_LesionGroupings.csv").write_text("image,lesion\n0001,L1\n0002,L2\n")
    return args


def _thumbnail_copy(tmp: Path, _: Path) -> list[str]:
    rows = [f"HAM_{i},ISIC_000000{i},nv,histo,50,male,back,rosendahl\n" for i in (1, 2, 3)]
    root = _ham(tmp, rows)
    write_jpeg(root / "thumbs" / "ISIC_0000001.jpg", (40, 40), seed=7)  # walks before images/ would pick it
    return _summary_args(tmp, "ham10000", root)


def _two_metadata_files(tmp: Path, _: Path) -> list[str]:
    rows = [f"HAM_{i},ISIC_000000{i},nv,histo,50,male,back,rosendahl\n" for i in (1, 2, 3)]
    root = _ham(tmp, rows)
    (root / "HAM10000_metadata.csv").rename(tmp / "full.csv")
    (root / "a").mkdir()
    shutil.copy(tmp / "full.csv", root / "a" / "HAM10000_metadata.csv")
    (root / "backup").mkdir()
    (root / "backup" / "HAM10000_metadata.csv").write_text(HAM_HEADER + rows[0])  # a one-row backup
    return _summary_args(tmp, "ham10000", root)


def _numeric_names(tmp: Path, _: Path) -> list[str]:
    root = tmp / "isic"
    for name in ("0001", "0002"):
        write_jpeg(root / f"{name}.jpg", seed=int(name))
    (root / "Task3_GroundTruth.csv").write_text("image,MEL,NV\n0001,1,0\n0002,0,1\n")
    return _summary_args(tmp, "isic-gt", root)


def _two_lesion_groupings(tmp: Path, _: Path) -> list[str]:
    args = _numeric_names(tmp, _)
    for name in ("LesionGroupings.csv", "old/LesionGroupings.csv"):
        (tmp / "isic" / name).parent.mkdir(exist_ok=True)
        (tmp / "isic" / name).write_text("image,lesion_id\n0001,L1\n0002,L2\n")
    return args


def _a_file(tmp: Path, name: str = "a-file") -> Path:
    (tmp / name).write_text("I am a file")
    return tmp / name


def _synthetic_args(tmp: Path, synthetic_root: Path, *overrides: str) -> list[str]:
    return ["data", "summary", "--config", "smoke", f"data.root={synthetic_root}", f"data.cache_dir={tmp / 'cache'}",
            "--out", str(tmp / "out"), *overrides]


def _out_is_a_file(tmp: Path, synthetic_root: Path) -> list[str]:
    return [*_synthetic_args(tmp, synthetic_root)[:-2], "--out", str(_a_file(tmp))]


def _out_under_a_file(tmp: Path, synthetic_root: Path) -> list[str]:
    return [*_synthetic_args(tmp, synthetic_root)[:-2], "--out", str(_a_file(tmp) / "run")]


def _cache_dir_is_a_file(tmp: Path, synthetic_root: Path) -> list[str]:
    return _synthetic_args(tmp, synthetic_root, f"data.cache_dir={_a_file(tmp)}")


def _unreadable_csv(tmp: Path, _: Path) -> list[str]:
    args = _trailing_space(tmp, _)
    (tmp / "ham" / "HAM10000_metadata.csv").chmod(0)
    return args


def _unwritable(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    return folder


def _out_not_writable(tmp: Path, synthetic_root: Path) -> list[str]:
    return [*_synthetic_args(tmp, synthetic_root)[:-2], "--out", str(_unwritable(tmp / "locked") / "run")]


def _default_cache_not_writable(tmp: Path, synthetic_root: Path) -> list[str]:
    _unwritable(tmp / "workdir")  # the process runs there: data.cache_dir=.cache/dermfed is relative to it
    return ["data", "summary", "--config", "smoke", f"data.root={synthetic_root}", "--out", str(tmp / "out")]


def _unreadable_image(tmp: Path, _: Path) -> list[str]:
    for i in range(3):
        write_jpeg(tmp / "images" / "clinic" / f"{i}.jpg", seed=i)
    (tmp / "images" / "clinic" / "0.jpg").chmod(0)
    return _summary_args(tmp, "folder", tmp / "images")


def _built_cache(tmp: Path, synthetic_root: Path) -> Path:
    # a first summary in a folder of its own: the case's summary may not write over a finished one (issue 18)
    assert main([*_synthetic_args(tmp, synthetic_root)[:-1], str(tmp / "first-summary")]) == 0
    (folder,) = [p for p in (tmp / "cache").iterdir() if not p.name.startswith(".")]
    return folder


def _truncated_cache(tmp: Path, synthetic_root: Path) -> list[str]:
    images = _built_cache(tmp, synthetic_root) / "images.npy"
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    return _synthetic_args(tmp, synthetic_root)


def _torn_status(tmp: Path, synthetic_root: Path) -> list[str]:
    status = _built_cache(tmp, synthetic_root) / "status.json"
    status.write_text(status.read_text()[:40])
    return _synthetic_args(tmp, synthetic_root)


def _cache_was_rebuilt(tmp: Path, out: str, err: str) -> None:
    (folder,) = [p for p in (tmp / "cache").iterdir() if not p.name.startswith(".")]
    assert folder.name in err  # the warning names the folder
    config = load_config("smoke")
    rows = len(json.loads((folder / "status.json").read_text())["paths"])
    assert np.load(folder / "images.npy", mmap_mode="r").shape == (rows, config.data.image_size, config.data.image_size, 3)


def _evaluate_with_weights(tmp: Path, weights: Path) -> list[str]:
    return ["evaluate", "--config", "smoke", "--checkpoint", str(tmp / "unused"), "--imagenet-weights", str(weights),
            "--out", str(tmp / "eval")]


def _weights_text(tmp: Path, _: Path) -> list[str]:
    (tmp / "weights.txt").write_text("convnext_tiny weights are on the Hub\n")
    return _evaluate_with_weights(tmp, tmp / "weights.txt")


def _weights_jpeg(tmp: Path, _: Path) -> list[str]:
    return _evaluate_with_weights(tmp, write_jpeg(tmp / "convnext_tiny.jpg"))


def _weights_dermfed_checkpoint(tmp: Path, _: Path) -> list[str]:
    from common.checkpoint import save_checkpoint

    save_checkpoint(tmp / "checkpoint.pt", config=load_config("smoke"), encoder_state={"w": torch.zeros(2)},
                    position={"epoch": 1}, history=[])
    return _evaluate_with_weights(tmp, tmp / "checkpoint.pt")


def _weights_of_another_architecture(tmp: Path, _: Path) -> list[str]:
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("convnext_atto", num_classes=0).state_dict(), tmp / "model.safetensors")
    return _evaluate_with_weights(tmp, tmp / "model.safetensors")


def _no_process_started(tmp: Path, out: str, err: str) -> None:
    assert not (tmp / "sim" / ".flower").exists()


def _simulate_args(tmp: Path, synthetic_root: Path, *overrides: str) -> list[str]:
    return ["simulate", "--config", "smoke", f"data.root={synthetic_root}", f"data.cache_dir={tmp / 'cache'}",
            "--out", str(tmp / "sim"), *overrides]


def _split_counts(expected: dict[str, int]) -> Callable[[Path, str, str], None]:
    def check(tmp: Path, out: str, err: str) -> None:
        for split, count in expected.items():
            assert re.search(rf"^{split}\s+{count}$", out, re.MULTILINE), out
    return check


def _pretrain_folder(tmp: Path, synthetic_root: Path) -> Path:
    """What `dermfed pretrain` leaves (config.yaml, a checkpoint at epoch 2), without training."""
    from common.checkpoint import save_checkpoint

    folder = tmp / "pre"
    config = load_config("smoke", [f"data.root={synthetic_root}", f"data.cache_dir={tmp / 'cache'}"])
    write_config(config, folder)
    save_checkpoint(folder / "checkpoint.pt", config=config, encoder_state={"w": torch.zeros(2)},
                    position={"epoch": 2, "step": 6}, history=[])
    return folder


def _resume_a_pretrain_run(tmp: Path, synthetic_root: Path) -> list[str]:
    return ["simulate", "--resume", str(_pretrain_folder(tmp, synthetic_root))]


def _resume_a_summary(tmp: Path, synthetic_root: Path) -> list[str]:
    assert main(_summary_args(tmp, "synthetic", synthetic_root)) == 0
    return ["simulate", "--resume", str(tmp / "out")]


def _evaluate_into(tmp: Path, synthetic_root: Path, out: str) -> list[str]:
    _pretrain_folder(tmp, synthetic_root)
    (tmp / "pre" / "history.json").write_text("[]")
    return ["evaluate", "--config", "smoke", f"data.root={synthetic_root}", f"data.cache_dir={tmp / 'cache'}",
            "--checkpoint", str(tmp / "pre"), "--out", str(tmp / out)]


def _evaluate_into_another_checkpoint_folder(tmp: Path, synthetic_root: Path) -> list[str]:
    argv = _evaluate_into(tmp, synthetic_root, "other")
    shutil.copytree(tmp / "pre", tmp / "other")
    return argv


def _pretrain_config_kept(tmp: Path, out: str, err: str) -> None:
    assert not (tmp / "pre" / "metrics.json").exists() and load_config(tmp / "pre" / "config.yaml").data.root


def _summary_into_a_pretrain_run(tmp: Path, synthetic_root: Path) -> list[str]:
    _pretrain_folder(tmp, synthetic_root)
    return [*_summary_args(tmp, "synthetic", synthetic_root)[:-1], str(tmp / "pre")]


def _pretrain_into_a_summary(tmp: Path, synthetic_root: Path) -> list[str]:
    assert main(_summary_args(tmp, "synthetic", synthetic_root)) == 0
    return ["pretrain", "--config", "smoke", f"data.root={synthetic_root}", f"data.cache_dir={tmp / 'cache'}",
            "--out", str(tmp / "out")]


def _nothing_written_into(name: str) -> Callable[[Path, str, str], None]:
    def check(tmp: Path, out: str, err: str) -> None:
        assert not (tmp / name / ".run.lock").exists() and not (tmp / name / ".flower").exists()
    return check


CASES: dict[str, Case] = {
    # metadata: columns, values and names
    "a split column with a lesion on two sides": Case(
        lambda tmp, _: _ham_split(tmp, ("train", "test", "val")), 2,
        ("1 lesion(s) lie on two sides of the `split` column", "HAM_1 (test/train)")),
    "a split column with an empty value": Case(
        lambda tmp, _: _ham_split(tmp, ("train", "", "val"), ("HAM_1", "HAM_2", "HAM_3")), 2,
        ("must hold train, val or test", "row 3 (empty)")),
    "a split typo (Test) in the synthetic metadata": Case(
        lambda tmp, root: _synthetic_with_split(tmp, root, 3, "Test"), 2, ("synthetic_metadata.csv", "row 5 ('Test')")),
    "a valid split column is the split": Case(
        lambda tmp, _: _ham_split(tmp, ("train", "train", "test")), 0, ("usable images: 3 in 1 sites",),
        check=_split_counts({"test": 1, "train": 2})),
    "site names with surrounding spaces are one site": Case(
        _trailing_space, 0, ("usable images: 3 in 1 sites", "rosendahl")),
    "one site name typed in two Unicode forms is one site": Case(
        _two_unicode_forms, 0, ("usable images: 3 in 1 sites",)),
    "a header column given twice": Case(_repeated_header_column, 2, ("names column(s) ['dataset'] twice",)),
    "a lesion-grouping file without image and lesion_id": Case(
        _misnamed_lesion_groupings, 2, ("ISIC2018_LesionGroupings.csv looks like a lesion-grouping file", "lesion_id")),
    "an unknown encoder": Case(
        lambda tmp, _: ["config", "--config", "smoke", "model.encoder=convnext_doesnotexist"], 2,
        ("model.encoder: not a ConvNeXt architecture of timm", "did you mean convnext_tiny", "convnext_atto")),
    # ambiguity
    "an image id with a second file (thumbs/)": Case(
        _thumbnail_copy, 2, ("1 image id(s) match more than one file", "ISIC_0000001: images/ISIC_0000001.jpg, "
                                                                         "thumbs/ISIC_0000001.jpg")),
    "two metadata files of the default name": Case(
        _two_metadata_files, 2, ("2 files named HAM10000_metadata.csv", "a/HAM10000_metadata.csv",
                                 "backup/HAM10000_metadata.csv", "data.metadata_csv=PATH")),
    "two lesion-grouping files": Case(
        _two_lesion_groupings, 2, ("2 lesion-grouping CSVs", "old/LesionGroupings.csv")),
    "image names that look like numbers keep their zeros": Case(
        _numeric_names, 0, ("usable images: 2 in 1 sites; skipped: 0",)),
    # files and folders
    "--out is a file": Case(_out_is_a_file, 2, ("a-file: exists already, and is not a folder",)),
    "--out lies under a file": Case(_out_under_a_file, 2, ("a-file/run: a part of this path is a file, not a folder",)),
    "data.cache_dir is a file": Case(_cache_dir_is_a_file, 2, ("data.cache_dir=", "a-file", "a file is in the way")),
    "an unreadable metadata CSV": Case(
        _unreadable_csv, 2, ("ham/HAM10000_metadata.csv: permission denied",), process=True, no_dac=True),
    "an --out without write permission": Case(
        _out_not_writable, 2, ("locked/run: permission denied",), process=True, no_dac=True),
    "a default .cache without write permission": Case(
        _default_cache_not_writable, 2, ("data.cache_dir=.cache/dermfed", "permission denied"), process=True,
        no_dac=True),
    "an unreadable image is counted as such": Case(
        _unreadable_image, 0, ("usable images: 2 in 1 sites; skipped: 1", "permission denied (the file is not readable"),
        process=True, no_dac=True),
    # the preprocessing cache
    "a truncated images.npy is rebuilt": Case(
        _truncated_cache, 0, ("is unusable (images.npy is truncated or damaged", "rebuilding it"), check=_cache_was_rebuilt,
        process=True),
    "a torn status.json is rebuilt": Case(
        _torn_status, 0, ("is unusable (status.json is not valid JSON", "rebuilding it"), check=_cache_was_rebuilt,
        process=True),
    # weights files
    "--imagenet-weights is a text file": Case(_weights_text, 2, ("weights.txt is a text file, not a weights file",)),
    "--imagenet-weights is a JPEG": Case(_weights_jpeg, 2, ("is an image (JPEG 80x60), not a weights file",)),
    "--imagenet-weights is a DermFed checkpoint": Case(
        _weights_dermfed_checkpoint, 2, ("is a DermFed checkpoint (convnext_atto", "--pooled or --local")),
    "--imagenet-weights of another architecture": Case(
        _weights_of_another_architecture, 2, ("is a safetensors file whose weights do not fit convnext_tiny",)),
    # partitions
    "a Dirichlet hospital with one image": Case(
        lambda tmp, root: _simulate_args(tmp, root, "data.partition=dirichlet", "data.num_partitions=8"), 2,
        ("part-1", "hold too few images", "part-1 1 (0 for pretraining)", "train.batch_size=8"),
        check=_no_process_started),
    "one hospital and federation.min_clients=2": Case(
        lambda tmp, root: _simulate_args(tmp, root, "data.partition=iid", "data.num_partitions=1"), 2,
        ("makes 1 hospital(s) (part-0) but federation.min_clients=2",), check=_no_process_started),
    "a misspelt --node-config key": Case(
        lambda tmp, root: [*_simulate_args(tmp, root), "--node-config", "hospital_1:dp-enable=true"], 2,
        ("unknown node config key 'dp-enable'", "did you mean dp-enabled"), check=_no_process_started),
    # run folders of another kind
    "--resume of a pretrain run": Case(
        _resume_a_pretrain_run, 2, ("pre holds a `dermfed pretrain` checkpoint (epoch 2), not a simulation run",
                                    "start a new run"), check=_nothing_written_into("pre")),
    "--resume of a data summary": Case(
        _resume_a_summary, 2, ("holds a `dermfed data summary`, not a simulation run",),
        check=_nothing_written_into("out")),
    "evaluate --out the --checkpoint run": Case(
        lambda tmp, root: _evaluate_into(tmp, root, "pre"), 2,
        ("--out", "pre lies in the --checkpoint run", "choose another --out"), check=_pretrain_config_kept),
    "evaluate --out inside the --checkpoint run": Case(
        lambda tmp, root: _evaluate_into(tmp, root, "pre/eval"), 2, ("pre/eval lies in the --checkpoint run",)),
    "evaluate --out a folder holding a checkpoint.pt": Case(
        _evaluate_into_another_checkpoint_folder, 2, ("other holds a checkpoint.pt",)),
    "data summary --out a pretrain run": Case(
        _summary_into_a_pretrain_run, 2, ("pre holds a `dermfed pretrain` checkpoint (epoch 2), not a `dermfed data "
                                          "summary` run",), check=_pretrain_config_kept),
    "pretrain --out a data summary": Case(
        _pretrain_into_a_summary, 2, ("out holds a `dermfed data summary`, not a `dermfed pretrain` run",)),
}


def _permissions_apply() -> Optional[str]:
    """Why file permissions cannot be tested here, or None. Root ignores them unless CAP_DAC_OVERRIDE is dropped."""
    if os.geteuid() != 0:
        return None
    if not shutil.which("setpriv"):
        return "running as root without setpriv (util-linux): cannot drop CAP_DAC_OVERRIDE"
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"dermfed-permission-probe-{os.getpid()}"
    probe.write_text("x")
    probe.chmod(0)
    try:
        readable = subprocess.run([*NO_DAC, "cat", str(probe)], capture_output=True).returncode == 0
    finally:
        probe.unlink()
    return "dropping CAP_DAC_OVERRIDE with setpriv does not make permissions apply here" if readable else None


NO_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


def dermfed_process(argv: list[str], cwd: Path, no_dac: bool = False, **kwargs) -> subprocess.CompletedProcess:
    prefix = NO_DAC if no_dac and os.geteuid() == 0 else []
    return subprocess.run([*prefix, str(BIN / "dermfed"), *argv], cwd=cwd, env=ENV, text=True, timeout=600, **kwargs)


@pytest.mark.parametrize("name", list(CASES))
def test_issue_20_corpus(name, tmp_path, synthetic_root, capsys):
    case = CASES[name]
    if case.no_dac and (why := _permissions_apply()):
        pytest.skip(why)
    argv = case.make(tmp_path, synthetic_root)
    if case.process:
        workdir = tmp_path / "workdir"
        workdir.mkdir(exist_ok=True)
        done = dermfed_process(argv, workdir, case.no_dac, capture_output=True)
        code, out, err = done.returncode, done.stdout, done.stderr
    else:
        code, out, err = run(capsys, *argv)
    assert code == case.code, err[-3000:]
    assert "Traceback" not in err and "unexpected error" not in err
    if code:
        last = err.strip().splitlines()[-1]
        assert last.startswith("dermfed"), err
        assert all(fragment in last for fragment in case.fragments), last
    else:
        assert all(fragment in out + err for fragment in case.fragments), out + err
    if case.check:
        case.check(tmp_path, out, err)


def test_a_closed_standard_output_ends_quietly(tmp_path):
    """`dermfed config --flat | head -1`: the reader is gone before dermfed writes; no BrokenPipeError."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = dermfed_process(["config", "--config", "smoke", "--flat"], tmp_path, stdout=writer, stderr=subprocess.PIPE)
    finally:
        os.close(writer)
    assert done.returncode == 141 and done.stderr == "", done.stderr


# -- a full disk -----------------------------------------------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path):
    """A real, small file system (tmpfs) of the given size, mounted for the test; needs root with CAP_SYS_ADMIN."""
    mounted: list[Path] = []

    def mount(size_kib: int, options: str = "") -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k{options}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_cache_too_big_for_its_disk_is_refused_before_building(small_disk, tmp_path, synthetic_root):
    """The old cache wrote through a memory map: on a full disk `dermfed data summary` died of SIGBUS (-7)."""
    disk = small_disk(96)
    done = dermfed_process(_synthetic_args(tmp_path, synthetic_root, f"data.cache_dir={disk / 'cache'}"), tmp_path,
                           capture_output=True)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    last = done.stderr.strip().splitlines()[-1]
    assert "MiB are free" in last and str(disk / "cache") in last and "data.use_cache=false" in last
    assert not list((disk / "cache").glob(".building-*"))


def test_a_disk_that_fills_while_the_cache_is_written_leaves_nothing(small_disk, tmp_path, synthetic_root, capsys,
                                                                      monkeypatch):
    """The disk fills during the build (another writer took the room the check saw): a message, no staging folder.
    (Checked on the new code only: the old code dies of SIGBUS here, which would end the test process.)"""
    import common.data.cache as cache_module

    disk = small_disk(64)
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**30, 0, 2**30))
    code, _, err = run(capsys, *_synthetic_args(tmp_path, synthetic_root, f"data.cache_dir={disk / 'cache'}"))
    assert code == 2 and "the disk is full" in err and str(disk / "cache") in err
    assert not list((disk / "cache").glob(".building-*")) and not list((disk / "cache").iterdir())


def test_a_run_folder_on_a_full_disk_is_a_message_and_leaves_no_partial_file(small_disk, tmp_path, synthetic_root,
                                                                               capsys):
    disk = small_disk(512)  # room for config.yaml, not for a checkpoint
    code, _, err = run(capsys, "pretrain", "--config", "smoke", f"data.root={synthetic_root}",
                       f"data.cache_dir={tmp_path / 'cache'}", "--out", str(disk / "run"))
    assert code == 2, err
    assert f"{disk / 'run' / 'checkpoint.pt'}: no space left on the device" in err.strip().splitlines()[-1]
    assert sorted(p.name for p in (disk / "run").iterdir()) == ["config.yaml"]  # no temporary or torn file


def test_synthetic_data_on_a_full_disk_names_the_folder(small_disk, capsys):
    out = small_disk(40) / "synthetic"
    code, _, err = run(capsys, "data", "synth", "--config", "smoke", "--out", str(out))
    assert code == 2 and f"{out}: no space left on the device" in err.strip().splitlines()[-1], err


def test_a_checkpoint_that_cannot_be_written_keeps_the_last_round_and_its_history(small_disk):
    """What the ServerApp records after each round (RunRecorder): a full disk must leave round 1 whole, and
    history.json must not claim round 2, whose checkpoint was never written."""
    from common.checkpoint import PREVIOUS_NAME, load_checkpoint
    from server.rounds import RunRecorder, load_resume_point

    run_dir = small_disk(1024)
    recorder = RunRecorder(run_dir, load_config("smoke"))
    recorder.record(1)
    recorder.finish(1, {"encoder.w": torch.ones(1000)}, {})
    history_before = (run_dir / "history.json").read_bytes()
    (run_dir / "filler").write_bytes(b"\0" * (shutil.disk_usage(run_dir).free - 64 * 1024))
    recorder.record(2)
    with pytest.raises(OSError) as failure:
        recorder.finish(2, {"encoder.w": torch.full((100_000,), 2.0)}, {})
    assert failure.value.filename == str(run_dir / "checkpoint.pt")
    assert load_checkpoint(run_dir)["position"]["round"] == 1 and not (run_dir / PREVIOUS_NAME).exists()
    assert (run_dir / "history.json").read_bytes() == history_before
    assert load_resume_point(run_dir)["round"] == 1
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_read_only_run_folder_is_a_message(small_disk, tmp_path, synthetic_root, capsys):
    disk = small_disk(256, ",ro")
    code, _, err = run(capsys, *_synthetic_args(tmp_path, synthetic_root)[:-2], "--out", str(disk / "run"))
    assert code == 2 and f"{disk / 'run'}: is on a read-only file system" in err.strip().splitlines()[-1]


# -- signals at any moment -------------------------------------------------------------------------------------


class Watched:
    """A real `dermfed` process whose output is read as it comes (threads drain both pipes: no pipe fills up)."""

    def __init__(self, argv: list[str], cwd: Path):
        self.process = subprocess.Popen([str(BIN / "dermfed"), *argv], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=lambda s=stream, lines=lines: lines.extend(iter(s.readline, "")),
                                         daemon=True)
                        for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    def printed(self, text: str) -> Callable[[], bool]:
        return lambda: any(text in line for line in list(self.out))

    def loads(self, library: str) -> Callable[[], bool]:
        def check() -> bool:
            try:
                return library in Path(f"/proc/{self.process.pid}/maps").read_text()
            except OSError:
                return False
        return check

    def when(self, condition: Callable[[], bool], what: str, ceiling: float = 600.0) -> None:
        """Wait for `condition` (no fixed sleep decides anything); the process must still be running then."""
        deadline = time.monotonic() + ceiling
        while not condition():
            assert self.process.poll() is None, f"ended ({self.process.returncode}) before {what}: {''.join(self.err)[-2000:]}"
            assert time.monotonic() < deadline, f"{what}: not within {ceiling:.0f} s"
            time.sleep(0.02)

    def interrupted(self, sig: int = signal.SIGTERM) -> str:
        """Send `sig`: the process must end with 130 and, as its last line, one saying so; returns that line."""
        self.process.send_signal(sig)
        code = self.process.wait(timeout=600)
        for reader in self.readers:
            reader.join(timeout=60)
        err = "".join(self.err)
        assert code == 130, (code, err[-3000:])
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert last.startswith("dermfed") and f"interrupted by {signal.Signals(sig).name}" in last, err[-3000:]
        return last


def _run_processes(run_dir: Path) -> list[int]:
    """Live processes whose command line or open files mention the run folder (the SuperLink's database, ...)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if str(run_dir) in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") or any(
                    os.readlink(fd).startswith(str(run_dir)) for fd in (entry / "fd").iterdir()):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_simulate_interrupted_while_it_imports(tmp_path, synthetic_root):
    cli = Watched(_simulate_args(tmp_path, synthetic_root), tmp_path)
    cli.when(cli.loads("libtorch_cpu"), "torch being loaded")
    assert "--resume" not in cli.interrupted()


@pytest.mark.slow
def test_simulate_interrupted_while_it_prepares_the_data(tmp_path):
    cli = Watched(["simulate", "--config", "smoke", f"data.root={tmp_path / 'data'}", f"data.cache_dir={tmp_path / 'c'}",
                   "--out", str(tmp_path / "sim")], tmp_path)
    cli.when(lambda: any((tmp_path / "data" / "images").glob("*.jpg")), "the synthetic data being written")
    assert "--resume" not in cli.interrupted(signal.SIGINT)


@pytest.mark.slow
def test_simulate_interrupted_before_its_first_round_completed(tmp_path, synthetic_root):
    run_dir = tmp_path / "sim"
    cli = Watched(_simulate_args(tmp_path, synthetic_root), tmp_path)
    cli.when(lambda: (run_dir / ".flower" / "superlink.log").is_file(), "the SuperLink started")
    last = cli.interrupted()
    assert "no round had completed, so there is nothing to resume" in last and "--resume" not in last
    assert not [pid for pid in _run_processes(run_dir) if pid != cli.process.pid]


@pytest.fixture()
def big_images(tmp_path) -> Path:
    """Two sites of large photographs: decoding them keeps the cache build busy for a few seconds."""
    rng = np.random.default_rng(0)
    from PIL import Image

    base = rng.integers(0, 256, (1500, 1500, 3), dtype=np.uint8)
    for site in ("clinic_a", "clinic_b"):
        (tmp_path / "big" / site).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(np.roll(base, 37 * i, axis=0)).save(tmp_path / "big" / site / f"{i}.jpg", quality=95)
    return tmp_path / "big"


@pytest.mark.slow
def test_pretrain_interrupted_while_the_cache_is_built_leaves_no_half_built_cache(tmp_path, big_images):
    cache = tmp_path / "cache"
    cli = Watched(["pretrain", "--config", "smoke", "data.format=folder", f"data.root={big_images}",
                   f"data.cache_dir={cache}", "--out", str(tmp_path / "run")], tmp_path)
    cli.when(lambda: any(cache.glob(".building-*")), "the cache build started")
    assert "pretrain" in cli.interrupted()
    assert not list(cache.iterdir())


@pytest.mark.slow
def test_pretrain_interrupted_while_it_trains_keeps_a_whole_checkpoint(tmp_path, synthetic_root):
    from common.checkpoint import load_checkpoint

    cli = Watched(["pretrain", "--config", "smoke", f"data.root={synthetic_root}", f"data.cache_dir={tmp_path / 'c'}",
                   "train.max_steps=null", "train.epochs=1000", "--out", str(tmp_path / "run")], tmp_path)
    cli.when(cli.printed("epoch 2:"), "epoch 2 trained")  # and its checkpoint being written, or just written
    cli.interrupted()
    assert load_checkpoint(tmp_path / "run")["position"]["epoch"] in (1, 2)  # whole, whichever epoch it holds
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temporary file


@pytest.mark.slow
def test_evaluate_interrupted_while_it_evaluates(tmp_path, synthetic_root, capsys):
    common = [f"data.root={synthetic_root}", f"data.cache_dir={tmp_path / 'c'}"]
    assert main(["pretrain", "--config", "smoke", *common, "train.max_steps=1", "--out", str(tmp_path / "pre")]) == 0
    cli = Watched(["evaluate", "--config", "smoke", *common, "--checkpoint", str(tmp_path / "pre"),
                   "--out", str(tmp_path / "eval")], tmp_path)
    cli.when(cli.printed("evaluating"), "an arm being evaluated")
    assert "evaluate" in cli.interrupted()


@pytest.mark.parametrize("argv, says", [
    (["simulate", "--config", "smoke", "--stop-after-round", "-3"], "rounds are counted from 1"),
    (["simulate", "--config", "smoke", "--stop-after-round", "0"], "rounds are counted from 1"),
    (["simulate", "--config", "smoke", "--stop-after-round", "9"], "this run has 2 rounds"),
    (["deploy", "init", "--config", "smoke", "--port", "0"], "is not a port number"),
    (["deploy", "init", "--config", "smoke", "--port", "99999"], "is not a port number"),
])
def test_out_of_range_numbers_are_refused_when_typed(capsys, tmp_path, argv, says):
    """Found by review: `--stop-after-round -3` ran 0 rounds and printed a checkpoint that did not exist, `0` ran
    them all; a port of 0 or 99999 was written into the federation, to fail only when the daemons start."""
    try:
        code = main([*argv, "--out", str(tmp_path / "out"), f"data.root={tmp_path / 'data'}"])
    except SystemExit as exited:  # argparse's own exit, after one usage line
        code = exited.code
    assert code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_approving_into_a_folder_that_is_not_a_hospitals_is_refused(capsys, tmp_path):
    """Found by review: `node approve HASH --dir /nonexistent/node` created that folder and approved into it."""
    code, _, err = run(capsys, "node", "approve", "a" * 64, "--dir", str(tmp_path / "typo" / "node"))
    assert code == 2 and "not a hospital's folder" in err
    assert not (tmp_path / "typo").exists()
