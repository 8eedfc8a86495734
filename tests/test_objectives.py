"""Objectives: the registry, and the VAE pinned bit-for-bit against the code before the objectives registry.

The first tests pin the VAE. The hashes below were recorded on main 0f4a099 (before `common/objectives/` existed): the VAE's
per-sample loss terms for a fixed seed, the weights after one local training call, and each
simulated hospital's shared weights after one federated round plus their FedAvg mean. Moving
the VAE behind the registry must not change a single bit of any of them.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import timm
import torch

from client.site import SiteRunner, simulation_site_data
from common.checkpoint import load_checkpoint
from common.config import ConfigError, apply_overrides, load_config
from common.data.batches import ImageRows
from common.data.pipeline import prepare_data
from common.data.splits import split_indices
from common.model import build_model, shared_state
from common.objectives import OBJECTIVES, register_objective
from common.objectives.vae import vae_loss_per_sample
from common.training import LocalTrainer, SiteState, seed_everything
from server.cli import main
from simulations.runner import resume_config
from tests.toy_objective import ColourObjective


@pytest.fixture(autouse=True)
def one_thread():
    """Float sums depend on how many threads split them: the pins hold for one compute thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sha(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _smoke(root, tmp_path, *overrides):
    return load_config("smoke", [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "train.device=cpu",
                                 *overrides])


PIN_LOSS_TERMS = "bb94bad60b34934756ce4e917005e1f7a939adf22085ac62a7e666575350727f"
PIN_LOSS_TERMS_WITH_DRAWS = "14fa61b51d49b577793a7f11b66199704fe0165bca5950aa34703543a5db750d"
PIN_ONE_LOCAL_CALL = "09b885995da5ad2019e2be07c08a5948b3ddb94ec0ac8e6865536af5faefa327"
PIN_ROUND_SITES = ["017884d1e4d637275fb614b33298513d23869a2a278a7338c24fb69c1e9f35a0",
                   "f86c030713eb28b7d5501866abe3320b35a9f0df5fc7a8158f72dda08130de0b",
                   "1828ae4987150609e21b1b7e37599b4ca753915c16286c1706185ba94f9896cb"]
PIN_ROUND_MEAN = "2f02dbbf3b8123e1a5bc4d5fb4f4079acaaa6e51f4a3da75d005bbc2c2ca05a4"
PIN_ROUND_LOSSES = [["0x1.2ab9d871c71c7p+7", "0x1.7277c6aaaaaabp+2", "0x1.364d9671c71c7p+7"],
                    ["0x1.0b56e15555555p+7", "0x1.97bb1aaaaaaabp+1", "0x1.11b5cd5555555p+7"],
                    ["0x1.fb1dde0000000p+6", "0x1.03fe820000000p+2", "0x1.05aee40000000p+7"]]  # each site's reply metrics reconstruction, kl, total (float.hex)


def test_vae_per_sample_loss_terms_are_pinned(synthetic_root, tmp_path):
    config = _smoke(synthetic_root, tmp_path)  # convnext_atto at 32 px, latent 16, decoder width 8
    seed_everything(0)
    model = build_model(config.model, config.data.image_size).train()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(1)
    terms = vae_loss_per_sample(images, model(images), 0.5)
    assert set(terms) == {"reconstruction", "kl", "total"} and all(v.shape == (4,) for v in terms.values())
    assert _sha(terms) == PIN_LOSS_TERMS
    latent = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))  # DP's path: the draws are handed in
    terms = vae_loss_per_sample(images, model(images, draws={"latent": latent}), 0.5)
    assert _sha(terms) == PIN_LOSS_TERMS_WITH_DRAWS


def test_vae_weights_after_one_local_training_call_are_pinned(synthetic_root, tmp_path):
    config = _smoke(synthetic_root, tmp_path, "train.max_steps=3")
    prepared = prepare_data(config)
    seed_everything(config.seed)
    model = build_model(config.model, config.data.image_size)
    trainer = LocalTrainer(config, model, ImageRows(prepared.store, split_indices(prepared.catalog, "train")))
    result = trainer.train(SiteState())
    assert result.steps == 3
    assert _sha(model.state_dict()) == PIN_ONE_LOCAL_CALL


def test_vae_federated_round_is_pinned(synthetic_root, tmp_path):
    """Three hospitals train round 1 from the same global weights (the simulation's SiteRunner path), then FedAvg."""
    config = _smoke(synthetic_root, tmp_path)
    torch.manual_seed(0)
    start = shared_state(build_model(config.model, config.data.image_size), config.federation.share)
    outputs = [SiteRunner(config, simulation_site_data(config, i, 3), tmp_path / f"site{i}").train_round(1, start)
               for i in range(3)]
    assert [_sha(o.shared) for o in outputs] == PIN_ROUND_SITES
    assert [[o.metrics[k].hex() for k in ("reconstruction", "kl", "total")] for o in outputs] == PIN_ROUND_LOSSES
    total = sum(o.metrics["num-examples"] for o in outputs)
    mean = {k: sum(o.shared[k] * (o.metrics["num-examples"] / total) for o in outputs) for k in start}
    assert _sha(mean) == PIN_ROUND_MEAN


