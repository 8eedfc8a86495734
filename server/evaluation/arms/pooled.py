"""Arm D, a control: an encoder pretrained centrally on the pooled images (`dermfed pretrain`), given as `--pooled`."""

from __future__ import annotations

from typing import Optional

from server.evaluation.arms.checkpoints import checkpoint_arm
from server.evaluation.arms.registry import Arm, ArmContext, ArmInput, EvaluationArm, register_arm


@register_arm
class PooledArm(EvaluationArm):
    name = "pooled"
    letter = "D"
    description = "the pooled control (centrally pretrained), named by its checkpoint"
    input = ArmInput("--pooled", "run", "RUN_DIR", help="arm D: a pooled `dermfed pretrain` run",
                     hint="CHECKPOINT from `dermfed pretrain`", repeatable=True)

    def build(self, given: Optional[str], context: ArmContext) -> Arm:
        return checkpoint_arm(self.key(context.instance), self.tag(context.instance), "pooled", str(given),
                              context.config.data.cache_dir)
