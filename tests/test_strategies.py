"""Aggregation strategies as a registry (common/strategies/): names and keys checked against it; FedProx as published.

The toy strategy (tests/toy_strategy.py) is registered when its module is imported: by pytest here, and by every
process of a simulation through `DERMFED_PLUGINS` (tests/test_extensions.py runs it in a real `dermfed simulate`).
"""

from __future__ import annotations


import pytest
import torch

from common.strategies import STRATEGIES
import tests.toy_strategy  # noqa: F401 - registers the toy strategy



def test_every_strategy_names_existing_config_keys_and_a_flower_strategy():
    from flwr.serverapp import strategy as flower_strategies

    from common.config import FederationConfig

    assert list(STRATEGIES)[:4] == ["fedavg", "fedprox", "fedadam", "fedmedian"]
    for entry in STRATEGIES.values():
        assert set(entry.config_keys) <= set(FederationConfig.model_fields), entry.name
        assert issubclass(getattr(flower_strategies, entry.flower_class), flower_strategies.Strategy)


def test_an_unknown_strategy_is_refused_naming_the_registered_ones(capsys):
    from server.cli import main

    code = main(["simulate", "--config", "smoke", "federation.strategy=fedsgd"])
    err = capsys.readouterr().err
    assert code == 2
    assert "federation.strategy" in err and "'fedsgd'" in err
    for name in ("fedavg", "fedprox", "fedadam", "fedmedian", "toy-counting"):
        assert repr(name) in err


# A toy strategy with a client hook through a real `dermfed simulate`: tests/test_extensions.py (with a toy objective,
# format and arm in the same run).


# -- FedProx as published -------------------------------------------------------------------------------------------

def _distance_from_global(mu: float, *overrides: str) -> float:
    """After a few local AdamW steps from the global weights, how far the encoder moved from them."""
    from common.config import load_config
    from common.objectives.vae import ConvNeXtVAE
    from common.strategies.fedprox import ProximalTerm
    from common.training import LocalTrainer, SiteState
    from tests.conftest import random_image_rows

    config = load_config("smoke", ["train.max_steps=4", "train.epochs=10", *overrides])
    torch.manual_seed(0)
    model = ConvNeXtVAE("convnext_atto", latent_dim=4, image_size=32, decoder_width=4)
    trainer = LocalTrainer(config, model, random_image_rows(24), site="hospital_a", site_index=0)
    received = {name: p.detach().clone() for name, p in model.named_parameters() if name.startswith("encoder.")}
    hooks = []
    if mu:
        hooks = [ProximalTerm(mu)]
        hooks[0].bind(model, received)
    trainer.train(SiteState(), hooks=hooks)
    params = dict(model.named_parameters())
    return float(torch.sqrt(sum(((params[name].detach() - value) ** 2).sum() for name, value in received.items())))


@pytest.mark.parametrize("mu, privacy", [(1.0, ()), (100.0, ("dp.enabled=true", "dp.noise_multiplier=1.0"))],
                         ids=["no-dp", "dp"])
def test_a_large_mu_keeps_local_weights_closer_to_the_global_ones(mu, privacy):
    """The proximal gradient enters the optimizer step (under DP after the noise, which it must outweigh: hence
    the larger mu there). Applied outside AdamW as w -= lr * mu * (w - w_global), mu = 1 at lr 1e-3 moved the
    weights by 0.2% (1.499 against 1.497 here): FedProx behaved as FedAvg."""
    free, held = _distance_from_global(0.0, *privacy), _distance_from_global(mu, *privacy)
    assert held < 0.7 * free, (held, free)
