"""A test-only fault switch, so that tests can put a faulty hospital inside a running federation.

Only simulations honour it (the node config has a `partition-id`): the run config key
`fault-injection="SITE:KIND:ROUND[,SITE:KIND:ROUND...]"` makes virtual hospital SITE (its
partition index) fail from round ROUND on, in one of three ways:

- `raise`: training fails as a real site fails when one of its images became unreadable, with
  an exception whose text names the file (what must never reach the server);
- `nan`: the site replies with NaN weights;
- `hang`: the site never answers (it sleeps past the round's timeout).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional

import torch

from common.data.catalog import DataError
from common.flower_keys import FAULT_INJECTION

FaultKind = Literal["raise", "nan", "hang"]
FAULT_KEY = FAULT_INJECTION  # the run config key (a simulation-only test switch)
HANG_SECONDS = 3600.0


@dataclass(frozen=True)
class FaultSwitch:
    site_index: int
    kind: FaultKind
    from_round: int

    @classmethod
    def parse(cls, text: str) -> Optional["FaultSwitch"]:
        if not text:
            return None
        try:
            site, kind, round_number = text.split(":")
            switch = cls(int(site), kind, int(round_number))  # type: ignore[arg-type]
        except ValueError:
            raise ValueError(f"{FAULT_KEY}={text!r} must be SITE:KIND:ROUND, e.g. 1:raise:2") from None
        if switch.kind not in ("raise", "nan", "hang"):
            raise ValueError(f"{FAULT_KEY}: kind {switch.kind!r} is not one of raise, nan, hang")
        return switch

    @classmethod
    def of_simulated_site(cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> Optional["FaultSwitch"]:
        """The switch for this node: simulations only, never a real hospital's daemon."""
        if "partition-id" not in node_config:
            return None
        for spec in str(run_config.get(FAULT_KEY, "")).split(","):
            switch = cls.parse(spec.strip())
            if switch is not None and switch.site_index == int(node_config["partition-id"]):
                return switch
        return None

    def before_training(self, round_number: int, image_path: str) -> None:
        if round_number < self.from_round:
            return
        if self.kind == "raise":
            raise DataError(f"{image_path} became unreadable after it was checked (fault injection)")
        if self.kind == "hang":
            time.sleep(HANG_SECONDS)

    def corrupt(self, round_number: int, shared: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.kind != "nan" or round_number < self.from_round:
            return shared
        return {k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in shared.items()}
