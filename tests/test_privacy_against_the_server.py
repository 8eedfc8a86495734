"""DP must hold against the coordinating server, which knows the config and receives every reply.

Written from the server's side, with the keys it controls (the whole run config: dp.*, train.*,
run-dir, seed) and through the real ClientApp where a hospital is involved: it tries to replay
or search the noise, to widen one image's influence with randomness it knows, to read more than
the privacy status from a DP site's reply (the training-set size through epsilon included), to
lower or reset a hospital's privacy floor, to spend noisy steps that are never counted, and to
learn file names from a site's errors.
"""

import json
import math
import shutil
import struct

import numpy as np
import opacus.optimizers.optimizer_fast_gradient_clipping as opacus_optimizer
import pandas as pd
import pytest
import torch
from flwr.app import Context, RecordDict

import common.privacy as privacy
import common.training as training
from client.client_app import _RUNNERS, evaluate, train
from client.policy import DP_REPLY_FIELDS, PrivacyFloor
from common.config import ConfigError, load_config
from common.data.batches import ImageRows
from common.data.stores import MemmapStore
from common.model import build_model, shared_state
from common.objectives.vae import ConvNeXtVAE
from common.privacy import PrivacyBudgetExhausted, PrivateTraining, epsilon_of, public_size, sample_rate_of
from common.strategies.fedprox import ProximalTerm
from common.training import LocalTrainer, SiteState
from tests.conftest import random_image_rows
from tests.flower_helpers import run_config_of, train_message


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
    assert len(drawn[0]) == len(drawn[1]) == 8  # one epoch of the public size 64 / 8 batches, drawn before it starts
    assert drawn[0] != drawn[1]


def test_poisson_inclusion_is_exactly_the_rate_accounted():
    """float64 uniforms are k / 2^53, so u < q holds with probability exactly q for q on that grid; the rate is
    rounded up to the grid and the rounded rate is the one the accountant counts (float32 was above q by up to 2^-24)."""
    from common.data.batches import poisson_batches

    rate = privacy.poisson_rate(1 / 15)
    assert 1 / 15 <= rate < 1 / 15 + 2.0 ** -53 and (rate * 2.0 ** 53).is_integer()
    state = privacy.secret_generator().get_state()
    sampler, judge = torch.Generator(), torch.Generator()
    sampler.set_state(state)
    judge.set_state(state)
    batch, = poisson_batches(20_000, rate, 1, sampler)
    uniforms = torch.rand(20_000, generator=judge, dtype=torch.float64)
    assert torch.equal(uniforms * 2.0 ** 53, torch.floor(uniforms * 2.0 ** 53))
    assert np.array_equal(batch, torch.nonzero(uniforms < rate).flatten().numpy())
    config = load_config("smoke", [*DP, "train.max_steps=2", "train.epochs=1"])
    model = ConvNeXtVAE("convnext_atto", latent_dim=4, image_size=32, decoder_width=4)
    trainer = LocalTrainer(config, model, _Images(), site="declared", declared_size=120)  # q = 1 / ceil(120 / 8)
    (_, accounted, steps), = trainer.train(SiteState()).state.accountant["history"]
    assert accounted == rate != 1 / 15 and steps == 2


def test_dp_without_poisson_sampling_and_secure_mode_are_refused():
    with pytest.raises(ConfigError, match="poisson_sampling=false is refused under DP"):
        load_config("smoke", [*DP, "dp.poisson_sampling=false"])
    with pytest.raises(ConfigError, match="torchcsprng"):
        load_config("smoke", [*DP, "dp.secure_mode=true"])
    assert not load_config("smoke", ["dp.poisson_sampling=false"]).dp.enabled  # without DP it does not matter


def test_a_call_that_would_end_above_the_target_by_any_margin_is_refused():
    images = _Images()
    rate = sample_rate_of(public_size(len(images)), 8)  # 40 images: accounted as the public bucket of 64
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


def _context(tmp_path, node_id, partition=0, run_id=11, **node_config):
    """A simulated hospital's node; its state folder is the hospital's (`state-dir`), the run folder the coordinator's."""
    node_config = {"partition-id": partition, "num-partitions": 3, "state-dir": str(tmp_path / "state"), **node_config}
    return Context(run_id=run_id, node_id=node_id, node_config=node_config, state=RecordDict(),
                   run_config={"run-dir": str(tmp_path / "run")})


