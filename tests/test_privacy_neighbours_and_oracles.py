"""Review of issue 16, from the coordinator's side: the split, the ledger and the error classes.

- one lesion added or removed must change a DP site's training set by exactly that lesion's images
  (the split is part of the private mechanism);
- two runs of the coordinator at one hospital at the same time must not lose noisy steps;
- a DP hospital's error replies must not answer questions about its data before it spends budget.
"""

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from client.client_app import _RUNNERS, train
from common.config import config_to_json, load_config
from common.data.formats import load_catalog
from common.model import build_model, shared_state
from tests.conftest import PROJECT_ROOT, write_jpeg
from tests.flower_helpers import run_config_of, train_message

# -- the split adds nobody else to a neighbouring data set ---------------------------------------------


def _train_images(catalog, config):
    from common.data.pipeline import split_catalog  # (imported here so that the other tests run on older code)

    frame = split_catalog(catalog, config).frame
    return set(frame.loc[frame["split"] == "train", "image_id"])


def test_under_dp_one_lesion_removed_changes_the_training_set_by_exactly_its_images(ham_sample):
    config = load_config("smoke", ["data.format=ham10000", f"data.root={ham_sample}", "dp.enabled=true", "dp.noise_multiplier=1"])
    catalog = load_catalog(config.data)
    frame = catalog.frame
    train = _train_images(catalog, config)
    assert 0.6 < len(train) / len(frame) < 0.8  # the fractions hold on average (not stratified under DP)
    lesions = frame.groupby("group")["image_id"].apply(set)
    tried = list(lesions[lesions.map(len) >= 2].index[:15]) + list(lesions.index[:15])
    for lesion in tried:
        neighbour = replace(catalog, frame=frame[frame["group"] != lesion].reset_index(drop=True))
        assert _train_images(neighbour, config) == train - lesions[lesion], lesion


def test_without_dp_the_split_is_the_stratified_one_of_before(ham_sample):
    """The sha256 of (image_id:split) of the HAM10000 sample, computed with main's code before this change."""
    from common.data.pipeline import split_catalog

    config = load_config("smoke", ["data.format=ham10000", f"data.root={ham_sample}"])
    frame = split_catalog(load_catalog(config.data), config).frame
    digest = hashlib.sha256("\n".join(frame["image_id"] + ":" + frame["split"]).encode()).hexdigest()
    assert digest == "654490f0ec3e85e4951be5cd6d1c95243e5d22364bd8397c7e7cab9d26651b5b"


# -- two runs at once cannot lose noisy steps ------------------------------------------------------------

SIGMA, STEPS = 3.0, 4  # every call: 4 noisy steps at noise multiplier 3 (sampling rate 0.5 at this site)
CEILING = 2.6  # the hospital's lifetime epsilon: room for two calls (8 steps: 2.33), not three (12 steps: 2.85)
PAUSED_SITE = """
import sys, time
from pathlib import Path
from flwr.app import Context, RecordDict
from client.client_app import train
from common.config import config_from_json
from common.data.batches import ImageRows
from tests.test_privacy_neighbours_and_oracles import ask, NODE

folder = Path(sys.argv[1])
original = ImageRows.read
def paused_read(self, positions):  # the first image read comes after the ledger reservation
    (folder / "training").touch()
    deadline = time.monotonic() + 600
    while not (folder / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return original(self, positions)
ImageRows.read = paused_read
reply = ask(config_from_json((folder / "config.json").read_text()), folder, run_id=1)
(folder / "A-reply").write_text(reply.error.reason if reply.has_error() else "trained")
"""
NODE = {"partition-id": 0, "num-partitions": 3, "dp-enabled": True, "dp-max-epsilon": CEILING}


def ask(config, folder, run_id, node_id=7, node=None):
    """One train call of the coordinator through the real ClientApp, at the hospital whose state is in `folder`."""
    context = Context(run_id=run_id, node_id=node_id, state=RecordDict(), run_config=run_config_of(config),
                      node_config={**(node or NODE), "state-dir": str(Path(folder) / "state")})
    torch.manual_seed(0)
    shared = shared_state(build_model(config.model, config.data.image_size), config.federation.share)
    reply = train(train_message(node_id, shared, {"server-round": 1}), context)
    _RUNNERS.clear()
    return reply


