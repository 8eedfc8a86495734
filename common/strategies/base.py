"""What an aggregation strategy is: a server side (a Flower strategy, named) and an optional client hook.

An entry is plain data, so that `common/` stays free of Flower: the server's adapter
(`server/strategy.py`) resolves `flower_class` in `flwr.serverapp.strategy` and builds it with
`server_kwargs(config)`; a site builds the entry's `client_hook` from the round's instruction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch

if TYPE_CHECKING:
    from common.config import DermFedConfig


class ClientHook:
    """The site-side part of a strategy, for one training call.

    Lifecycle: `from_round` makes it at the site from the round's instruction (None: nothing to
    do this round); `bind(model, reference)` captures the model's parameters by identity, with
    the plain model, before DP-SGD wraps it and renames parameters (`bind_by_identity`);
    `before_update()` runs inside every optimizer step, once the gradients are final (under DP:
    after clipping and noise) and before the optimizer moves the weights; `release()` when the
    training call ends, successful or not.
    """

    @classmethod
    def from_round(cls, instruction: Mapping[str, Any], config: "DermFedConfig") -> Optional["ClientHook"]:
        return cls()

    def bind(self, model: torch.nn.Module, reference: Mapping[str, torch.Tensor]) -> None:
        """`reference`: the weights the site received this round, by the plain model's names."""

    def before_update(self) -> None:
        """Inside each optimizer step: gradients are final, weights not yet moved."""

    def release(self) -> None:
        """The training call ended: drop what was bound."""


def _no_kwargs(config: "DermFedConfig") -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Strategy:
    """One registered strategy.

    `config_keys`: the `federation.*` keys it reads (documentation and a test's check that they exist);
    `flower_class`: a class of `flwr.serverapp.strategy`; `server_kwargs`: its keyword arguments
    beyond the ones every strategy gets (fractions and minimum node counts); `instruction`: the keys
    and values its Flower class adds to each train instruction, from the run's signed `federation`
    section (a plain mapping): a hospital refuses an instruction with any other key or value
    (`common.run_manifest.check_instruction`).
    """

    name: str
    flower_class: str
    config_keys: tuple[str, ...] = ()
    server_kwargs: Callable[["DermFedConfig"], dict[str, Any]] = _no_kwargs
    client_hook: Optional[type[ClientHook]] = None
    instruction: Callable[[Mapping[str, Any]], dict[str, Any]] = lambda federation: {}


STRATEGIES: dict[str, Strategy] = {}


class UnknownStrategy(ValueError):
    """A strategy name that no module registered."""


def register(entry: Strategy) -> Strategy:
    """Add `entry` to the registry (a strategy module calls this once, at import)."""
    if entry.name in STRATEGIES and STRATEGIES[entry.name] is not entry:
        raise ValueError(f"strategy {entry.name!r} is registered twice")
    STRATEGIES[entry.name] = entry
    return entry


def strategy_names() -> list[str]:
    return list(STRATEGIES)


def strategy_named(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UnknownStrategy(f"unknown strategy {name!r}; allowed: {', '.join(strategy_names())}") from None


def client_hooks(config: "DermFedConfig", instruction: Mapping[str, Any]) -> list[ClientHook]:
    """The configured strategy's client hooks for this round (unbound), from the round's instruction."""
    hook_class = strategy_named(config.federation.strategy).client_hook
    hook = hook_class.from_round(instruction, config) if hook_class is not None else None
    return [hook] if hook is not None else []


def bind_by_identity(model: torch.nn.Module,
                     reference: Mapping[str, torch.Tensor]) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Each parameter named in `reference`, paired with a private copy of its reference value.

    The pairs hold the Parameter objects themselves: DP-SGD's layout change renames ConvNeXt's
    `gamma` and MLP parameters while training (the same objects move), so a lookup by name
    afterwards would miss them. Buffers in `reference` are skipped; unknown names are an error.
    """
    params = dict(model.named_parameters())
    unknown = sorted(set(reference) - set(params) - {name for name, _ in model.named_buffers()})
    if unknown:
        raise KeyError(f"the reference weights name parameters this model does not have: {unknown[:3]}")
    return [(params[name], value.detach().to(params[name].device, params[name].dtype, copy=True))
            for name, value in reference.items() if name in params]
