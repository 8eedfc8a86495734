"""Flower's simulation engine end to end: a real local SuperLink, 3 virtual hospitals, real rounds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from common.checkpoint import load_checkpoint
from common.config import load_config
from simulations.runner import run_simulation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("simulation")


@pytest.fixture(scope="module")
def sim_config(workdir):
    # run_simulation gives the SuperLink its own FLWR_HOME (inside the run folder) and RAY_TMPDIR
    return load_config("smoke", [f"data.root={workdir / 'data'}", f"data.cache_dir={workdir / 'cache'}",
                                 "federation.num_rounds=2", "federation.min_clients=3"])


@pytest.fixture(scope="module")
def uninterrupted(sim_config, workdir):
    return run_simulation(sim_config, workdir / "straight")


def test_two_rounds_with_three_virtual_hospitals(uninterrupted):
    payload = load_checkpoint(uninterrupted)
    assert payload["position"]["round"] == 2
    history = json.loads((uninterrupted / "history.json").read_text())
    assert [entry["round"] for entry in history] == [1, 2]
    for entry in history:
        assert sorted(s["site"] for s in entry["sites"]) == ["hospital_1", "hospital_2", "hospital_3"]
        assert entry["excluded"] == [] and entry["train"]["reconstruction"] > 0
        assert entry["evaluate"]["val-reconstruction"] > 0
    backbone = timm.create_model("convnext_atto", num_classes=0)
    backbone.load_state_dict(payload["encoder"], strict=True)
    from common.data.identity import group_identities, image_identities
    from common.data.pipeline import prepare_data

    frame = prepare_data(load_config("smoke", [f"data.root={uninterrupted.parent / 'data'}",
                                                f"data.cache_dir={uninterrupted.parent / 'cache'}"])).catalog.frame
    recorded = payload["extra"]["pretraining_images"]  # for evaluation's leak check: identities, not names
    train = frame[frame["split"] == "train"]
    assert recorded["image_ids"] == sorted(set(image_identities(train))) and len(recorded["image_ids"]) > 0
    assert recorded["groups"] == sorted(set(group_identities(train).dropna())) and len(recorded["groups"]) > 0
    assert (uninterrupted / "history.csv").read_text().startswith("round,")
    assert (uninterrupted / "config.yaml").is_file()


def test_a_run_stopped_after_round_1_and_resumed_equals_the_uninterrupted_run(sim_config, uninterrupted, workdir):
    """Also what reproducibility without DP means: two separate executions of one config, the same weights."""
    interrupted = workdir / "interrupted"
    run_simulation(sim_config, interrupted, stop_after_round=1)
    assert load_checkpoint(interrupted)["position"]["round"] == 1
    run_simulation(sim_config, interrupted, resume=True)
    resumed, straight = load_checkpoint(interrupted), load_checkpoint(uninterrupted)
    assert resumed["position"]["round"] == 2
    assert [h["round"] for h in resumed["history"]] == [1, 2]
    for key, value in straight["encoder"].items():
        assert torch.equal(value, resumed["encoder"][key]), key


@pytest.fixture(scope="module")
def dp_config(workdir):
    return load_config("smoke", [f"data.root={workdir / 'data'}", f"data.cache_dir={workdir / 'cache'}",
                                 "federation.num_rounds=2", "dp.enabled=true", "dp.target_epsilon=5.0",
                                 "federation.strategy=fedprox", "federation.proximal_mu=0.1"])


def test_dp_simulation_records_each_sites_epsilon_and_nothing_computed_from_images(dp_config, workdir):
    run = run_simulation(dp_config, workdir / "private")
    history = json.loads((run / "history.json").read_text())
    for site in ("hospital_1", "hospital_2", "hospital_3"):
        eps = [next(s["epsilon"] for s in entry["sites"] if s["site"] == site) for entry in history]
        assert 0 < eps[0] < eps[1] <= 5.0  # the budget is planned over both rounds and never exceeded
        assert eps[1] == pytest.approx(5.0, rel=0.05)
    for entry in history:
        for site in entry["sites"]:
            assert set(site) == {"site", "node", "num-examples", "epsilon", "delta", "site-index"}, site
            assert site["num-examples"] == 1.0  # equal FedAvg weights: no site's image count leaves it
        assert entry["evaluate"] == {}  # no client evaluation under DP
        assert not any(key in entry["train"] for key in ("reconstruction", "kl", "total", "images-seen", "seconds"))
    header = (run / "history.csv").read_text().splitlines()[0]
    assert "epsilon_hospital_1" in header and "reconstruction" not in header and "evaluate_" not in header


def test_the_same_dp_config_twice_gives_different_global_encoders(dp_config, workdir):
    """The noise is drawn from OS entropy: a server that knows the config cannot replay it."""
    first = load_checkpoint(workdir / "private") if (workdir / "private" / "checkpoint.pt").is_file() \
        else load_checkpoint(run_simulation(dp_config, workdir / "private"))
    second = load_checkpoint(run_simulation(dp_config, workdir / "private-again"))
    assert any(not torch.equal(value, second["encoder"][key]) for key, value in first["encoder"].items())


def test_simulated_hospitals_keep_their_own_floors_against_the_coordinators_config(workdir, tmp_path):
    """A real `dermfed simulate`: the coordinator asks for delta 0.5; hospital_2 (the README's node config, no
    dp-delta) refuses, naming both values; hospital_3's own floor allows delta 0.5 (given in a YAML file); the
    DP round completes with the two others. A site name that is not simulated is refused before anything runs."""
    bin_dir = Path(sys.executable).parent
    floors = tmp_path / "floors.yaml"
    floors.write_text("hospital_3:\n  dp-enabled: true\n  dp-max-epsilon: 8\n  dp-delta: 0.5\n")
    run = workdir / "floors"
    command = [str(bin_dir / "dermfed"), "simulate", "--config", "smoke", f"data.root={workdir / 'data'}",
               f"data.cache_dir={workdir / 'cache'}", "federation.num_rounds=1", "dp.enabled=true",
               "dp.target_epsilon=5", "dp.delta=0.5", "--node-config", "hospital_2:dp-enabled=true dp-max-epsilon=8",
               "--node-config-file", str(floors), "--out", str(run)]
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr  # a console a person can read (simulations/console.py): each event once
    assert console.count("[round 1] ") == 1 and console.count("configure_train: Sampled 3 nodes") == 1, console
    for noise in ("Since flwr 1.32", "Manually terminating ClientAppActor", "FutureWarning", ":DEBUG:", ":INFO:"):
        assert noise not in console, (noise, console[-3000:])
    entry, = json.loads((run / "history.json").read_text())
    assert sorted(site["site"] for site in entry["sites"]) == ["hospital_1", "hospital_3"]
    refused, = entry["excluded"]  # hospital_2: in round 1 a simulation knows it by its node id only
    assert "privacy-floor: the coordinator asked for dp.delta=0.5" in refused["reason"]
    assert "dp.delta=0.5" in refused["reason"] and "delta=1e-05" in refused["reason"]
    assert not (run / "sites" / "hospital_2" / "privacy_ledger.json").exists()
    assert (run / "sites" / "hospital_3" / "privacy_ledger.json").is_file()
    unknown = subprocess.run([*command[:-1], str(tmp_path / "other"), "--node-config",
                              "hospital_9:dp-enabled=true dp-max-epsilon=1"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert unknown.returncode == 2 and "hospital_9" in unknown.stderr
