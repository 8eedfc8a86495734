"""DP must hold against the coordinating server, which knows the config and receives every reply.

Written from the server's side: it tries to replay the noise, to read more than the privacy
status from a DP site's reply, to lower a hospital's privacy floor, and to learn file names
from a site's errors.
"""

import math
import shutil

import opacus.optimizers.optimizer_fast_gradient_clipping as opacus_optimizer
import pandas as pd
import pytest
import torch
from flwr.app import Context, RecordDict

import common.training as training
from client.client_app import _RUNNERS, evaluate, train
from client.policy import DP_REPLY_FIELDS, PrivacyFloor
from common.config import ConfigError, config_to_json, load_config
from common.model import ConvNeXtVAE, build_vae, shared_state
from common.privacy import PrivacyBudgetExhausted, PrivateTraining, epsilon_of, sample_rate_of
from common.training import LocalTrainer, SiteState
from tests.conftest import random_image_rows
from tests.flower_helpers import train_message


def _Images(n=40, size=32, seed=1):
    return random_image_rows(n, size, seed)


def _trainer(images, *overrides):
    config = load_config("smoke", ["train.max_steps=3", "train.epochs=10", *overrides])
    torch.manual_seed(0)  # the same initial weights for every trainer
    model = ConvNeXtVAE("convnext_atto", latent_dim=4, image_size=32, decoder_width=4)
    return LocalTrainer(config, model, images, site="hospital_a", site_index=0)


