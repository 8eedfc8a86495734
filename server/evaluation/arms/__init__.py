"""The arms of the study: each a frozen encoder feeding an identical head, one module per arm.

A  federated (`federated.py`):  the encoder under study, `--checkpoint` (a `dermfed simulate` run, or any pretraining run)
B  imagenet  (`imagenet.py`):   ConvNeXt-Tiny with ImageNet weights (timm): --imagenet-weights, the HF cache, or the Hub
C  random    (`random_init.py`): the same architecture as A, randomly initialised (what pretraining adds at all)
D  pooled    (`pooled.py`):     a centrally pretrained encoder (`dermfed pretrain`)
E  local     (`local.py`):      one site's local-only encoder (`dermfed pretrain data.site=NAME`)

Adding an arm is one module: subclass `EvaluationArm`, decorate it with `@register_arm`, and import
it here (or anywhere before `dermfed` builds its parser); `evaluation.arms` then accepts its name,
`dermfed evaluate` its option, and the report its letter and words (`registry.py`). The checkpoint arms' options are
repeatable (`ArmInput.repeatable`): `--checkpoint RUN_A --checkpoint RUN_B` evaluates two encoders under study, keyed
`federated` and `federated-2`, lettered A and A2 (what `dermfed study` gives for several objectives).
"""

from server.evaluation.arms.registry import (
    ARMS,
    Arm,
    ArmContext,
    ArmInput,
    ArmInputs,
    ArmUnavailable,
    EvaluationArm,
    ArmValue,
    add_arm_arguments,
    arm_inputs,
    arm_name,
    build_arms,
    check_arm_names,
    given_values,
    is_study_key,
    register_arm,
    report_words,
    study_arm,
)

# The built-in arms, registered in this order: the order of their options in `dermfed evaluate --help`.
# isort: off
from server.evaluation.arms import federated, imagenet, random_init, pooled, local  # noqa: F401
# isort: on
from server.evaluation.arms.imagenet import WeightsFileError  # named by the CLI's USER_ERRORS
from common.plugins import import_plugins  # noqa: E402

import_plugins()  # arms of modules named in DERMFED_PLUGINS (the process environment, never the run config)

__all__ = ["ARMS", "Arm", "ArmContext", "ArmInput", "ArmInputs", "ArmUnavailable", "ArmValue", "EvaluationArm",
           "WeightsFileError", "add_arm_arguments", "arm_inputs", "arm_name", "build_arms", "check_arm_names",
           "given_values", "is_study_key", "register_arm", "report_words", "study_arm"]