# -- the registry -------------------------------------------------------------------------------------------

@pytest.fixture()
def toy():
    toy = register_objective("toy")(type("Toy", (ColourObjective,), {}))
    yield toy
    OBJECTIVES.pop("toy")


def test_an_objective_registered_from_a_test_module_pretrains_through_the_cli(toy, synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--config", "smoke", "--out", str(out), f"data.root={synthetic_root}",
                 f"data.cache_dir={tmp_path / 'cache'}", "train.device=cpu", "model.objective=toy",
                 "model.toy.weight=2"]) == 0
    printed = capsys.readouterr().out
    assert "epoch 1: colour " in printed and "kl" not in printed.split("checkpoint:")[0]
    history = json.loads((out / "history.json").read_text())
    assert {"colour", "total"} <= set(history[-1]) and "kl" not in history[-1] and "beta" not in history[-1]
    payload = load_checkpoint(out)
    assert payload["config"]["model"]["objective"] == "toy" and payload["config"]["model"]["toy"] == {"weight": 2.0}
    backbone = timm.create_model("convnext_atto", num_classes=0)
    backbone.load_state_dict(payload["encoder"], strict=True)  # the encoder is a plain timm state dict
    assert (out / "reconstructions.png").is_file()


def test_objective_names_and_keys_are_checked_against_the_registry(toy):
    with pytest.raises(ConfigError, match=r"model.objective: not a registered objective; did you mean toy\? "
                                          r"allowed: masked, toy, vae"):
        load_config("smoke", ["model.objective=tyo"])
    with pytest.raises(ConfigError, match=r"unknown config key 'model.toy.wieght' in section 'model.toy'; allowed: weight"):
        load_config("smoke", ["model.toy.wieght=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'model.latent_dim' in section 'model'; allowed: "
                                          r"drop_path_rate, encoder, masked, objective, toy, vae"):
        load_config("smoke", ["model.latent_dim=8"])
    with pytest.raises(ConfigError, match=r"model.toy.weight: Input should be greater than 0"):
        load_config("smoke", ["model.objective=toy", "model.toy.weight=0"])
    with pytest.raises(ConfigError, match=r"model.vae: beta must be a number, got true"):
        load_config("smoke", ["model.vae.beta=true"])
    with pytest.raises(ConfigError, match=r"federation.monitor=reconstruction is not supported by model.objective=toy; "
                                          r"it supports: none, linear-probe"):
        load_config("smoke", ["model.objective=toy", "federation.share=all", "federation.monitor=reconstruction"])
    switched = apply_overrides(load_config("smoke"), ["model.objective=toy"])  # one override; the VAE's settings stay
    assert switched.model.settings().weight == 1.0 and switched.model.vae.latent_dim == 16


def test_an_unknown_objective_exits_2_with_the_allowed_names(capsys):
    assert main(["config", "--config", "smoke", "model.objective=mae"]) == 2
    assert "allowed: masked, vae" in capsys.readouterr().err


OLD_RUN_CONFIG = """seed: 0
data: {format: synthetic, root: data/smoke, image_size: 32}
model:
  encoder: convnext_atto
  latent_dim: 16
  decoder_width: 8
  drop_path_rate: 0.0
  beta: 1.0
  kl_warmup_steps: 0
federation: {share: vae, monitor: reconstruction}
"""


def test_a_run_config_written_before_objectives_still_loads_and_resumes_with_its_locks(tmp_path):
    from tests.test_run_folder import _simulation_run

    run = _simulation_run(tmp_path / "old-run", 1, "federation.num_rounds=3")  # a resumable run: round 1 of 3 done
    (run / "config.yaml").write_text(OLD_RUN_CONFIG.replace("federation: {", "federation: {num_rounds: 3, "))
    config = load_config(run / "config.yaml")
    assert config.model.objective == "vae" and config.federation.share == "all"
    assert config.model.vae.model_dump() == {"latent_dim": 16, "decoder_width": 8, "beta": 1.0, "kl_warmup_steps": 0}
    assert resume_config(run, ["model.vae.beta=0.5"]).model.vae.beta == 0.5  # a schedule may change on resume
    with pytest.raises(Exception, match=r"cannot change model.vae.latent_dim: 16 -> 32"):
        resume_config(run, ["model.vae.latent_dim=32"])
    both = OLD_RUN_CONFIG.replace("  beta: 1.0\n", "  beta: 1.0\n  vae: {beta: 2.0}\n")
    (run / "config.yaml").write_text(both)
    with pytest.raises(ConfigError, match=r"model.beta and model.vae.beta are both given"):
        load_config(run / "config.yaml")