def _ask(config, context, kind=train, round_number=1):
    """The coordinator's run carries `config` in its run config (a site keeps the first one it got for a run)."""
    torch.manual_seed(0)
    shared = shared_state(build_model(config.model, config.data.image_size), config.federation.share)
    context.run_config = {**context.run_config, **run_config_of(config)}
    message = train_message(context.node_id, shared, {"server-round": round_number})
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
    # a tiny fixed noise multiplier, or none, does not escape the ceiling: refused before training, naming both values
    for sigma in ("0.05", "0"):
        greedy = _ask(site_config("dp.enabled=true", f"dp.noise_multiplier={sigma}"),
                      _context(tmp_path / f"g{sigma}", node_id=42, **floor))
        assert greedy.has_error() and greedy.error.reason.startswith("privacy-floor"), greedy.error.reason
        assert f"dp.noise_multiplier={float(sigma)}" in greedy.error.reason or f"dp.noise_multiplier={sigma}" in \
            greedy.error.reason
        assert "epsilon=4" in greedy.error.reason
        assert not (tmp_path / f"g{sigma}" / "state" / "hospital_1" / "privacy_ledger.json").exists()  # nothing spent
        _RUNNERS.clear()
    context = _context(tmp_path / "ok", node_id=43, **floor)
    reply = _ask(site_config("dp.enabled=true", "dp.target_epsilon=2", "dp.max_grad_norm=5"), context)
    assert not reply.has_error() and reply.content["metrics"]["epsilon"] <= 2
    assert _RUNNERS[(11, 43)].config.dp.max_grad_norm == 0.5  # the hospital's clipping norm, not the coordinator's


def _round_with_another_config(config, context, round_number):
    """The coordinator's later round carrying another config, in every channel it controls: the instruction's config
    record (where configs travelled before) and the run config it hands the site."""
    torch.manual_seed(0)
    shared = shared_state(build_model(config.model, config.data.image_size), config.federation.share)
    context.run_config = {**context.run_config, **run_config_of(config)}
    message = train_message(context.node_id, shared, {"server-round": round_number,
                                                     "dermfed-config": config.model_dump_json()})
    return train(message, context)


def test_the_coordinator_cannot_change_a_runs_config_once_a_site_has_it(site_config, tmp_path):
    """A run has one config at a site: the first it got. Round 1 asks a hospital (ceiling epsilon=4) for
    dp.target_epsilon=50 and is refused; round 2 of the same run asks for 2, then for no DP at all. Before, the
    site took round 2's config (a coordinator could try config after config within one run); now both stay
    refused, naming the run's config. And a site that trained under DP keeps the run's DP settings when a later
    round asks for none."""
    floor = {"dp-enabled": True, "dp-max-epsilon": 4}
    context = _context(tmp_path, node_id=151, **floor)
    first = _ask(site_config("dp.enabled=true", "dp.target_epsilon=50"), context)
    assert first.has_error() and "dp.target_epsilon=50" in first.error.reason, first.error
    for later in (site_config("dp.enabled=true", "dp.target_epsilon=2"), site_config()):
        reply = _round_with_another_config(later, context, round_number=2)
        assert reply.has_error() and "dp.target_epsilon=50" in reply.error.reason, \
            reply.error if reply.has_error() else dict(reply.content["metrics"])
    assert not (tmp_path / "state" / "hospital_1" / "privacy_ledger.json").exists()  # nothing trained, nothing spent

    trained = _context(tmp_path / "trained", node_id=152)  # no floor of its own: the run's DP is all it has
    first = _ask(site_config(*DP), trained)
    assert not first.has_error(), first.error
    plain = _round_with_another_config(site_config(), trained, round_number=2)
    assert not plain.has_error(), plain.error
    metrics = plain.content["metrics"]
    assert set(metrics.keys()) == set(DP_REPLY_FIELDS)  # still the run's DP reply: no losses, no image count
    assert first.content["metrics"]["epsilon"] < metrics["epsilon"] < math.inf
    assert _RUNNERS[(11, 152)].config.dp.enabled


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


# -- noise nobody can search ----------------------------------------------------------------------


def _stub_entropy(monkeypatch, seed):
    """The OS entropy every secret generator is filled from, replaced by a reproducible stream (tests only)."""
    rng = np.random.default_rng(seed)
    monkeypatch.setattr(privacy, "entropy", lambda size: rng.bytes(size))


