"""Server-side aggregation through Flower's real strategies, with DermFed's robust front door."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common.config import load_config
from server.rounds import RoundFailed, RunRecorder, screen_update
from server.strategy import build_strategy
from tests.flower_helpers import error_reply, reply, train_message

EXPECTED = {"encoder.w": (2, 3), "encoder.b": (3,)}


def _arrays(value, shape_w=(2, 3)):
    return {"encoder.w": np.full(shape_w, value, dtype=np.float32), "encoder.b": np.arange(3, dtype=np.float32) * value}


def _strategy(tmp_path, *overrides, min_clients=2):
    config = load_config("smoke", [f"federation.min_clients={min_clients}", *overrides])
    strategy = build_strategy(config)
    strategy.attach(RunRecorder(tmp_path, config), EXPECTED, min_clients, site_names={0: "a", 1: "b", 2: "c", 3: "d"})
    strategy._sent = [10, 11, 12, 13]
    return strategy


def _metrics(index, n):
    return {"num-examples": float(n), "site-index": float(index), "reconstruction": 100.0 + index}


def test_screen_update_names_what_is_wrong():
    assert screen_update(_arrays(1.0), EXPECTED, {"num-examples": 3}) is None
    assert "non-finite" in screen_update(_arrays(np.nan), EXPECTED, {"num-examples": 3})
    assert "non-finite" in screen_update(_arrays(np.inf), EXPECTED, {"num-examples": 3})
    assert "wrong shape" in screen_update(_arrays(1.0, (3, 2)), EXPECTED, {"num-examples": 3})
    assert "wrong keys" in screen_update({"encoder.w": np.zeros((2, 3))}, EXPECTED, {"num-examples": 3})
    assert "num-examples" in screen_update(_arrays(1.0), EXPECTED, {"num-examples": 0})


def test_fedavg_equals_the_example_weighted_mean(tmp_path):
    strategy = _strategy(tmp_path)
    updates = [(0, 10, 1.0), (1, 30, 2.0), (2, 60, -1.0)]
    replies = [reply(10 + i, _arrays(v), _metrics(i, n)) for i, n, v in updates]
    arrays, metrics = strategy.aggregate_train(1, replies)
    weights = np.array([10, 30, 60]) / 100
    expected_w = sum(w * np.full((2, 3), v) for w, (_, _, v) in zip(weights, updates))
    assert np.allclose(arrays["encoder.w"].numpy(), expected_w, atol=1e-6)
    assert np.allclose(arrays["encoder.b"].numpy(), np.arange(3) * sum(w * v for w, (_, _, v) in zip(weights, updates)))
    assert metrics["reconstruction"] == pytest.approx(sum(w * (100 + i) for w, (i, _, _) in zip(weights, updates)))


def test_nan_wrong_shape_error_and_silent_clients_are_left_out_and_recorded(tmp_path):
    strategy = _strategy(tmp_path)
    replies = [
        reply(10, _arrays(1.0), _metrics(0, 10)),
        reply(11, _arrays(np.nan), _metrics(1, 10)),
        reply(12, _arrays(3.0, (3, 2)), _metrics(2, 10)),
        error_reply(13, "CUDA out of memory"),
    ]
    strategy._sent = [10, 11, 12, 13, 14]
    with pytest.raises(RoundFailed, match="only 1 valid update"):
        strategy.aggregate_train(1, replies)
    record = strategy.recorder.current
    reasons = {entry["site"]: entry["reason"] for entry in record.excluded}
    assert "non-finite" in reasons["b"] and "wrong shape" in reasons["c"]
    assert "CUDA out of memory" in reasons["node-13"] and "no reply" in reasons["node-14"]

    strategy = _strategy(tmp_path, min_clients=1)
    strategy._sent = [10, 11]
    arrays, _ = strategy.aggregate_train(1, replies[:2])
    assert np.allclose(arrays["encoder.w"].numpy(), 1.0)  # the NaN update was not averaged in
    assert [s["site"] for s in strategy.recorder.current.sites] == ["a"]


def test_aggregation_order_does_not_depend_on_arrival(tmp_path):
    values = [(0, 7, 0.1), (1, 13, 0.7), (2, 29, -0.3)]
    forward = [reply(10 + i, _arrays(v), _metrics(i, n)) for i, n, v in values]
    a, _ = _strategy(tmp_path).aggregate_train(1, forward)
    b, _ = _strategy(tmp_path).aggregate_train(1, list(reversed(forward)))
    assert np.array_equal(a["encoder.w"].numpy(), b["encoder.w"].numpy())


def test_fedmedian_and_fedadam_are_flowers(tmp_path):
    def replies():
        return [reply(10 + i, _arrays(v), _metrics(i, n)) for i, n, v in [(0, 1, 1.0), (1, 1, 2.0), (2, 100, 50.0)]]

    median = _strategy(tmp_path, "federation.strategy=fedmedian")
    arrays, _ = median.aggregate_train(1, replies())
    assert np.allclose(arrays["encoder.w"].numpy(), 2.0)  # robust to the outlier, ignores weights
    assert type(median).__mro__[2].__name__ == "FedMedian"
    adam = _strategy(tmp_path, "federation.strategy=fedadam")
    adam.current_arrays = _arrays(0.0)
    adam.aggregate_train(1, replies())
    assert set(adam.export_state()) == {"m_t", "v_t"}


def test_initial_weights_from_seed_or_checkpoint(tmp_path):
    import torch

    from common.config import load_config as load
    from server.cli import main
    from server.federation import initial_shared_weights

    config = load("smoke", [f"data.root={tmp_path / 'data'}", f"data.cache_dir={tmp_path / 'cache'}"])
    seeded = initial_shared_weights(config)
    assert all(torch.equal(v, initial_shared_weights(config)[k]) for k, v in seeded.items())
    assert main(["pretrain", "--config", "smoke", "--out", str(tmp_path / "pre"), f"data.root={tmp_path / 'data'}",
                 f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    from_checkpoint = initial_shared_weights(config.model_copy(update={"federation": config.federation.model_copy(
        update={"initial_checkpoint": str(tmp_path / "pre")})}))
    payload = torch.load(tmp_path / "pre" / "checkpoint.pt", weights_only=True)
    assert torch.equal(from_checkpoint["encoder.stem.0.weight"], payload["encoder"]["stem.0.weight"])
    assert not torch.equal(from_checkpoint["encoder.stem.0.weight"], seeded["encoder.stem.0.weight"])


def test_server_side_monitors(tmp_path, synthetic_root):
    from common.config import load_config as load
    from server.federation import initial_shared_weights
    from server.monitor import Monitor

    common = [f"data.root={synthetic_root}", f"data.cache_dir={tmp_path / 'cache'}"]
    probe_config = load("smoke", [*common, "federation.monitor=linear-probe"])
    probe = Monitor(probe_config)
    result = probe(initial_shared_weights(probe_config))
    assert 0.0 <= result["probe-balanced-accuracy"] <= 1.0
    assert probe(initial_shared_weights(probe_config)) == result  # the same weights, the same verdict
    vae_config = load("smoke", [*common, "federation.share=vae", "federation.monitor=reconstruction"])
    assert Monitor(vae_config)(initial_shared_weights(vae_config))["val-reconstruction"] > 0
    assert Monitor(load("smoke", common))(initial_shared_weights(load("smoke", common))) == {}


def _node_keys(tmp_path, nodes):
    """Real node keys (as `dermfed node keygen` makes them) and a registry that holds their public halves."""
    from common.deployment.pki import make_node_key
    from common.reply_signature import load_node_key
    from server.deploy.registry import RegisteredSite, SiteRegistry

    keys, sites = {}, {}
    for index, (node, name) in enumerate(nodes.items()):
        make_node_key(tmp_path / name)
        keys[node] = load_node_key(tmp_path / name / "auth_key")
        sites[node] = RegisteredSite(name, index, "sha", (tmp_path / name / "auth_key.pub").read_text().strip())
    return keys, SiteRegistry(sites)


def _signed(message, key, node_id, round_number=1):
    """What a hospital's verifying ClientApp does before it pushes a reply."""
    from client.trusted_app import sign_reply_in_place

    sign_reply_in_place(message, key, message.metadata.run_id, node_id, round_number)
    return message


