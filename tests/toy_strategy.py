"""A toy aggregation strategy with a client hook, registered from the tests (see tests/test_strategies.py).

It lives in its own module, not in a `test_*.py` file: Flower's app bundle (FAB) leaves test files out, and the
simulation's processes import this module from the bundle (`DERMFED_PLUGINS=tests.toy_strategy`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import torch

from common.strategies import ClientHook, Strategy, bind_by_identity, register

LOG_VAR = "DERMFED_TOY_STRATEGY_LOG"  # where the toy hook of each simulated hospital appends what it saw


class CountingHook(ClientHook):
    """Counts the optimizer steps it is called in, and records the round's `proximal-mu` and how many
    parameters it bound: proof that the instruction, the binding and the per-step call all reached it."""

    def __init__(self, mu: float):
        self.mu, self.bound, self.steps = mu, 0, 0

    @classmethod
    def from_round(cls, instruction: Mapping[str, Any], config: Any) -> Optional["CountingHook"]:
        return cls(float(instruction["proximal-mu"]))

    def bind(self, model: torch.nn.Module, reference: Mapping[str, torch.Tensor]) -> None:
        self.bound = len(bind_by_identity(model, reference))

    def before_update(self) -> None:
        self.steps += 1

    def release(self) -> None:
        if os.environ.get(LOG_VAR):
            with open(os.environ[LOG_VAR], "a") as log:
                log.write(json.dumps({"mu": self.mu, "bound": self.bound, "steps": self.steps}) + "\n")


# Server side: Flower's FedProx, which sends `proximal-mu` in every train instruction.
TOY = register(Strategy(name="toy-counting", flower_class="FedProx", config_keys=("proximal_mu",),
                        server_kwargs=lambda config: {"proximal_mu": config.federation.proximal_mu},
                        client_hook=CountingHook))