def _wait_for(condition, what, ceiling=600.0):
    deadline = time.monotonic() + ceiling
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_a_second_run_during_a_dp_round_cannot_make_the_ledger_forget_steps(synthetic_root, tmp_path):
    """Run A (another process) has reserved its steps and is training; run B arrives at the same hospital. Before,
    B trained and A's end-of-round save wrote A's own history over B's steps, so later runs got B's budget again.
    Now B is refused at once (or, were it let through, the ledger would still count it): every released step is
    in the ledger, and no run goes past the ceiling."""
    config = load_config("smoke", [f"data.root={synthetic_root}", f"data.cache_dir={tmp_path / 'cache'}",
                                   "dp.enabled=true", f"dp.noise_multiplier={SIGMA}", "train.epochs=50",
                                   f"train.max_steps={STEPS}", "federation.num_rounds=1"])
    (tmp_path / "config.json").write_text(config_to_json(config))
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    a = subprocess.Popen([sys.executable, "-c", PAUSED_SITE, str(tmp_path)], cwd=PROJECT_ROOT, env=env)
    try:
        _wait_for(lambda: (tmp_path / "training").exists() or a.poll() is not None, "run A to start training")
        assert a.poll() is None, "run A ended before training"
        b = ask(config, tmp_path, run_id=2)
        (tmp_path / "go").touch()
        assert a.wait(timeout=600) == 0
    finally:
        a.kill()
    assert (tmp_path / "A-reply").read_text() == "trained"
    c = ask(config, tmp_path, run_id=3)
    d = ask(config, tmp_path, run_id=4)
    released = STEPS * sum(not r.has_error() for r in (b, c, d)) + STEPS
    history = json.loads((tmp_path / "state" / "hospital_1" / "privacy_ledger.json").read_text())["accountant"]["history"]
    assert sum(entry[2] for entry in history) == released, (history, b.error if b.has_error() else "B trained")
    assert released <= 2 * STEPS  # the ceiling leaves room for two calls
    if b.has_error():
        assert b.error.reason.startswith("site-busy"), b.error.reason
    assert d.has_error() and d.error.reason.startswith("privacy-budget-exhausted"), d.error


# -- error classes answer no question about a DP hospital's images --------------------------------------------


@pytest.fixture()
def hospital(tmp_path):
    """A real hospital's image folder: two patients' sub-folders, images of 80x60 and 40x30 pixels."""
    root = tmp_path / "images"
    write_jpeg(root / "patient_a" / "1.jpg", (80, 60), seed=1)
    write_jpeg(root / "patient_a" / "2.jpg", (80, 60), seed=2)
    write_jpeg(root / "patient_b" / "1.jpg", (40, 30), seed=3)
    return {"data-root": str(root), "data-format": "folder", "site-name": "clinic", "dp-enabled": True,
            "dp-max-epsilon": 8.0}


def _probe(tmp_path, hospital, *overrides):
    config = load_config("smoke", [f"data.cache_dir={tmp_path / 'cache'}", "data.format=folder", "data.root=/x",
                                   "data.val_fraction=0", "data.test_fraction=0", *overrides])
    reply = ask(config, tmp_path, run_id=5, node_id=9, node=hospital)
    assert reply.has_error()
    return reply.error.reason


@pytest.mark.parametrize("dp", ["dp.enabled=false", "dp.enabled=true dp.noise_multiplier=1"])
def test_a_dp_hospitals_errors_do_not_answer_questions_about_its_images(tmp_path, hospital, dp):
    """The coordinator's zero-budget oracles: does a sub-folder exist, how small is its smallest image, can the
    split be drawn? Asked with DP off (refused by the floor before any image is read) and with DP on (the data
    fails before any noisy step): each probe gets the same reply, byte for byte, without an exception's class."""
    probes = [["data.site=patient_a", "data.min_image_side=4096"], ["data.site=nobody"],
              ["data.site=patient_b", "data.min_image_side=31"], ["data.site=patient_b", "data.min_image_side=30",
                                                                      "data.test_fraction=0.45"],
              ["data.test_fraction=0.49", "data.val_fraction=0.49"]]
    replies = {" ".join(p): _probe(tmp_path, hospital, *dp.split(), *p) for p in probes}
    assert len(set(replies.values())) == 1, replies
    reason = next(iter(replies.values()))
    assert "Error" not in reason and "Exception" not in reason and "patient" not in reason
    assert reason.startswith("privacy-floor" if dp == "dp.enabled=false" else "site-failed"), reason
    assert not (tmp_path / "state" / "clinic" / "privacy_ledger.json").exists()  # nothing spent, nothing trained


def test_no_site_sends_an_exceptions_class_name():
    from client.policy import public_error

    for exc in (KeyError("x"), ZeroDivisionError(), RuntimeError("secret")):
        assert public_error(exc) == "site-error: the site failed; details are in its own log"
