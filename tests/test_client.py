"""The hospital side: what a ClientApp reply holds, and state that survives rounds and restarts."""

import math

import pytest
import torch
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict

from client.client_app import _RUNNERS, evaluate, train
from client.site import SiteRunner, deployment_site_data, simulation_site_data
from common.config import load_config
from common.model import build_model, shared_keys, shared_state
from tests.conftest import write_jpeg
from tests.flower_helpers import run_config_of, train_message


def _config(root, tmp_path, *overrides):
    return load_config("smoke", [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", *overrides])


def _global_weights(config):
    torch.manual_seed(0)
    return shared_state(build_model(config.model, config.data.image_size), config.federation.share)


def test_a_reply_holds_only_the_shared_tensors_and_scalar_metrics(synthetic_root, tmp_path):
    config = _config(synthetic_root, tmp_path)
    shared = _global_weights(config)
    context = Context(run_id=7, node_id=3, node_config={"partition-id": 1, "num-partitions": 3,
                                                        "state-dir": str(tmp_path / "state")},
                      state=RecordDict(), run_config=run_config_of(config, **{"run-dir": str(tmp_path / "run")}))
    message = train_message(3, shared, {"server-round": 1})
    answer = train(message, context)
    content = answer.content
    assert set(content.keys()) == {"arrays", "metrics"}
    arrays, metrics = content["arrays"], content["metrics"]
    assert isinstance(arrays, ArrayRecord) and isinstance(metrics, MetricRecord)
    assert set(arrays.keys()) == set(shared) and all(k.startswith("encoder.") for k in arrays.keys())
    assert all(isinstance(v, float) for v in metrics.values())  # scalars only: no lists, no strings, no paths
    assert metrics["num-examples"] > 0 and math.isinf(metrics["epsilon"])
    assert not any(isinstance(v, (str, bytes)) for v in metrics.values())
    # what the site keeps (decoder, optimizer) stays in its state folder; nothing goes into Flower's context, which
    # the simulation engine copies to and from its worker at every message (hundreds of MB for ConvNeXt-Tiny)
    assert (tmp_path / "state" / "hospital_2" / "round-0001.pt").is_file() and len(context.state) == 0
    assert not (tmp_path / "run").exists()  # the coordinator's run folder holds nothing of the site
    evaluation = evaluate(train_message(3, shared, {}), context).content
    assert set(evaluation.keys()) == {"metrics"} and evaluation["metrics"]["val-reconstruction"] > 0
    _RUNNERS.clear()


def test_share_vae_sends_the_decoder_too(synthetic_root, tmp_path):
    config = _config(synthetic_root, tmp_path, "federation.share=vae")
    runner = SiteRunner(config, simulation_site_data(config, 0, 3), tmp_path / "state")
    assert any(k.startswith("decoder.") for k in shared_keys(runner.model, "vae"))
    output = runner.train_round(1, _global_weights(config))
    assert any(k.startswith("decoder.") for k in output.shared)


def test_a_restarted_site_continues_exactly_from_its_snapshot(synthetic_root, tmp_path):
    config = _config(synthetic_root, tmp_path)
    weights = _global_weights(config)
    steady = SiteRunner(config, simulation_site_data(config, 0, 3), tmp_path / "steady")
    steady.train_round(1, weights)
    second = steady.train_round(2, weights).shared
    restarted_dir = tmp_path / "restarted"
    SiteRunner(config, simulation_site_data(config, 0, 3), restarted_dir).train_round(1, weights)
    fresh = SiteRunner(config, simulation_site_data(config, 0, 3), restarted_dir)  # a new daemon process
    again = fresh.train_round(2, weights).shared
    assert all(torch.equal(second[k], again[k]) for k in second)


def test_dp_ledger_is_never_rewound(synthetic_root, tmp_path):
    config = _config(synthetic_root, tmp_path, "dp.enabled=true", "dp.noise_multiplier=1.0")
    weights = _global_weights(config)
    runner = SiteRunner(config, simulation_site_data(config, 0, 3), tmp_path / "state")
    eps1 = runner.train_round(1, weights).metrics["epsilon"]
    eps2 = runner.train_round(2, weights).metrics["epsilon"]
    # the server crashed after round 2 was sent; the resumed run repeats round 2 from round 1's state
    rerun = SiteRunner(config, simulation_site_data(config, 0, 3), tmp_path / "state")
    eps2_again = rerun.train_round(2, weights).metrics["epsilon"]
    assert 0 < eps1 < eps2 < eps2_again  # the repeated round is a new release and is counted


def test_a_hospital_daemon_reads_its_own_folder(tmp_path):
    for i in range(6):
        write_jpeg(tmp_path / "images" / f"img{i}.jpg", (80, 80), seed=i)
    config = load_config("smoke", [f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0", "data.test_fraction=0"])
    data = deployment_site_data(config, {"data-root": str(tmp_path / "images"), "site-name": "clinic_a", "site-index": 4})
    assert data.name == "clinic_a" and data.index == 4 and len(data.train_rows) == 6
    with pytest.raises(Exception, match="data-root"):
        deployment_site_data(config, {})


def test_a_hospitals_node_overrides_apply_on_top_of_the_runs_config_in_its_clientapp(synthetic_root, tmp_path):
    """The node config's dermfed-overrides reach the site's training through the real ClientApp, on top of the
    run's config (which keeps every other key); a dp.* override is refused there (the floor keys set privacy)."""
    config = _config(synthetic_root, tmp_path, "train.epochs=5", "train.batch_size=2", "train.max_steps=4")
    shared = _global_weights(config)

    def ask(node_id, overrides):
        node = {"partition-id": 1, "num-partitions": 3, "state-dir": str(tmp_path / f"state{node_id}"),
                "dermfed-overrides": overrides}
        context = Context(run_id=8, node_id=node_id, node_config=node, state=RecordDict(),
                          run_config=run_config_of(config))
        return train(train_message(node_id, shared, {"server-round": 1}), context)

    plain = ask(4, "")
    assert not plain.has_error(), plain.error
    assert plain.content["metrics"]["steps"] == 4.0  # the run's train.max_steps
    local = ask(5, "train.max_steps=1 train.lr=0.5")
    assert not local.has_error(), local.error
    assert local.content["metrics"]["steps"] == 1.0  # the hospital's own train.max_steps, not the run's
    site = _RUNNERS[(8, 5)].config
    assert site.train.lr == 0.5 and (site.model, site.data, site.dp) == (config.model, config.data, config.dp)
    refused = ask(6, "train.max_steps=1 dp.delta=0.5")  # a valid config: refused only because it sets dp.*
    assert refused.has_error() and refused.error.reason.startswith("config-error")


def test_a_repeated_round_in_a_running_daemon_restarts_from_the_previous_round(synthetic_root, tmp_path):
    """The server crashed after round 2 and resumes from round 1: the still-running site rewinds."""
    config = _config(synthetic_root, tmp_path)
    weights = _global_weights(config)
    runner = SiteRunner(config, simulation_site_data(config, 1, 3), tmp_path / "state")
    runner.train_round(1, weights)
    second = runner.train_round(2, weights)
    repeated = runner.train_round(2, weights)  # in memory: round 2; on disk: round 1's snapshot
    assert all(torch.equal(second.shared[k], repeated.shared[k]) for k in second.shared)


def test_a_wrong_data_format_at_a_hospital_is_a_clear_error(tmp_path):
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="folder"):
        deployment_site_data(load_config("smoke"), {"data-root": str(tmp_path), "data-format": "dicom"})


def test_another_runs_site_state_is_never_continued_under_other_locked_settings(synthetic_root, tmp_path):
    """A signed run may start at any of its rounds, and a site restores the state of the round before (its context,
    which Flower 1.42 keeps per run series, or its state folder). Run A: no DP, the decoder private; run B, signed by
    the same coordinator: DP, the whole model shared, starting at round 2. B's DP release must not continue A's
    optimizer (moments of un-noised gradients) or step: the site starts B afresh. A real resume (same locked
    settings) still continues (test_a_restarted_site_continues_exactly_from_its_snapshot)."""
    plain = _config(synthetic_root, tmp_path, "train.max_steps=1")
    SiteRunner(plain, simulation_site_data(plain, 0, 3), tmp_path / "state").train_round(1, _global_weights(plain))
    private = _config(synthetic_root, tmp_path, "federation.share=all", "dp.enabled=true", "dp.noise_multiplier=1.0")
    runner = SiteRunner(private, simulation_site_data(private, 0, 3), tmp_path / "state")
    result = runner.train_round(2, _global_weights(private))
    assert runner.state.step == int(result.metrics.get("steps", runner.trainer.steps_per_call())), runner.state.step
