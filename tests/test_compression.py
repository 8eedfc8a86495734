"""Compressed updates (`federation.compression`): the codec, error feedback, the bytes Flower carries, the server's
decoding before aggregation, the DP rounding's secret randomness, and a restarted site's residual."""

import shutil

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common.serde import array_record_to_proto

import client.site
from client.client_app import train
from client.site import SiteRunner, simulation_site_data
from common.compression import SCALE_SUFFIX, compress_update, decode, encode, seeded_generator
from common.config import load_config
from common.model import build_model, shared_state
from server.rounds import RunRecorder
from server.strategy import build_strategy
from tests.flower_helpers import reply, run_config_of, set_identity, train_message


def _config(root, tmp_path, *overrides):
    return load_config("smoke", [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", *overrides])


def _global_weights(config):
    torch.manual_seed(0)
    return shared_state(build_model(config.model, config.data.image_size), config.federation.share)


def _shapes(tensors):
    return {k: tuple(v.shape) for k, v in tensors.items()}


@pytest.mark.parametrize("codec, dtype, relative_step", [("int8", torch.int8, 1 / 127), ("fp16", torch.float16, 2 ** -10)])
def test_the_codec_round_trips_per_output_channel_and_its_stochastic_rounding_is_unbiased(codec, dtype, relative_step):
    generator = seeded_generator(0)
    channels = torch.logspace(-6, -2, 16).reshape(16, 1, 1, 1)  # channels whose ranges differ by 10^4
    update = {"w": torch.randn(16, 8, 3, 3) * channels, "b": torch.randn(16) * 1e-4, "zero": torch.zeros(4, 5)}
    payload = encode(update, codec, generator)
    assert set(payload) == set(update) | {k + SCALE_SUFFIX for k in update}
    assert payload["w"].dtype == dtype and payload["w" + SCALE_SUFFIX].shape == (16,)  # one scale per output channel
    assert payload["b" + SCALE_SUFFIX].shape == (1,)
    decoded = decode(payload, codec, _shapes(update))
    peak = update["w"].abs().amax(dim=(1, 2, 3), keepdim=True)
    assert bool(((decoded["w"] - update["w"]).abs() <= peak * relative_step * 1.0001).all())  # within one step
    assert torch.equal(decoded["zero"], update["zero"])
    draws = 4000
    mean = sum(decode(encode({"w": update["w"]}, codec, generator), codec, {"w": (16, 8, 3, 3)})["w"].double()
               for _ in range(draws)) / draws
    # the mean of many roundings is the value: within 6 standard errors of a rounding step, in every channel
    assert bool(((mean - update["w"].double()).abs() <= 6 * peak * relative_step / (2 * draws ** 0.5)).all())


def test_error_feedback_keeps_the_sum_sent_on_the_sum_of_the_true_updates():
    generator = seeded_generator(1)
    received = {"w": torch.zeros(8, 32)}
    residual, sent_total, true_total = None, torch.zeros(8, 32), torch.zeros(8, 32)
    without_feedback = torch.zeros(8, 32)
    for round_number in range(200):
        delta = torch.full((8, 32), 1e-3) + torch.randn(8, 32) * 1e-2  # a small drift under large steps
        payload, residual = compress_update({"w": delta}, received, residual, "int8", generator)
        sent_total += decode(payload, "int8", {"w": (8, 32)})["w"]
        true_total += delta
        plain, _ = compress_update({"w": delta}, received, None, "int8", generator)
        without_feedback += decode(plain, "int8", {"w": (8, 32)})["w"]
        # what was not sent is exactly what the site keeps, and it stays below one step of the last round
        assert torch.allclose(sent_total + residual["w"], true_total, atol=1e-5)
        assert bool((residual["w"].abs() <= payload["w" + SCALE_SUFFIX].unsqueeze(1) * 1.0001).all())
    assert (sent_total - true_total).abs().max() < 0.2 * (without_feedback - true_total).abs().max()


def test_an_int8_reply_through_the_clientapp_is_about_a_quarter_of_the_float32_bytes_flower_carries(synthetic_root, tmp_path):
    config = _config(synthetic_root, tmp_path, "federation.compression=int8", "train.max_steps=1")
    weights = _global_weights(config)
    context = Context(run_id=7, node_id=3, node_config={"partition-id": 1, "num-partitions": 3,
                                                        "state-dir": str(tmp_path / "state")},
                      state=RecordDict(), run_config=run_config_of(config))
    answer = train(train_message(3, weights, {"server-round": 1}), context)
    assert not answer.has_error(), answer.error
    arrays = answer.content["arrays"]
    values = [k for k in arrays.keys() if not k.endswith(SCALE_SUFFIX)]
    assert set(values) == set(weights) and all(arrays[k].dtype == "int8" for k in values)
    assert sum(arrays[k].numpy().nbytes for k in values) == sum(v.numel() for v in weights.values())  # 1 byte each
    int8_bytes = len(array_record_to_proto(arrays).SerializeToString())
    float32_bytes = len(array_record_to_proto(ArrayRecord(weights)).SerializeToString())  # what compression=none sends
    # the per-channel float32 scales and Flower's framing of twice as many arrays add a little to the quarter:
    # 0.257 for convnext_atto here, 0.252 for the demo's ConvNeXt-Tiny (BENCHMARKS.md)
    assert int8_bytes <= 0.26 * float32_bytes, (int8_bytes, float32_bytes)


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def test_the_server_decodes_every_reply_before_the_checks_and_fedavg(tmp_path):
    set_identity()  # the server's own messages carry its run and node (in a ServerApp process Flower sets them)
    config = load_config("smoke", ["federation.compression=int8", "federation.min_clients=2"])
    expected = {"encoder.w": (4, 6), "encoder.b": (6,)}
    global_weights = {"encoder.w": torch.randn(4, 6), "encoder.b": torch.randn(6)}
    strategy = build_strategy(config)
    strategy.attach(RunRecorder(tmp_path, config), expected, 2, site_names={0: "a", 1: "b", 2: "c", 3: "d"})
    sent = strategy.configure_train(1, ArrayRecord(global_weights), config=ConfigRecord(),
                                    grid=_Grid([10, 11, 12, 13]))
    assert len(list(sent)) == 4
    local = [{k: v + (i + 1) * 0.01 * torch.randn_like(v) for k, v in global_weights.items()} for i in range(2)]
    payloads = [compress_update(weights, global_weights, None, "int8", seeded_generator(i))[0]
                for i, weights in enumerate(local)]
    poisoned = dict(payloads[0], **{"encoder.w" + SCALE_SUFFIX: torch.full((4,), float("nan"))})
    replies = [reply(10 + i, {k: v.numpy() for k, v in p.items()}, {"num-examples": float(n), "site-index": float(i)})
               for i, (p, n) in enumerate([(payloads[0], 10), (payloads[1], 30), (poisoned, 10)])]
    replies.append(reply(13, {k: v.numpy() for k, v in local[0].items()}, {"num-examples": 5.0, "site-index": 3.0}))
    arrays, _ = strategy.aggregate_train(1, replies)
    reasons = {e["site"]: e["reason"] for e in strategy.recorder.record(1).excluded}
    assert "non-finite" in reasons["c"] and "undecodable int8 update" in reasons["d"]  # float32 weights: not int8
    for key in expected:
        decoded = [global_weights[key] + decode(p, "int8", expected)[key] for p in payloads]
        mean = 0.25 * decoded[0] + 0.75 * decoded[1]
        assert arrays[key].numpy().dtype == np.float32
        assert np.allclose(arrays[key].numpy(), mean.numpy(), atol=1e-6)
        assert np.allclose(arrays[key].numpy(), (0.25 * local[0][key] + 0.75 * local[1][key]).numpy(), atol=2e-3)


def test_under_dp_the_rounding_draws_from_the_secret_generator_and_nothing_else_differs(synthetic_root, tmp_path,
                                                                                      monkeypatch):
    """Two DP runs with the same seed and the same DP-SGD randomness (entropy stubbed): the trained weights are the
    same; the payloads differ only because the rounding's secret generator differs."""
    config = _config(synthetic_root, tmp_path, "dp.enabled=true", "dp.noise_multiplier=1.0",
                     "federation.compression=int8", "train.max_steps=1")
    weights = _global_weights(config)
    secret = client.site.secret_generator
    outputs = []
    for run, rounding_seed in enumerate((1, 2)):
        stream = np.random.default_rng(7)
        monkeypatch.setattr("common.privacy.entropy", lambda size: stream.bytes(size))  # DP-SGD's draws: the same
        monkeypatch.setattr(client.site, "secret_generator",
                            lambda device, seed=rounding_seed: seeded_generator(seed) if device == "cpu" else secret(device))
        runner = SiteRunner(config, simulation_site_data(config, 0, 3), tmp_path / f"run{run}")
        output = runner.train_round(1, weights)
        outputs.append((output.shared, shared_state(runner.model, config.federation.share)))
    (first, trained_first), (second, trained_second) = outputs
    assert all(torch.equal(trained_first[k], trained_second[k]) for k in trained_first)  # the noised weights
    assert set(first) == set(second) == set(weights) | {k + SCALE_SUFFIX for k in weights}  # never the residual
    assert all(torch.equal(first[k], second[k]) for k in first if k.endswith(SCALE_SUFFIX))  # from the noised delta
    assert not all(torch.equal(first[k], second[k]) for k in weights)


def test_without_dp_the_rounding_is_seeded_and_a_restarted_site_continues_with_its_residual(synthetic_root, tmp_path):
    config = _config(synthetic_root, tmp_path, "federation.compression=int8", "train.max_steps=1")
    weights = _global_weights(config)
    steady = SiteRunner(config, simulation_site_data(config, 0, 3), tmp_path / "steady")
    steady.train_round(1, weights)
    shutil.copytree(tmp_path / "steady", tmp_path / "restarted")  # the site's state folder after round 1
    second = steady.train_round(2, weights).shared
    fresh = SiteRunner(config, simulation_site_data(config, 0, 3), tmp_path / "restarted")  # a new daemon process
    again = fresh.train_round(2, weights).shared
    assert all(torch.equal(second[k], again[k]) for k in second)
    assert steady.state.residual is not None
    assert all(torch.equal(steady.state.residual[k], fresh.state.residual[k]) for k in weights)


@pytest.mark.parametrize("codec", ["none", "int8", "fp16"])
def test_a_reply_whose_arrays_are_text_is_left_out_and_the_round_goes_on(tmp_path, codec):
    """Attack (wave 3): one hospital answers with arrays of the right keys and shapes but a text dtype (Flower carries
    any NumPy dtype). The server must leave that reply out, as any undecodable update, not crash the whole run."""
    set_identity()
    config = load_config("smoke", [f"federation.compression={codec}", "federation.min_clients=1"])
    expected = {"encoder.w": (4, 6), "encoder.b": (6,)}
    global_weights = {"encoder.w": torch.randn(4, 6), "encoder.b": torch.randn(6)}
    strategy = build_strategy(config)
    strategy.attach(RunRecorder(tmp_path, config), expected, 1, site_names={0: "a", 1: "b"})
    list(strategy.configure_train(1, ArrayRecord(global_weights), config=ConfigRecord(), grid=_Grid([10, 11])))
    local = {k: v + 0.01 for k, v in global_weights.items()}
    if codec == "none":
        good = {k: v.numpy() for k, v in local.items()}
        text = {k: np.full(shape, "x") for k, shape in expected.items()}
    else:
        good = {k: v.numpy() for k, v in compress_update(local, global_weights, None, codec, seeded_generator(0))[0].items()}
        text = {k: np.full(v.shape, "x") for k, v in good.items()}
    replies = [reply(10, good, {"num-examples": 1.0, "site-index": 0.0}),
               reply(11, text, {"num-examples": 1.0, "site-index": 1.0})]
    arrays, _ = strategy.aggregate_train(1, replies)
    reasons = {e["site"]: e["reason"] for e in strategy.recorder.record(1).excluded}
    assert set(reasons) == {"b"}
    assert np.allclose(arrays["encoder.b"].numpy(), local["encoder.b"].numpy(), atol=1e-3)
