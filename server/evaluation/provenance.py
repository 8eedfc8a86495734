"""What a pretraining checkpoint is, read from the checkpoint itself, so an arm is named by what it is.

The slot a checkpoint is passed in (`--checkpoint`, `--pooled`, `--local`) gives the arm its
letter; the checkpoint's own record gives its words: how it was trained (federated rounds, pooled
or one site's epochs), with which self-supervised objective (the VAE, until the objective
registry records others), from which warm start, and with or without DP-SGD. A pooled run passed
as `--checkpoint` is "A: pooled VAE encoder (...)", never "federated".

How it was trained is read from its position (a federated run counts rounds, `dermfed pretrain`
epochs), not from the free-text `extra.arm`: a checkpoint whose `arm` contradicts its position is
named by its position, and the contradiction is kept (`claimed`). A federated run started from
`federation.initial_checkpoint` is named with that warm start, itself described the same way;
DP-SGD is credited only when every stage used it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from common.checkpoint import checkpoint_config
from common.objectives import OBJECTIVES


def objective_title(name: str) -> str:
    """How the report writes an objective's registry name (its `title`; the name itself if it is not registered)."""
    return OBJECTIVES[name].title if name in OBJECTIVES else name


@dataclass(frozen=True)
class Provenance:
    kind: str  # federated, pooled, local-only (from the position), or "unknown" (an unreadable warm start)
    objective: str  # the objective's registry name ("vae")
    rounds: Optional[int]  # federated
    epochs: Optional[int]  # pooled or local-only
    sites: list[str]  # federated: the sites of the last round; local-only: its site; pooled: empty
    dp: bool  # DP-SGD in this stage and in every warm start before it
    epsilon: Optional[float]  # the largest epsilon any site (or the pooled run) reported spending in this stage
    stage_dp: bool = False  # DP-SGD in this stage (requested in the config, or a privacy budget was spent)
    claimed: Optional[str] = None  # `extra.arm` where it contradicts the position
    warm_start: Optional["Provenance"] = None  # the checkpoint this run started from
    checkpoint: Optional[str] = None  # a warm start's file

    def _stage(self) -> str:
        """`federated VAE encoder (3 rounds, 4 sites)`, without DP words."""
        if self.kind == "unknown":
            return f"checkpoint that cannot be read here ({self.checkpoint})"
        objective = objective_title(self.objective)
        parts = []
        if self.kind == "local-only" and self.sites:
            parts.append(self.sites[0])
        if self.rounds is not None:
            parts.append(_count(self.rounds, "round"))
        if self.epochs is not None:
            parts.append(_count(self.epochs, "epoch"))
        if self.kind == "federated" and self.sites:
            parts.append(_count(len(self.sites), "site"))
        return f"{self.kind} {objective} encoder ({', '.join(parts)})" if parts else f"{self.kind} {objective} encoder"

    def _dp_words(self) -> str:
        if not self.stage_dp:
            return "DP-SGD off"
        return f"DP-SGD epsilon <= {self.epsilon:.2f}" if self.epsilon is not None else "DP-SGD on"

    def stages(self) -> list["Provenance"]:
        """This stage, then its warm start, then that one's."""
        return [self, *(self.warm_start.stages() if self.warm_start else [])]

    def describe(self) -> str:
        """E.g. `federated VAE encoder (3 rounds, 4 sites, DP-SGD epsilon <= 4.20)`, or with a warm start
        `federated VAE encoder (1 round, 2 sites), warm-started from a pooled VAE encoder (1 epoch); DP-SGD off`."""
        unverified = (f"; unverified: its record calls it {self.claimed!r}, its position {self._position()} says "
                      f"{self.kind}" if self.claimed else "")
        if self.warm_start is None:
            stage = self._stage()
            described = f"{stage[:-1]}, {self._dp_words()})" if stage.endswith(")") else f"{stage} ({self._dp_words()})"
            return described + unverified
        chain = ", warm-started from a ".join(s._stage() for s in self.stages())
        stages = self.stages()
        if all(s.stage_dp for s in stages):
            dp = "DP-SGD in every stage (" + "; ".join(f"{s.kind}: {s._dp_words()}" for s in stages) + ")"
        elif not any(s.stage_dp for s in stages):
            dp = "DP-SGD off"
        else:
            off = ", ".join(s._stage() for s in stages if not s.stage_dp)
            dp = f"DP-SGD not in every stage: off in the {off} (no formal guarantee for its images)"
        return f"{chain}; {dp}{unverified}"

    def _position(self) -> str:
        return _count(self.rounds, "round") if self.rounds is not None else _count(self.epochs or 0, "epoch")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "description": self.describe()}


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}{'' if n == 1 else 's'}"


def _objective(payload: dict[str, Any]) -> str:
    """The objective's registry name as the checkpoint records it; every checkpoint before the registry is a VAE."""
    recorded = payload.get("extra", {}).get("objective") or payload.get("config", {}).get("model", {}).get("objective")
    return str(recorded) if recorded else "vae"


def checkpoint_provenance(payload: dict[str, Any]) -> Provenance:
    """The provenance of a checkpoint, or of a warm-start stage recorded in one (the same keys, without weights)."""
    from server.evaluation.leakage import warm_start_of

    if "config" not in payload:  # a warm start that could not be read when the run started, or now
        return Provenance("unknown", "unknown", None, None, [], False, None, checkpoint=payload.get("checkpoint"))
    config = checkpoint_config(payload)
    extra, position, history = payload.get("extra") or {}, payload.get("position") or {}, payload.get("history") or []
    kind = "federated" if "round" in position else "local-only" if config.data.site else "pooled"
    claimed = extra.get("arm")
    epsilons: list[float] = []
    sites: list[str] = []
    if kind == "federated":
        last = history[-1] if history and isinstance(history[-1], dict) else {}
        sites = sorted({str(s["site"]) for s in last.get("sites", []) if isinstance(s, dict) and "site" in s})
        epsilons = [s["epsilon"] for h in history if isinstance(h, dict) for s in h.get("sites", [])
                    if isinstance(s, dict) and s.get("epsilon") is not None]
    else:
        epsilons = [h["epsilon"] for h in history if isinstance(h, dict) and h.get("epsilon") is not None]
        if kind == "local-only":
            sites = [str(config.data.site)]
    epsilon = max(epsilons) if epsilons else None
    stage_dp = bool(config.dp.enabled or epsilon is not None)
    stage = warm_start_of(payload)
    warm = checkpoint_provenance(stage) if stage is not None else None
    return Provenance(kind=kind, objective=_objective(payload), rounds=position.get("round"), epochs=position.get("epoch"),
                      sites=sites, dp=stage_dp and (warm is None or warm.dp), epsilon=epsilon, stage_dp=stage_dp,
                      claimed=str(claimed) if claimed and claimed != kind else None, warm_start=warm,
                      checkpoint=payload.get("checkpoint"))
