"""Faults of a running federation, tried for real: a killed CLI, faulty hospitals inside a running simulation,
too few healthy hospitals, torn checkpoints and site states. (SIGTERM mid-round and the resume that follows it
are in test_simulation.py, where the resumed run is compared with the uninterrupted one.)"""

import json
import os
import signal
import time

import pytest
import torch

from common.checkpoint import PREVIOUS_NAME, load_checkpoint
from common.config import load_config
from simulations.runner import SimulationError, run_simulation
from tests.run_processes import alive, cmdline, descendants, start_simulation, wait_until


@pytest.mark.slow
def test_a_killed_cli_leaves_no_process_of_its_run_alive(tmp_path):
    run = tmp_path / "run"
    cli = start_simulation(run, tmp_path, "federation.num_rounds=3")
    wait_until(lambda: any("ClientAppActor" in cmdline(pid) for pid in descendants(cli.pid)), cli,
                "a Ray actor started")  # every kind of process up
    processes = descendants(cli.pid)
    assert len(processes) >= 4
    os.kill(cli.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10  # every process of the run gone within 10 s of the signal
    cli.wait(timeout=10)
    while time.monotonic() < deadline and any(alive(pid) for pid in processes):
        time.sleep(0.2)
    assert not [cmdline(pid) for pid in processes if alive(pid)], "processes of the killed run are still alive"


@pytest.mark.slow
def test_faulty_hospitals_inside_a_running_federation_are_left_out_of_fedavg_and_send_no_file_name(tmp_path):
    """Four hospitals: the fourth sends NaN weights from round 1; in round 3 the second fails with an error whose
    text names one of its image files and the third never answers. The run finishes; each faulty hospital is
    recorded, by name (learnt from its earlier replies), with its reason; the global weights are FedAvg of the
    healthy updates only; no file name reaches the server's history. The hospitals send int8-compressed updates
    (`federation.compression=int8`): the NaN hospital's scales are NaN, and the server decodes before it checks
    and averages."""
    from client.site import SiteRunner, simulation_site_data
    from common.compression import apply_update
    from server.federation import initial_shared_weights

    from simulations.runner import resume_config

    config = load_config("smoke", [f"data.root={tmp_path / 'data'}", f"data.cache_dir={tmp_path / 'cache'}",
                                   "synth.num_sites=4", "federation.num_rounds=3", "federation.min_clients=1",
                                   "federation.compression=int8"])
    faults = "3:nan:1,1:raise:3,2:hang:3"
    run = run_simulation(config, tmp_path / "run", stop_after_round=1, fault_injection=faults)  # nobody hangs yet
    # The hung hospital is left out when federation.round_timeout expires: derived from round 1 as measured on this
    # machine (start-up included, as the resumed run's first round starts up too), never a guess that a loaded
    # machine breaks.
    round_seconds = json.loads((run / "history.json").read_text())[0]["seconds"]
    timeout = max(30.0, 2.0 * round_seconds)
    run_simulation(resume_config(run, [f"federation.round_timeout={timeout:.0f}"]), run, resume=True,
                   fault_injection=faults)
    history = json.loads((run / "history.json").read_text())
    healthy = {1: [0, 1, 2], 2: [0, 1, 2], 3: [0]}
    expected_reasons = {1: {"hospital_4": "non-finite"}, 2: {"hospital_4": "non-finite"},
                        3: {"hospital_4": "non-finite", "hospital_2": "client error: data-error",
                            "hospital_3": "no reply within federation.round_timeout"}}
    assert [entry["round"] for entry in history] == [1, 2, 3]
    for entry in history:
        assert sorted(s["site"] for s in entry["sites"]) == [f"hospital_{i + 1}" for i in healthy[entry["round"]]]
        reasons = {e["site"]: e["reason"] for e in entry["excluded"]}
        assert reasons.keys() == expected_reasons[entry["round"]].keys(), reasons
        assert all(part in reasons[site] for site, part in expected_reasons[entry["round"]].items()), reasons
    text = (run / "history.json").read_text() + (run / "history.csv").read_text()
    assert ".jpg" not in text and str(tmp_path) not in text and "unreadable" not in text
    runners = [SiteRunner(config, simulation_site_data(config, i, 4), tmp_path / f"plain{i}") for i in range(3)]
    weights = initial_shared_weights(config)
    for round_number in (1, 2, 3):
        outputs = [runners[i].train_round(round_number, weights) for i in healthy[round_number]]
        total = sum(o.metrics["num-examples"] for o in outputs)
        sent = {k: v.numpy() for k, v in weights.items()}
        decoded = [apply_update(sent, o.shared, "int8") for o in outputs]
        weights = {k: sum(torch.from_numpy(d[k]) * (o.metrics["num-examples"] / total) for d, o in zip(decoded, outputs))
                   for k in weights}
    final = load_checkpoint(run)["extra"]["shared"]
    assert all(torch.allclose(final[k], weights[k].to(final[k].dtype), atol=1e-5) for k in final)


@pytest.mark.slow
def test_too_few_healthy_hospitals_fail_the_round_keep_the_last_checkpoint_and_say_so(tmp_path):
    """Hospital 2 fails in round 2 and min_clients is 3: round 2 fails; round 1 stays the checkpoint."""
    config = load_config("smoke", [f"data.root={tmp_path / 'data'}", f"data.cache_dir={tmp_path / 'cache'}",
                                   "federation.num_rounds=2", "federation.min_clients=3"])
    with pytest.raises(SimulationError) as failure:
        run_simulation(config, tmp_path / "run", fault_injection="1:raise:2")
    message = str(failure.value)
    assert "failed in round 2" in message and "RoundFailed" in message and "data-error" in message
    assert "the checkpoint of round 1 is kept" in message and "--resume" in message
    assert load_checkpoint(tmp_path / "run")["position"]["round"] == 1
    status = json.loads((tmp_path / "run" / "run-status.json").read_text())
    assert status["state"] == "failed" and status["resumable"]


def test_a_torn_latest_checkpoint_falls_back_to_the_previous_round(tmp_path, caplog):
    from server.rounds import RunRecorder, load_resume_point

    config = load_config("smoke")
    recorder = RunRecorder(tmp_path, config)
    for round_number in (1, 2):
        recorder.record(round_number)
        recorder.finish(round_number, {"encoder.w": torch.full((2,), float(round_number))}, {})
    assert (tmp_path / PREVIOUS_NAME).is_file()
    latest = tmp_path / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:100])  # torn by a crash mid-write
    point = load_resume_point(tmp_path)
    assert point["round"] == 1 and torch.equal(point["shared"]["encoder.w"], torch.ones(2))
    assert "falling back to the previous round" in caplog.text