def _seeded_mt_state(words):
    """Whether a Mersenne Twister state is one that `manual_seed` of ANY seed produces: torch keeps 32 bits of the
    seed in word 0 and derives the other 623 words from it (the MT19937 initialisation recurrence)."""
    return all(words[i] == (1812433253 * (words[i - 1] ^ (words[i - 1] >> 30)) + i) & 0xFFFFFFFF for i in range(1, 624))


def test_every_bit_of_a_secret_generators_state_matters(monkeypatch):
    """Two generators whose states agree in all but high-order bits give different streams; torch's 64-bit
    manual_seed does not (it keeps the low 32 bits): the attack the issue measured."""
    assert torch.equal(torch.rand(64, generator=torch.Generator().manual_seed(7)),
                       torch.rand(64, generator=torch.Generator().manual_seed(7 | 0xDEADBEEF << 32)))
    words = np.random.default_rng(0).bytes(4 * 624)
    high = bytearray(words)
    high[4 * 300 + 3] ^= 0x80  # the top bit of one 32-bit word of the state
    streams = []
    for state in (words, bytes(high)):
        chunks = iter([state, b"\x00" * 8])
        monkeypatch.setattr(privacy, "entropy", lambda size: next(chunks))
        streams.append(torch.rand(4096, generator=privacy.secret_generator()))
    assert not torch.equal(*streams)
    _stub_entropy(monkeypatch, 1)
    state = privacy.secret_generator().get_state().numpy().tobytes()
    assert not _seeded_mt_state(struct.unpack("<624Q", state[24:24 + 624 * 8]))  # no seed of any width reaches it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_secret_generator_uses_its_whole_seed_and_offset(monkeypatch):
    base = np.random.default_rng(0).bytes(16)
    seed_high, offset_high = bytearray(base), bytearray(base)
    seed_high[7] ^= 0x80  # the top bit of the 64-bit Philox seed
    offset_high[15] ^= 0x40  # a high bit of the offset
    streams = []
    for state in (base, bytes(seed_high), bytes(offset_high)):
        monkeypatch.setattr(privacy, "entropy", lambda size, state=state: state)
        streams.append(torch.rand(4096, device="cuda", generator=privacy.secret_generator("cuda")))
    assert not torch.equal(streams[0], streams[1]) and not torch.equal(streams[0], streams[2])


def test_the_noise_of_a_real_dp_round_cannot_be_regenerated_from_a_64_bit_seed(site_config, tmp_path, monkeypatch):
    """The issue's attack, through the real ClientApp on the CPU the coordinator can force (train.device=cpu):
    regenerate the noise from the generator's 64-bit seed with other high 32 bits. Replaying the generator's
    whole state (which never leaves the site) does reproduce it: the capture is the real noise."""
    seen = {}
    original = opacus_optimizer._generate_noise

    def spy(std, reference, generator=None, secure_mode=False):
        if "state" not in seen:
            seen.update(state=generator.get_state(), seed=generator.initial_seed(), std=std, shape=reference.shape)
        noise = original(std, reference, generator, secure_mode)
        seen.setdefault("noise", noise.detach().clone())
        return noise

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", spy)
    config = site_config("dp.enabled=true", "dp.target_epsilon=8", "train.device=cpu", "train.optimizer=sgd")
    reply = _ask(config, _context(tmp_path, node_id=81, **{"dp-enabled": True, "dp-max-epsilon": 8}))
    assert not reply.has_error(), reply.error

    def regenerated(generator):
        return torch.normal(mean=0, std=seen["std"], size=seen["shape"], generator=generator)

    replay = torch.Generator()
    replay.set_state(seen["state"])
    assert torch.equal(regenerated(replay), seen["noise"])
    attacker = torch.Generator().manual_seed(seen["seed"] ^ (0xDEADBEEF << 32))
    assert not torch.equal(regenerated(attacker), seen["noise"])
    assert not _seeded_mt_state(struct.unpack("<624Q", seen["state"].numpy().tobytes()[24:24 + 624 * 8]))


def test_the_same_config_twice_through_the_real_clientapp_gives_other_weights_under_dp_and_the_same_without(
        site_config, tmp_path):
    """The coordinator knows the whole config, seed included, and can ask a site the same round twice (two runs):
    under DP the two replies differ (the noise, sampling and augmentation come from the site's secret generators,
    so no replay reproduces them); without DP they are bit-identical (runs are reproducible)."""
    def reply_weights(config, run: str) -> dict[str, torch.Tensor]:
        _RUNNERS.clear()
        floor = {"dp-enabled": True, "dp-max-epsilon": 50} if config.dp.enabled else {}
        reply = _ask(config, _context(tmp_path / run, node_id=31, **floor))
        assert not reply.has_error(), reply.error
        return reply.content["arrays"].to_torch_state_dict()

    for overrides, differ in ((DP, True), ((), False)):
        config = site_config(*overrides)
        first, second = reply_weights(config, f"first{differ}"), reply_weights(config, f"second{differ}")
        assert first.keys() == second.keys()
        assert any(not torch.equal(first[k], second[k]) for k in first) == differ, overrides