def test_with_a_registry_a_site_is_named_by_its_node_key_and_strangers_are_left_out(tmp_path):
    config = load_config("smoke", ["federation.min_clients=2"])
    strategy = build_strategy(config)
    keys, registry = _node_keys(tmp_path, {10: "clinic_a", 11: "clinic_b", 99: "stranger"})
    registry.sites.pop(99)  # a key the coordinator never registered
    strategy.attach(RunRecorder(tmp_path / "run", config), EXPECTED, 2, registry=registry)
    strategy._sent = [10, 11, 99]
    # node 11 claims clinic_a's index; node 99 holds a key the coordinator never registered
    replies = [_signed(reply(11, _arrays(2.0), _metrics(0, 10)), keys[11], 11),
               _signed(reply(10, _arrays(1.0), _metrics(1, 10)), keys[10], 10),
               _signed(reply(99, _arrays(50.0), _metrics(2, 10)), keys[99], 99)]
    arrays, _ = strategy.aggregate_train(1, replies)
    record = strategy.recorder.current
    assert {s["node"]: s["site"] for s in record.sites} == {10: "clinic_a", 11: "clinic_b"}
    assert [(e["node"], e["reason"]) for e in record.excluded] == [(99, "node id not in the site registry")]
    assert np.allclose(arrays["encoder.w"].numpy(), 1.5)  # the stranger's update is not averaged in
    kept = strategy._to_registered([train_message(10), train_message(99)], record)
    assert [m.metadata.dst_node_id for m in kept] == [10]  # nothing is sent to an unregistered node