def test_a_torn_site_state_is_reported_not_silently_replaced(synthetic_root, tmp_path):
    from flwr.app import Context, RecordDict

    from client.client_app import _RUNNERS, train
    from common.model import build_model, shared_state
    from tests.flower_helpers import run_config_of, train_message

    config = load_config("smoke", [f"data.root={synthetic_root}", f"data.cache_dir={tmp_path / 'cache'}"])
    shared = shared_state(build_model(config.model, config.data.image_size), "encoder")

    def ask(round_number, node_id):
        context = Context(run_id=5, node_id=node_id, node_config={"partition-id": 0, "num-partitions": 3,
                                                                  "state-dir": str(tmp_path / "run" / "sites")},
                          state=RecordDict(), run_config=run_config_of(config, **{"run-dir": str(tmp_path / "run")}))
        return train(train_message(node_id, shared, {"server-round": round_number}), context)

    assert not ask(1, 71).has_error()
    snapshot = tmp_path / "run" / "sites" / "hospital_1" / "round-0001.pt"
    torn = snapshot.read_bytes()[: len(snapshot.read_bytes()) // 3]
    snapshot.write_bytes(torn)
    _RUNNERS.clear()  # a restarted daemon: it must read its state from disk
    reply = ask(2, 72)
    assert reply.has_error() and reply.error.reason.startswith("site-state-corrupt")
    assert snapshot.read_bytes() == torn  # left as it was, for its operator
    assert not (snapshot.parent / "round-0002.pt").exists()  # and no round was trained on a guessed state
    _RUNNERS.clear()