def test_a_dp_run_differs_from_a_rerun_only_through_its_secret_randomness_and_a_plain_run_not_at_all(monkeypatch):
    """Same seed, same images, same initial weights: two DP runs differ; with the OS entropy stubbed alike they are
    identical, so nothing but the secret generators (noise, sampling, augmentation, latent samples) tells them apart.
    Without DP everything stays seeded: two runs are bit-identical."""
    images = _Images()
    weights = []
    for entropy_seed in (5, 5, None):
        if entropy_seed is None:
            monkeypatch.undo()
        else:
            _stub_entropy(monkeypatch, entropy_seed)
        weights.append(_trained_weights(images, *DP))
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])
    assert torch.equal(_trained_weights(images), _trained_weights(images))


# -- one image changes the clipped sum by at most C ------------------------------------------------


def test_one_appended_image_changes_the_clipped_gradient_sum_by_at_most_the_clipping_norm(monkeypatch):
    """DermFed's own DP step (ghost clipping via make_private, augmentation and latent samples on), in float64:
    the clipped gradient sum over D plus one appended image minus that over D, with the same generator states,
    has norm <= C. Randomness drawn by batch position would move every other image's contribution too."""
    clip = 0.01  # every image's gradient is clipped: each contributes a vector of norm C
    config = load_config("smoke", ["dp.enabled=true", "dp.noise_multiplier=1.0", f"dp.max_grad_norm={clip}",
                                   "train.optimizer=sgd", "train.momentum=0", "train.weight_decay=0", "train.lr=1.0",
                                   "train.scheduler=constant", "train.warmup_steps=0", "train.max_steps=1",
                                   "train.epochs=1", "train.batch_size=16", "train.device=cpu",
                                   "model.vae.kl_warmup_steps=0"])
    monkeypatch.setattr(opacus_optimizer, "_generate_noise", lambda std, reference, *a, **k: torch.zeros_like(reference))
    pixels = np.random.default_rng(3).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    sums = []
    for rows in (9, 10):  # both in the public size bucket of 16: q = 1 (every image in the batch), the same scale
        _stub_entropy(monkeypatch, 11)  # the same generator states for both data sets
        torch.manual_seed(0)
        model = ConvNeXtVAE("convnext_atto", latent_dim=4, image_size=32, decoder_width=4).double()
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        trainer = LocalTrainer(config, model, ImageRows(MemmapStore(pixels[:rows]), np.arange(rows)), site="a")
        assert trainer.sample_rate == 1.0 and trainer.accounted_size == 16
        trainer.train(SiteState())
        after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        sums.append((before - after) * 16 / 1.0)  # SGD, lr 1: the update is the clipped sum / expected batch size
    assert sums[0].dtype == torch.float64
    assert float(sums[0].norm()) > 2 * clip  # nine clipped contributions (not aligned: their sum is shorter than 9 C)
    assert float((sums[1] - sums[0]).norm()) <= clip * (1 + 1e-9)


# -- the hospital's ceiling, which no coordinator key moves ----------------------------------------


@pytest.mark.parametrize("case", ["delta 0.5", "no noise", "no ceiling"])
def test_a_coordinator_cannot_choose_delta_noise_or_an_unbounded_epsilon(site_config, tmp_path, caplog, case):
    """The README's own node config (no dp-delta) against delta 0.5 or no noise; a hospital without a ceiling."""
    floor = {"dp-enabled": True, "dp-max-epsilon": 8}
    if case == "delta 0.5":
        reply = _ask(site_config("dp.enabled=true", "dp.target_epsilon=4", "dp.delta=0.5"),
                     _context(tmp_path, node_id=91, **floor))
        assert reply.has_error() and reply.error.reason.startswith("privacy-floor"), reply.error
        assert "dp.delta=0.5" in reply.error.reason and "delta=1e-05" in reply.error.reason
    elif case == "no noise":
        reply = _ask(site_config("dp.enabled=true", "dp.noise_multiplier=0"), _context(tmp_path, node_id=92, **floor))
        assert reply.has_error() and reply.error.reason.startswith("privacy-floor"), reply.error
        assert "dp.noise_multiplier=0" in reply.error.reason and "epsilon=8" in reply.error.reason
    else:
        reply = _ask(site_config("dp.enabled=true", "dp.noise_multiplier=0"),
                     _context(tmp_path, node_id=93, **{"dp-enabled": True}))
        assert reply.has_error() and reply.error.reason.startswith("config-error"), reply.error
        assert "dp-max-epsilon" in caplog.text  # the hospital's own log names the key to set
    assert not (tmp_path / "state" / "hospital_1" / "privacy_ledger.json").exists()  # nothing was spent
    _RUNNERS.clear()


