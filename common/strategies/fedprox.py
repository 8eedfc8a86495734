"""FedProx (Li et al., 2020): FedAvg at the server; each site adds (mu/2)||w - w_global||^2 to its objective.

The server side is Flower's FedProx, whose whole contract with sites is one key of each train
instruction, `proximal-mu`. The site's hook adds the term's gradient mu * (w - w_global) to
each parameter's gradient inside the optimizer step, after DP-SGD's clipping and noise (it
depends on no sample, so it costs no privacy and is not clipped), so that the optimizer
(AdamW by default) treats it as part of the objective, as published. The global weights are
bound to the parameters by identity before DP-SGD wraps the model.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch

from common.strategies.base import ClientHook, Strategy, bind_by_identity, register

if TYPE_CHECKING:
    from common.config import DermFedConfig

MU_KEY = "proximal-mu"  # what Flower's FedProx puts in every train instruction


class ProximalTerm(ClientHook):
    """Adds mu * (w - w_global) to every bound parameter's gradient at each step."""

    def __init__(self, mu: float):
        self.mu = mu
        self.anchors: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    @classmethod
    def from_round(cls, instruction: Mapping[str, Any], config: "DermFedConfig") -> Optional["ProximalTerm"]:
        mu = float(instruction.get(MU_KEY, 0.0))
        if not math.isfinite(mu) or mu < 0:
            raise ValueError(f"the instruction's {MU_KEY} {mu!r} is not a finite number >= 0")
        return cls(mu) if mu > 0 else None

    def bind(self, model: torch.nn.Module, reference: Mapping[str, torch.Tensor]) -> None:
        self.anchors = bind_by_identity(model, reference)

    @torch.no_grad()
    def before_update(self) -> None:
        for param, anchor in self.anchors:
            pull = (param - anchor).mul_(self.mu)
            if param.grad is None:
                param.grad = pull
            else:
                param.grad.add_(pull)

    def release(self) -> None:
        self.anchors = []


def _server_kwargs(config: "DermFedConfig") -> dict[str, Any]:
    return {"proximal_mu": config.federation.proximal_mu}


def _instruction(federation: Mapping[str, Any]) -> dict[str, Any]:
    return {MU_KEY: float(federation["proximal_mu"])}  # Flower's FedProx sends it in every train instruction


FEDPROX = register(Strategy(name="fedprox", flower_class="FedProx", config_keys=("proximal_mu",),
                            server_kwargs=_server_kwargs, client_hook=ProximalTerm, instruction=_instruction))