def _weights(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


@pytest.fixture()
def noise_draws(monkeypatch):
    """Every Gaussian noise tensor Opacus adds, in order (DermFed's DP optimizer is the ghost-clipping one)."""
    draws = []
    original = opacus_optimizer._generate_noise

    def spy(*args, **kwargs):
        noise = original(*args, **kwargs)
        draws.append(noise.detach().clone())
        return noise

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", spy)
    return draws


DP = ["dp.enabled=true", "dp.noise_multiplier=1.0"]


def test_the_server_cannot_replay_the_noise_from_config_seed_and_site_index(noise_draws):
    """Two sites with other images but the same config, seed and site index: no noise draw repeats."""
    _trainer(_Images(seed=1), *DP).train(SiteState())
    first = list(noise_draws)
    noise_draws.clear()
    _trainer(_Images(seed=2), *DP).train(SiteState())
    assert len(first) == len(noise_draws) > 0
    assert not any(torch.equal(a, b) for a, b in zip(first, noise_draws))


def _trained_weights(images, *overrides):
    trainer = _trainer(images, *overrides)
    trainer.train(SiteState())
    return _weights(trainer)


def test_the_same_images_twice_give_different_dp_updates_and_identical_plain_ones():
    images = _Images()
    assert not torch.equal(_trained_weights(images, *DP), _trained_weights(images, *DP))
    # without DP everything stays seeded and reproducible
    assert torch.equal(_trained_weights(images), _trained_weights(images))


def test_poisson_sampling_cannot_be_replayed_either(monkeypatch):
    drawn: list[list[list[int]]] = []
    original = training.poisson_batches

    def spy(*args, **kwargs):
        for batch in original(*args, **kwargs):
            drawn[-1].append(batch.tolist())
            yield batch

    monkeypatch.setattr(training, "poisson_batches", spy)
    for _ in range(2):
        drawn.append([])
        _trainer(_Images(), *DP, "train.max_steps=5").train(SiteState())
    assert len(drawn[0]) == len(drawn[1]) == 5  # one epoch of 40 / 8 batches
    assert drawn[0] != drawn[1]


def test_dp_without_poisson_sampling_and_secure_mode_are_refused():
    with pytest.raises(ConfigError, match="poisson_sampling=false is refused under DP"):
        load_config("smoke", [*DP, "dp.poisson_sampling=false"])
    with pytest.raises(ConfigError, match="torchcsprng"):
        load_config("smoke", [*DP, "dp.secure_mode=true"])
    assert not load_config("smoke", ["dp.poisson_sampling=false"]).dp.enabled  # without DP it does not matter


def test_a_call_that_would_end_above_the_target_by_any_margin_is_refused():
    images = _Images()
    rate = sample_rate_of(len(images), 8)
    exact = epsilon_of("rdp", {"history": [(1.0, rate, 3)], "mechanism": "rdp"}, 1e-5)
    below = _trainer(images, *DP, f"dp.target_epsilon={exact * (1 - 1e-6)!r}")
    before = _weights(below)
    with pytest.raises(PrivacyBudgetExhausted, match="refuses to train further"):
        below.train(SiteState())
    assert torch.equal(before, _weights(below))
    result = _trainer(images, *DP, f"dp.target_epsilon={exact!r}").train(SiteState())  # exactly the budget: allowed
    assert result.privacy.epsilon == pytest.approx(exact, rel=1e-12)


def test_an_empty_poisson_batch_still_releases_a_noise_only_update(noise_draws, monkeypatch):
    empties = []
    original = PrivateTraining.noise_only_step
    monkeypatch.setattr(PrivateTraining, "noise_only_step", lambda self: (empties.append(1), original(self)))
    trainer = _trainer(_Images(n=40), *DP, "train.batch_size=1", "train.max_steps=40")  # q = 1/40
    params = sum(1 for p in trainer.model.parameters() if p.requires_grad)
    result = trainer.train(SiteState())
    assert result.steps == 40 and empties  # P(no empty batch in 40 steps) is about 1e-8
    assert len(noise_draws) == 40 * params  # every accounted step added noise to every parameter
    assert result.privacy.steps == 40


# -- what a DP site's reply holds, through the real ClientApp ------------------------------------


def _context(tmp_path, node_id, partition=0, **node_config):
    return Context(run_id=11, node_id=node_id, node_config={"partition-id": partition, "num-partitions": 3, **node_config},
                   state=RecordDict(), run_config={"run-dir": str(tmp_path / "run")})


def _ask(config, context, kind=train, round_number=1):
    torch.manual_seed(0)
    shared = shared_state(build_vae(config.model, config.data.image_size), config.federation.share)
    message = train_message(context.node_id, shared, {"server-round": round_number,
                                                     "dermfed-config": config_to_json(config)})
    return kind(message, context)


@pytest.fixture()
def site_config(synthetic_root, tmp_path):
    def make(*overrides):
        return load_config("smoke", [f"data.root={synthetic_root}", f"data.cache_dir={tmp_path / 'cache'}", *overrides])

    yield make
    _RUNNERS.clear()


def test_a_dp_reply_holds_only_the_weights_and_the_privacy_status(site_config, tmp_path):
    config = site_config(*DP)
    context = _context(tmp_path, node_id=21)
    reply = _ask(config, context)
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    metrics = reply.content["metrics"]
    assert set(metrics.keys()) == set(DP_REPLY_FIELDS)
    assert metrics["num-examples"] == 1.0  # equal FedAvg weights: the training-set size stays at the site
    assert 0 < metrics["epsilon"] < math.inf and metrics["delta"] == config.dp.delta
    refused = _ask(config, context, kind=evaluate)
    assert refused.has_error() and refused.error.reason.startswith("evaluation-refused")
    declared = _ask(config, _context(tmp_path, node_id=22, partition=1, **{"public-num-examples": 120}))
    assert declared.content["metrics"]["num-examples"] == 120.0


def test_without_dp_the_research_metrics_stay(site_config, tmp_path):
    metrics = _ask(site_config(), _context(tmp_path, node_id=23)).content["metrics"]
    assert {"num-examples", "images-seen", "reconstruction", "kl", "total", "seconds"} <= set(metrics.keys())


def test_a_site_without_validation_images_does_not_evaluate_on_its_training_images(synthetic_root, tmp_path):
    from client.policy import ClientEvaluationRefused
    from client.site import SiteRunner, simulation_site_data

    config = load_config("smoke", [f"data.root={synthetic_root}", f"data.cache_dir={tmp_path / 'cache'}"])
    data = simulation_site_data(config, 0, 3)
    data.val_rows = data.val_rows[:0]
    runner = SiteRunner(config, data, tmp_path / "state")
    with pytest.raises(ClientEvaluationRefused, match="no validation images"):
        runner.evaluate(shared_state(runner.model, "encoder"))


# -- the hospital, not the coordinator, sets the privacy floor -----------------------------------


def test_a_site_whose_ledger_holds_a_budget_refuses_a_coordinator_asking_for_more(site_config, tmp_path):
    context = _context(tmp_path, node_id=31)
    assert not _ask(site_config("dp.enabled=true", "dp.target_epsilon=2"), context).has_error()
    _RUNNERS.clear()  # a new run of the coordinator, against the same state folder
    looser = _ask(site_config("dp.enabled=true", "dp.target_epsilon=100"), context)
    assert looser.has_error()
    assert "dp.target_epsilon=100" in looser.error.reason and "epsilon=2" in looser.error.reason
    _RUNNERS.clear()
    off = _ask(site_config(), context)
    assert off.has_error() and "dp.enabled=false" in off.error.reason


def test_a_hospitals_node_config_sets_the_floor(site_config, tmp_path):
    floor = {"dp-enabled": True, "dp-max-epsilon": 4, "dp-max-grad-norm": 0.5}
    cases = {"no DP": site_config(), "looser": site_config("dp.enabled=true", "dp.target_epsilon=8")}
    for name, config in cases.items():
        reply = _ask(config, _context(tmp_path / name, node_id=41, **floor))
        assert reply.has_error() and reply.error.reason.startswith("privacy-floor"), name
        _RUNNERS.clear()
    # a tiny fixed noise multiplier does not escape the ceiling: the site refuses before training
    greedy = _ask(site_config("dp.enabled=true", "dp.noise_multiplier=0.05"), _context(tmp_path / "g", node_id=42, **floor))
    assert greedy.has_error() and greedy.error.reason.startswith("privacy-budget-exhausted")
    _RUNNERS.clear()
    context = _context(tmp_path / "ok", node_id=43, **floor)
    reply = _ask(site_config("dp.enabled=true", "dp.target_epsilon=2", "dp.max_grad_norm=5"), context)
    assert not reply.has_error() and reply.content["metrics"]["epsilon"] <= 2
    assert _RUNNERS[(11, 43)].config.dp.max_grad_norm == 0.5  # the hospital's clipping norm, not the coordinator's


def test_node_overrides_cannot_touch_privacy_and_floors_only_tighten(site_config, tmp_path):
    reply = _ask(site_config(), _context(tmp_path, node_id=51, **{"dermfed-overrides": "dp.enabled=false"}))
    assert reply.has_error() and reply.error.reason.startswith("config-error")
    a, b = PrivacyFloor(True, 4.0, 1e-5, None), PrivacyFloor(False, 2.0, None, 0.5)
    assert a.stricter(b) == PrivacyFloor(True, 2.0, 1e-5, 0.5) == b.stricter(a)
    with pytest.raises(ConfigError, match="dp-enabled=true"):
        PrivacyFloor.from_node_config({"dp-max-epsilon": 4})


# -- errors carry no file names -----------------------------------------------------------------


def test_an_image_that_becomes_unreadable_mid_run_is_reported_without_its_name(synthetic_root, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    config = load_config("smoke", [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.use_cache=false"])
    context = _context(tmp_path, node_id=61)
    assert not _ask(config, context).has_error()
    meta = pd.read_csv(root / "synthetic_metadata.csv")
    site_images = meta[(meta["dataset"] == "hospital_1") & (meta["split"] == "train")]["image_id"]
    for image_id in site_images:
        (root / "images" / f"{image_id}.jpg").write_bytes(b"not a jpeg any more")
    failed = _ask(config, context, round_number=2)
    assert failed.has_error()
    reason = failed.error.reason
    assert reason.startswith("data-error") and "/" not in reason and ".jpg" not in reason
    assert not any(image_id in reason for image_id in site_images)
    assert any(".jpg" in record.getMessage() or ".jpg" in str(record.exc_info) for record in caplog.records)
    _RUNNERS.clear()