def test_a_second_run_folder_continues_the_sites_ledger(site_config, tmp_path, monkeypatch):
    """Without a state-dir the ledger lives in the hospital's ~/.dermfed/state, wherever the coordinator's run-dir is."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    floor = {"dp-enabled": True, "dp-max-epsilon": 3}
    config = site_config("dp.enabled=true", "dp.target_epsilon=3", "federation.num_rounds=1")

    def context(run, run_id):
        return Context(run_id=run_id, node_id=101, node_config={"partition-id": 0, "num-partitions": 3, **floor},
                       state=RecordDict(), run_config={"run-dir": str(tmp_path / run)})

    first = _ask(config, context("run-a", 1))
    assert not first.has_error() and first.content["metrics"]["epsilon"] == pytest.approx(3, rel=0.02)
    assert (tmp_path / "home" / ".dermfed" / "state" / "hospital_1" / "privacy_ledger.json").is_file()
    assert not (tmp_path / "run-a").exists()
    _RUNNERS.clear()
    second = _ask(config, context("run-b", 2))  # a new run, a new run folder: the same lifetime budget
    assert second.has_error() and second.error.reason.startswith("privacy-budget-exhausted")
    _RUNNERS.clear()


@pytest.mark.parametrize("damage", ["deleted", "floor removed", "unreadable"])
def test_a_damaged_ledger_of_a_site_that_trained_is_refused_not_started_afresh(site_config, tmp_path, damage):
    floor = {"dp-enabled": True, "dp-max-epsilon": 2}
    context = _context(tmp_path, node_id=111, **floor)
    assert not _ask(site_config("dp.enabled=true", "dp.target_epsilon=2"), context).has_error()
    ledger = tmp_path / "state" / "hospital_1" / "privacy_ledger.json"
    if damage == "deleted":
        ledger.unlink()
    elif damage == "floor removed":
        record = json.loads(ledger.read_text())
        del record["floor"]
        ledger.write_text(json.dumps(record))
    else:
        ledger.write_text('{"accountant": ')
    _RUNNERS.clear()  # a restarted daemon, a new run asking for much more
    reply = _ask(site_config("dp.enabled=true", "dp.target_epsilon=50"), _context(tmp_path, node_id=112))
    assert reply.has_error() and reply.error.reason.startswith("privacy-ledger-corrupt"), reply.error.reason
    assert "/" not in reply.error.reason and "JSONDecodeError" not in reply.error.reason
    _RUNNERS.clear()


# -- every noisy step counted --------------------------------------------------------------------------


def test_a_round_that_fails_half_way_has_spent_all_its_steps(site_config, tmp_path, monkeypatch):
    """An image read fails at step 3 of 4 in round 2: its noisy steps changed the private decoder, so the
    ledger counts the whole call, and round 3's epsilon covers three calls."""
    floor = {"dp-enabled": True, "dp-max-epsilon": 100}
    config = site_config("dp.enabled=true", "dp.noise_multiplier=1.0", "train.epochs=2", "train.max_steps=4")
    context = _context(tmp_path, node_id=121, **floor)
    first = _ask(config, context)
    assert not first.has_error(), first.error
    ledger = tmp_path / "state" / "hospital_1" / "privacy_ledger.json"
    (sigma, rate, steps), = json.loads(ledger.read_text())["accountant"]["history"]
    assert steps == 4
    original, reads = ImageRows.read, []

    def failing_read(self, positions):
        reads.append(1)
        if len(reads) == 3:
            raise OSError("an image of this site became unreadable (test)")
        return original(self, positions)

    monkeypatch.setattr(ImageRows, "read", failing_read)
    failed = _ask(config, context, round_number=2)
    assert failed.has_error() and len(reads) == 3
    assert json.loads(ledger.read_text())["accountant"]["history"] == [[sigma, rate, 8]]
    monkeypatch.setattr(ImageRows, "read", original)
    third = _ask(config, context, round_number=3)
    assert not third.has_error(), third.error
    spent = {"history": [(sigma, rate, 12)], "mechanism": "rdp"}
    assert third.content["metrics"]["epsilon"] == pytest.approx(epsilon_of("rdp", spent, config.dp.delta), rel=1e-12)
    _RUNNERS.clear()


