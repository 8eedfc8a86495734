"""Flower's simulation engine end to end: a real local SuperLink, 3 virtual hospitals, real rounds."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

from common.checkpoint import load_checkpoint
from common.config import load_config
from simulations.runner import run_simulation
from tests.run_processes import (CEILING_S, alive, cmdline, descendants, refused_resume, resume_simulation,
                                  start_simulation, wait_for_round, wait_until)

# One worker runs this whole module: the uninterrupted run is computed once (pyproject: --dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_simulation")]


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


def test_sigterm_mid_round_stops_every_process_and_the_resumed_run_equals_the_uninterrupted_run(
        uninterrupted, workdir, capsys):
    """A real `dermfed simulate` gets SIGTERM in round 2 (hospital_2 holds the round open; hospital_1 has already
    trained it): every process of the run is gone within 10 s, the run is resumable, a resume that would corrupt it
    is refused without writing anything, and the resumed run ends with exactly the uninterrupted run's weights:
    reproducibility without DP across separate executions, and proof that the killed round left nothing behind."""
    run = workdir / "interrupted"
    cli = start_simulation(run, workdir, "federation.num_rounds=2", "federation.min_clients=3")
    wait_for_round(run, cli)
    code, err = refused_resume(capsys, run)  # while the first lives
    assert code == 2 and "in use by a live run" in err
    wait_until(lambda: (run / "sites" / "hospital_1" / "round-0002.pt").is_file(), cli, "round 2 under way")
    processes = descendants(cli.pid)
    assert len(processes) >= 4  # SuperLink, SuperExec, simulation, Ray ...
    os.kill(cli.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10  # every process of the run gone within 10 s of the signal (README)
    while time.monotonic() < deadline and any(alive(pid) for pid in processes):
        time.sleep(0.2)
    assert not [cmdline(pid) for pid in processes if alive(pid)]
    assert cli.wait(timeout=CEILING_S) == 130  # the CLI itself then reports and exits (slower on a loaded machine)
    assert "1 of 2 rounds had completed; continue with: dermfed simulate --resume" in cli.stderr.read()
    assert load_checkpoint(run)["position"]["round"] == 1
    original = (run / "config.yaml").read_bytes()
    code, err = refused_resume(capsys, run, "model.encoder=convnext_tiny", "data.image_size=64")
    assert code == 2
    assert "model.encoder: 'convnext_atto' -> 'convnext_tiny'" in err and "data.image_size" in err
    assert (run / "config.yaml").read_bytes() == original and not list(run.glob("config.r*.yaml"))
    resumed = resume_simulation(run, "federation.round_timeout=700")  # an allowed change: recorded as a revision
    # a SIGTERM after the last round: the run is complete, so the message must not suggest --resume
    wait_for_round(run, resumed, 2)
    os.kill(resumed.pid, signal.SIGTERM)
    assert resumed.wait(timeout=CEILING_S) == 130
    message = resumed.stderr.read()
    assert "all 2 rounds had completed" in message and "--resume" not in message, message
    assert (run / "config.yaml").read_bytes() == original  # the original is kept, the change is a revision
    assert load_config(run / "config.r2.yaml").federation.round_timeout == 700
    assert load_config(run / "config.yaml").federation.round_timeout == 600
    resumed, straight = load_checkpoint(run), load_checkpoint(uninterrupted)
    assert resumed["position"]["round"] == 2
    assert [h["round"] for h in resumed["history"]] == [1, 2]
    assert [h["round"] for h in json.loads((run / "history.json").read_text())] == [1, 2]
    for key, value in straight["encoder"].items():
        assert torch.equal(value, resumed["encoder"][key]), key


@pytest.fixture(scope="module")
def dp_config(workdir):
    return load_config("smoke", [f"data.root={workdir / 'data'}", f"data.cache_dir={workdir / 'cache'}",
                                 "federation.num_rounds=2", "dp.enabled=true", "dp.target_epsilon=5.0",
                                 "federation.strategy=fedprox", "federation.proximal_mu=0.1",
                                 "model.objective=masked"])  # the masked objective federated under DP (issue 19)


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
        assert not any(key in entry["train"] for key in ("masked_mse", "total", "images-seen", "seconds"))
    header = (run / "history.csv").read_text().splitlines()[0]
    assert "epsilon_hospital_1" in header and "masked_mse" not in header and "evaluate_" not in header
    assert load_checkpoint(run)["config"]["model"]["objective"] == "masked"


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
