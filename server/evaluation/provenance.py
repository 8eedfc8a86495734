"""What a pretraining checkpoint is, read from the checkpoint itself, so an arm is named by what it is.

The slot a checkpoint is passed in (`--checkpoint`, `--pooled`, `--local`) gives the arm its
letter; the checkpoint's own record gives its words: how it was trained (federated rounds, pooled
or one site's epochs), with which self-supervised objective (the VAE, until the objective
registry records others), and with or without DP-SGD. A pooled run passed as `--checkpoint` is
"A: pooled VAE encoder (...)", never "federated".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from common.checkpoint import checkpoint_config

OBJECTIVE_NAMES = {"vae": "VAE"}  # how the report writes an objective's registry name


@dataclass(frozen=True)
class Provenance:
    kind: str  # federated, pooled, local-only
    objective: str  # the objective's registry name ("vae")
    rounds: Optional[int]  # federated
    epochs: Optional[int]  # pooled or local-only
    sites: list[str]  # federated: the sites of the last round; local-only: its site; pooled: empty
    dp: bool  # DP-SGD was on (requested in the config, or a privacy budget was spent)
    epsilon: Optional[float]  # the largest epsilon any site (or the pooled run) reported spending

    def describe(self) -> str:
        """E.g. `federated VAE encoder (3 rounds, 4 sites, DP-SGD epsilon <= 4.20)`."""
        objective = OBJECTIVE_NAMES.get(self.objective, self.objective)
        parts = []
        if self.kind == "local-only" and self.sites:
            parts.append(self.sites[0])
        if self.rounds is not None:
            parts.append(_count(self.rounds, "round"))
        if self.epochs is not None:
            parts.append(_count(self.epochs, "epoch"))
        if self.kind == "federated" and self.sites:
            parts.append(_count(len(self.sites), "site"))
        if not self.dp:
            parts.append("DP-SGD off")
        else:
            parts.append(f"DP-SGD epsilon <= {self.epsilon:.2f}" if self.epsilon is not None else "DP-SGD on")
        return f"{self.kind} {objective} encoder ({', '.join(parts)})"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "description": self.describe()}


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}{'' if n == 1 else 's'}"


def _objective(payload: dict[str, Any]) -> str:
    """The objective's registry name as the checkpoint records it; every checkpoint before the registry is a VAE."""
    recorded = payload.get("extra", {}).get("objective") or payload.get("config", {}).get("model", {}).get("objective")
    return str(recorded) if recorded else "vae"


def checkpoint_provenance(payload: dict[str, Any]) -> Provenance:
    config = checkpoint_config(payload)
    extra, position, history = payload.get("extra", {}), payload.get("position", {}), payload.get("history") or []
    kind = extra.get("arm") or ("federated" if "round" in position else "local-only" if config.data.site else "pooled")
    epsilons: list[float] = []
    sites: list[str] = []
    if history and "round" in history[-1]:
        sites = sorted({str(s["site"]) for s in history[-1].get("sites", []) if "site" in s})
        epsilons = [s["epsilon"] for h in history for s in h.get("sites", []) if s.get("epsilon") is not None]
    else:
        epsilons = [h["epsilon"] for h in history if h.get("epsilon") is not None]
        if kind == "local-only":
            sites = [str(extra.get("site") or config.data.site)]
    epsilon = max(epsilons) if epsilons else None
    return Provenance(kind=str(kind), objective=_objective(payload), rounds=position.get("round"),
                      epochs=position.get("epoch"), sites=sites, dp=bool(config.dp.enabled or epsilon is not None),
                      epsilon=epsilon)