# -- epsilon reveals no more than public values ----------------------------------------------------------


def test_epsilon_does_not_reveal_the_training_set_size(site_config, tmp_path):
    """hospital_2 and hospital_3 hold 6 and 8 training images. With train.batch_size=1 the old epsilon singled
    out N (q = 1/N); now both report one epsilon, which every N of the public bucket (5..8) would give."""
    config = site_config("dp.enabled=true", "dp.noise_multiplier=1.0", "train.batch_size=1", "train.max_steps=4")
    replies = [_ask(config, _context(tmp_path / f"p{p}", node_id=130 + p, partition=p)) for p in (1, 2)]
    sizes = [len(_RUNNERS[(11, 130 + p)].images) for p in (1, 2)]
    assert sizes == [6, 8]
    epsilons = [r.content["metrics"]["epsilon"] for r in replies]
    assert epsilons[0] == epsilons[1]
    # the coordinator's inversion: which training-set sizes give the reported epsilon?
    histories, store = {}, MemmapStore(np.zeros((1, 32, 32, 3), dtype=np.uint8))
    model = ConvNeXtVAE("convnext_atto", latent_dim=4, image_size=32, decoder_width=4)
    for n in range(1, 3001):
        trainer = LocalTrainer(config, model, ImageRows(store, np.zeros(n, dtype=np.int64)), site="candidate")
        histories.setdefault(tuple(map(tuple, trainer.dp_plan(SiteState()).accountant_after["history"])), []).append(n)
    consistent = [n for history, ns in histories.items()
                  if epsilon_of("rdp", {"history": list(history), "mechanism": "rdp"}, config.dp.delta) == epsilons[0]
                  for n in ns]
    assert consistent == [5, 6, 7, 8]
    # a hospital that declares its count public is accounted with it, whatever its N
    declared = [_ask(config, _context(tmp_path / f"d{p}", node_id=140 + p, partition=p, **{"public-num-examples": 100}))
                for p in (0, 1)]
    assert declared[0].content["metrics"]["epsilon"] == declared[1].content["metrics"]["epsilon"]
    assert declared[0].content["metrics"]["num-examples"] == 100.0
    _RUNNERS.clear()


def test_fedprox_pulls_every_shared_parameter_under_dp():
    """FedProx binds parameters by identity: DP-SGD's layout change renames ConvNeXt's MLP and gamma
    parameters, and a lookup by name after it missed them (66 of 126 encoder tensors pulled)."""
    trainer = _trainer(_Images(), "dp.enabled=true", "dp.noise_multiplier=1.0", "train.optimizer=sgd",
                       "train.lr=0.1", "train.max_steps=1")
    reference = {name: p.detach() + 100.0 for name, p in trainer.model.named_parameters() if name.startswith("encoder.")}
    proximal = ProximalTerm(10.0)
    proximal.bind(trainer.model, reference)  # the plain model, as a site binds it
    trainer.train(hooks=[proximal])  # lr * mu = 1: the step lands on the anchor, but for lr times the noisy gradient
    params = dict(trainer.model.named_parameters())
    assert len(reference) > 100
    pulled = [name for name, anchor in reference.items() if float((params[name] - anchor).abs().max()) < 1.0]
    assert len(pulled) == len(reference), f"{len(reference) - len(pulled)} tensors were not pulled toward the global model"


def test_a_run_config_the_site_could_not_read_stays_refused_for_the_run():
    """README: a config the site refused stays refused for the whole run. One that did not even parse too: the
    coordinator may not try config after config within one run until one passes (a new run may bring a new one)."""
    import base64

    from common.config import ConfigPerRun, load_config
    from tests.flower_helpers import run_config_of

    per_run = ConfigPerRun()
    unreadable = {"dermfed-config": base64.urlsafe_b64encode(b'{"dp": {"enabled": "maybe"}}').decode()}
    good = run_config_of(load_config("smoke"))
    for run_config in (unreadable, good):
        with pytest.raises(ConfigError, match="dp.enabled"):
            per_run(5, run_config)
    assert per_run(6, good).dp.enabled is False
