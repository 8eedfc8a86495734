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
from common.data.pipeline import split_catalog
from common.data.sources import load_catalog
from common.model import build_vae, shared_state
from tests.conftest import PROJECT_ROOT, write_jpeg
from tests.flower_helpers import train_message

# -- the split adds nobody else to a neighbouring data set ---------------------------------------------


def _train_images(catalog, config):
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
    config = load_config("smoke", ["data.format=ham10000", f"data.root={ham_sample}"])
    frame = split_catalog(load_catalog(config.data), config).frame
    digest = hashlib.sha256("\n".join(frame["image_id"] + ":" + frame["split"]).encode()).hexdigest()
    assert digest == "654490f0ec3e85e4951be5cd6d1c95243e5d22364bd8397c7e7cab9d26651b5b"
