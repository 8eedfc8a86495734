"""Arm A, the encoder under study: the run given as `--checkpoint` (a `dermfed simulate` run, or any pretraining run).

Every other arm is compared with it. Its key stays `federated` whatever the checkpoint holds; its
label names what the checkpoint records it is ("A: pooled VAE encoder (...)" for a pooled run).
"""

from __future__ import annotations

from typing import Optional

from server.evaluation.arms.checkpoints import checkpoint_arm
from server.evaluation.arms.registry import Arm, ArmContext, ArmInput, EvaluationArm, register_arm


@register_arm
class FederatedArm(EvaluationArm):
    name = "federated"
    letter = "A"
    study = True
    description = ("the encoder under study (--checkpoint), named by what its checkpoint records (federated, "
                   "pooled or local-only; rounds or epochs; objective; DP-SGD)")
    input = ArmInput("--checkpoint", "run", "RUN_DIR", required=True,
                     help="pretraining run folder or checkpoint.pt (arm A, the encoder under study: a federated run, "
                          "or any pretraining run, labelled by what its checkpoint records; a second one is arm A2, ...)",
                     repeatable=True)

    def build(self, given: Optional[str], context: ArmContext) -> Arm:
        return checkpoint_arm(self.key(context.instance), self.tag(context.instance), "federated", str(given),
                              context.config.data.cache_dir)
