"""Arm C, the floor: the study checkpoint's architecture, randomly initialised (what any pretraining adds at all)."""

from __future__ import annotations

from typing import Optional

from server.evaluation.arms.registry import Arm, ArmContext, EvaluationArm, register_arm


def random_arm(encoder_name: str, seed: int) -> Arm:
    """timm's `encoder_name` without a classifier, initialised from `seed`."""
    import timm
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(encoder_name, pretrained=False, num_classes=0)
    return Arm(RandomArm.name, f"{RandomArm.letter}: random init (control)", model,
               f"{encoder_name}, random init (seed {seed})")


@register_arm
class RandomArm(EvaluationArm):
    name = "random"
    letter = "C"
    description = "random weights, the floor that says what any pretraining adds"

    def build(self, given: Optional[str], context: ArmContext) -> Arm:
        return random_arm(context.encoder_name, context.config.seed)
