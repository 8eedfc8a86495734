"""A data format is one registered loader: a toy format registered here works through the real commands.

The toy layout is nothing DermFed knows: `toy_labels.csv` (file, clinic, diagnosis, patient) and
its images anywhere below the root. Registered from this module only, it must be accepted by
`data.format` and `evaluation.external[].format` and read by `dermfed data summary`, `pretrain`
and `evaluate` with no change anywhere else; an unknown name keeps the one-line error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from common.data.catalog import Catalog, make_catalog
from common.data.formats import FORMATS, register_format
from common.data.formats.reading import find_csv, read_csv, require_root
from server.cli import main
from tests.conftest import write_jpeg

TOY = "toy-csv"
TOY_CSV = "toy_labels.csv"


def load_toy(cfg) -> Catalog:
    root = require_root(cfg)
    csv_path = find_csv(root, cfg.metadata_csv, TOY_CSV, TOY)
    meta = read_csv(csv_path, ["file", "clinic", "diagnosis", "patient"], TOY, ids=("file", "patient"))
    rows = pd.DataFrame({"image_id": meta["file"].str.rsplit(".", n=1).str[0], "path": [root / "pics" / f for f in meta["file"]],
                         "site": meta["clinic"], "group": meta["patient"], "label": meta["diagnosis"].str.upper()})
    return make_catalog(rows, sorted(set(rows["label"])), TOY, root)


@pytest.fixture()
def toy_format():
    """Registered as a plugin would be, and removed afterwards (other tests list the built-in names)."""
    register_format(TOY, holds=f"{TOY_CSV} and pics/")(load_toy)
    yield TOY
    FORMATS.pop(TOY, None)


def write_toy(root: Path, prefix: str, n: int = 48) -> Path:
    rows = []
    for i in range(n):
        name = f"{prefix}{i:03d}.jpg"
        write_jpeg(root / "pics" / name, (48, 48), seed=hash((prefix, i)) % 2**31)
        rows.append({"file": name, "clinic": f"clinic_{i % 2}", "diagnosis": ("nv", "mel")[(i // 2) % 2],
                     "patient": f"{prefix}p{i // 2}"})
    pd.DataFrame(rows).to_csv(root / TOY_CSV, index=False)
    return root


def test_a_format_registered_by_a_test_module_is_read_by_data_summary(toy_format, tmp_path, capsys):
    root = write_toy(tmp_path / "toy", "a")
    out = tmp_path / "summary"
    code = main(["data", "summary", "--config", "smoke", f"data.format={toy_format}", f"data.root={root}",
                 f"data.cache_dir={tmp_path / 'cache'}", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == TOY and summary["usable"] == 48
    assert summary["sites"] == {"clinic_0": 24, "clinic_1": 24} and summary["classes"] == ["MEL", "NV"]
    assert f"data set: {TOY}" in printed.out


def test_a_registered_format_pretrains_and_evaluates_as_source_and_as_external_set(toy_format, tmp_path, capsys):
    source, other = write_toy(tmp_path / "source", "s"), write_toy(tmp_path / "other", "o", n=16)
    common = [f"data.format={toy_format}", f"data.root={source}", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["pretrain", "--config", "smoke", "--out", str(tmp_path / "pre"), *common, "train.max_steps=1"]) == 0, \
        capsys.readouterr().err
    code = main(["evaluate", "--config", "smoke", "--checkpoint", str(tmp_path / "pre"), "--out", str(tmp_path / "eval"),
                 *common, "--external", f"{toy_format}:{other}:other", "evaluation.epochs=1", "evaluation.seeds=[0]",
                 "evaluation.bootstrap_replicates=100", "evaluation.arms=[random,federated]"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["external"]["other"]["images"] == 16 and metrics["external"]["other"]["format"] == TOY


def test_an_unlabelled_registered_format_is_refused_as_external_set(tmp_path, capsys):
    register_format("toy-unlabelled", holds="images", labelled=False)(load_toy)
    try:
        code = main(["config", "--config", "smoke", f"evaluation.external=[{{format: toy-unlabelled, root: {tmp_path}}}]"])
    finally:
        FORMATS.pop("toy-unlabelled", None)
    err = capsys.readouterr().err
    assert code == 2 and "format toy-unlabelled holds no labels" in err, err


def test_an_unknown_format_is_one_line_listing_the_registered_ones(capsys):
    code = main(["data", "summary", "--config", "smoke", "data.format=toy-unregistered"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "data.format: Input should be 'ham10000', 'isic2019', 'isic-gt', 'isic2020', 'folder' or 'synthetic' " \
           "(got 'toy-unregistered')" in err


def test_registering_a_built_in_name_again_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register_format("ham10000", holds="x")(load_toy)