def test_a_reply_pushed_under_another_nodes_id_is_refused_and_recorded(tmp_path):
    """Flower's Fleet API lets a registered node push a reply whose src_node_id is another's: clinic_b
    sends one as clinic_a (node 10), signed with its own key; an altered reply and an unsigned one fail too."""
    config = load_config("smoke", ["federation.min_clients=1"])
    strategy = build_strategy(config)
    keys, registry = _node_keys(tmp_path, {10: "clinic_a", 11: "clinic_b", 12: "clinic_c"})
    strategy.attach(RunRecorder(tmp_path / "run", config), EXPECTED, 1, registry=registry)
    strategy._sent = [10, 11, 12]
    forged = _signed(reply(10, _arrays(99.0), _metrics(0, 10)), keys[11], 10)  # clinic_b's key, clinic_a's node id
    assert forged.metadata.src_node_id == 10
    altered = _signed(reply(11, _arrays(1.0), _metrics(1, 10)), keys[11], 11)
    altered.content["arrays"] = ArrayRecord({k: Array(v) for k, v in _arrays(5.0).items()})  # changed after signing
    unsigned = reply(12, _arrays(3.0), _metrics(2, 10))
    replayed = _signed(reply(12, _arrays(3.0), _metrics(2, 10)), keys[12], 12, round_number=7)  # another round's
    with pytest.raises(RoundFailed):
        strategy.aggregate_train(1, [forged, altered, unsigned])
    reasons = {e["node"]: e["reason"] for e in strategy.recorder.current.excluded}
    assert reasons[10].startswith("forged or altered reply: its signature does not verify against the key "
                                  "registered for node 10")
    assert reasons[11].startswith("forged or altered reply")
    assert reasons[12].startswith("unsigned reply")
    strategy.recorder.current = None
    with pytest.raises(RoundFailed):
        strategy.aggregate_train(1, [replayed])
    assert strategy.recorder.current.excluded[0]["reason"].startswith("forged or altered reply")
    genuine = _signed(reply(10, _arrays(1.0), _metrics(0, 10)), keys[10], 10)
    strategy.recorder.current = None
    arrays, _ = strategy.aggregate_train(1, [genuine])
    assert np.allclose(arrays["encoder.w"].numpy(), 1.0)
    assert strategy.recorder.current.sites[0]["site"] == "clinic_a"


def test_a_registered_site_that_fails_or_stays_silent_is_recorded_under_its_registered_name(tmp_path):
    config = load_config("smoke", ["federation.min_clients=1"])
    strategy = build_strategy(config)
    keys, registry = _node_keys(tmp_path, {10: "clinic_a", 11: "clinic_b", 12: "clinic_c"})
    strategy.attach(RunRecorder(tmp_path / "run", config), EXPECTED, 1, registry=registry)
    strategy._sent = [10, 11, 12]
    strategy.aggregate_train(1, [_signed(reply(10, _arrays(1.0), _metrics(0, 10)), keys[10], 10),
                                 error_reply(11, "data-error")])
    reasons = {e["site"]: e["reason"] for e in strategy.recorder.current.excluded}
    assert reasons == {"clinic_b": "client error: data-error", "clinic_c": "no reply within federation.round_timeout"}
