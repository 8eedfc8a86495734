"""Arm E, a control: one site's local-only encoder (`dermfed pretrain data.site=NAME`), given as `--local`."""

from __future__ import annotations

from typing import Optional

from server.evaluation.arms.checkpoints import checkpoint_arm
from server.evaluation.arms.registry import Arm, ArmContext, ArmInput, EvaluationArm, register_arm


@register_arm
class LocalArm(EvaluationArm):
    name = "local"
    letter = "E"
    description = "the local-only control (one site's images alone), named by its checkpoint"
    input = ArmInput("--local", "run", "RUN_DIR", help="arm E: a local-only `dermfed pretrain` run",
                     hint="CHECKPOINT from `dermfed pretrain`", repeatable=True)

    def build(self, given: Optional[str], context: ArmContext) -> Arm:
        return checkpoint_arm(self.key(context.instance), self.tag(context.instance), "local-only", str(given),
                              context.config.data.cache_dir)
