"""The registry of evaluation arms: what an arm declares, and the one place that reads the declarations.

An arm is a frozen encoder: it declares its name (the key in `evaluation.arms`, metrics.json and
predictions.npz), its letter and words for the report, the `dermfed evaluate` option that supplies
its input (a run folder, a weights file, a timm model name, or nothing), and how it builds the
encoder. It provides features only: every arm feeds the same head, trained with the same
settings and seeds (`server/evaluation/run.py`); the registry freezes whatever encoder an arm
builds, so no arm can train or randomise its features.

This module is light (no torch, no timm): `dermfed` builds its parser from the registry for every
command. Arms import what they need when they build.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Literal, Mapping, Optional, Sequence, Union

if TYPE_CHECKING:
    from torch import nn

    from common.config import DermFedConfig
    from server.evaluation.leakage import PretrainingImages


class ArmUnavailable(RuntimeError):
    """This arm cannot run here; the message says how to provide what it needs (the other arms still run)."""


def _no_pretraining() -> "PretrainingImages":
    from server.evaluation.leakage import NO_PRETRAINING

    return NO_PRETRAINING


@dataclass
class Arm:
    """A built arm: its frozen encoder and how the report names it."""

    key: str  # the registered name
    label: str  # "C: random init (control)": its letter, then what it is
    encoder: "nn.Module"
    source: str  # where its weights came from, in words
    # which images it pretrained on (the leak check); default: none
    pretraining: "PretrainingImages" = field(default_factory=_no_pretraining)
    provenance: Optional[dict[str, Any]] = None  # checkpoint arms: what the checkpoint records it is


@dataclass(frozen=True)
class ArmInput:
    """What an arm reads and the `dermfed evaluate` option that supplies it."""

    flag: str  # "--pooled"
    kind: Literal["run", "file", "model"]  # a pretraining run folder or checkpoint.pt (`--out` may not lie in it),
    # a weights file, or a timm model name
    metavar: str
    help: str
    required: bool = False  # the command needs it whatever `evaluation.arms` says (`--checkpoint`)
    runs_without: bool = False  # the arm builds without it (arm B: the Hugging Face cache); else it is skipped
    hint: str = ""  # what to pass, in the skipped arm's note: "CHECKPOINT from `dermfed pretrain`"
    repeatable: bool = False  # the option may be given several times: one encoder each, keyed `name`, `name-2`, ...

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class ArmContext:
    """What every arm may read when it builds: the resolved config, the study checkpoint's encoder architecture, and
    which input of a repeatable option it builds (1: the first or only one)."""

    config: "DermFedConfig"
    encoder_name: str  # the timm architecture of `--checkpoint` (arm C builds the same, randomly initialised)
    instance: int = 1  # the n-th value of a repeatable option (`--checkpoint RUN_A --checkpoint RUN_B`: 1, 2)


class EvaluationArm:
    """Subclass, set the class attributes, implement `build`, decorate with `@register_arm`."""

    name: ClassVar[str]  # key in evaluation.arms, metrics.json, predictions.npz
    letter: ClassVar[str]  # the report's short name: "C"
    description: ClassVar[str]  # the report's "how to read" words after the letter (plain text)
    input: ClassVar[Optional[ArmInput]] = None  # None: the arm reads nothing (arm C)
    study: ClassVar[bool] = False  # the encoder under study: compared with every other arm (one arm, "federated")

    def key(self, instance: int = 1) -> str:
        """The built arm's key (metrics.json, predictions.npz): the name, then `name-2`, ... for a repeatable option's
        further inputs."""
        return self.name if instance == 1 else f"{self.name}-{instance}"

    def tag(self, instance: int = 1) -> str:
        """The built arm's letter in the report: `A`, then `A2`, `A3`, ..."""
        return self.letter if instance == 1 else f"{self.letter}{instance}"

    def check(self, given: str, config: "DermFedConfig") -> None:
        """Refuse a wrong input now, before any arm runs; raise an error the CLI shows in one line (exit 2)."""

    def build(self, given: Optional[str], context: ArmContext) -> Arm:
        """The arm with its encoder; `given` is what its option supplied (None when absent and `runs_without`).
        Raise ArmUnavailable when it cannot run here (the other arms still run)."""
        raise NotImplementedError


ARMS: dict[str, EvaluationArm] = {}  # registration order is the default order of flags in `dermfed evaluate --help`


def register_arm(cls: type[EvaluationArm]) -> type[EvaluationArm]:
    """Class decorator: make an arm known to `evaluation.arms` and its option known to `dermfed evaluate`."""
    arm = cls()
    if arm.name in ARMS:
        raise ValueError(f"evaluation arm {arm.name!r} is registered twice "
                         f"({type(ARMS[arm.name]).__name__}, {cls.__name__})")
    if arm.input is not None:
        taken = {other.input.flag: other.name for other in ARMS.values() if other.input is not None}
        if arm.input.flag in taken:
            raise ValueError(f"evaluation arm {arm.name!r}: option {arm.input.flag} is already "
                             f"arm {taken[arm.input.flag]!r}'s")
    if arm.study and any(other.study for other in ARMS.values()):
        raise ValueError(f"evaluation arm {arm.name!r}: only one arm is the encoder under study ({study_arm()!r})")
    ARMS[arm.name] = arm
    return cls


def study_arm() -> str:
    """The name of the encoder under study (arm A, `--checkpoint`): the reference of every paired difference."""
    return next(name for name, arm in ARMS.items() if arm.study)


def arm_name(key: str) -> str:
    """The registered arm a built arm's key belongs to: `federated-2` -> `federated` (a key of no registered arm:
    itself)."""
    if key in ARMS:
        return key
    name, _, instance = key.rpartition("-")
    return name if instance.isdigit() and name in ARMS and ARMS[name].input is not None and ARMS[name].input.repeatable \
        else key


def is_study_key(key: str) -> bool:
    """Whether a built arm is an encoder under study: arm A, or A2, A3, ... of a repeated `--checkpoint`."""
    return arm_name(key) in ARMS and ARMS[arm_name(key)].study


def check_arm_names(names: list[str]) -> None:
    """`evaluation.arms` against the registry: an unknown name is one line listing the registered ones."""
    from common.config import ConfigError

    allowed = [repr(name) for name in ARMS]
    listed = f"{', '.join(allowed[:-1])} or {allowed[-1]}" if len(allowed) > 1 else allowed[0]
    for index, name in enumerate(names):
        if name not in ARMS:
            raise ConfigError(f"invalid configuration: evaluation.arms.{index}: Input should be {listed} (got {name!r})")


def add_arm_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per registered arm that reads an input, as the arm declares it."""
    for arm in ARMS.values():
        if arm.input is not None:
            repeat = dict(action="append", help=f"{arm.input.help} (repeatable)") if arm.input.repeatable else \
                dict(help=arm.input.help)
            parser.add_argument(arm.input.flag, required=arm.input.required, default=None, metavar=arm.input.metavar,
                                **repeat)


ArmValue = Union[str, Sequence[str], None]  # what an arm's option supplied: one value, or a repeatable option's list


def given_values(given: ArmValue) -> list[str]:
    """An option's values as a list (empty: not given)."""
    if not given:
        return []
    return [given] if isinstance(given, str) else [str(value) for value in given if value]


@dataclass(frozen=True)
class ArmInputs:
    """What each arm's option supplied (arm name -> value, None when absent)."""

    given: dict[str, ArmValue]

    def runs(self) -> dict[str, list[str]]:
        """The run-folder inputs by option ("--pooled": values): `evaluate --out` may lie in none of them."""
        return {arm.input.flag: given_values(self.given.get(name)) for name, arm in ARMS.items()
                if arm.input is not None and arm.input.kind == "run"}


def arm_inputs(args: argparse.Namespace, config: "DermFedConfig") -> ArmInputs:
    """The arms' inputs from the parsed command line, checked now: `evaluation.arms` names registered arms, and a
    wrong input (a file that is not ImageNet weights) is refused before any arm runs."""
    check_arm_names(config.evaluation.arms)
    given = {name: getattr(args, arm.input.dest, None) for name, arm in ARMS.items() if arm.input is not None}
    for name, value in given.items():
        for one in given_values(value):
            ARMS[name].check(one, config)
    return ArmInputs(given)


def build_arms(context: ArmContext, inputs: Mapping[str, ArmValue], skipped: dict[str, str]) -> Iterator[Arm]:
    """Build each arm of `evaluation.arms` when its turn comes (one encoder in memory at a time); record the skipped.
    A repeatable option's inputs build one arm each, in the order given (`ArmContext.instance`)."""
    check_arm_names(context.config.evaluation.arms)
    for name in context.config.evaluation.arms:
        kind = ARMS[name]
        values = given_values(inputs.get(name))
        if len(values) > 1 and not (kind.input is not None and kind.input.repeatable):
            raise TypeError(f"evaluation arm {name!r} takes one input, got {len(values)}")
        if kind.input is not None and not values and not kind.input.runs_without:
            skipped[name] = f"not requested (pass {kind.input.flag} {kind.input.hint or kind.input.metavar})"
            continue
        for instance, given in enumerate(values or [None], start=1):
            key = kind.key(instance)
            try:
                arm = kind.build(given, replace(context, instance=instance))
            except ArmUnavailable as exc:
                skipped[key] = str(exc)
                print(f"arm {key} skipped: {exc}", flush=True)
                continue
            if arm.key != key:
                raise TypeError(f"evaluation arm {name!r} built an arm keyed {arm.key!r}, not {key!r}")
            arm.encoder = arm.encoder.eval().requires_grad_(False)  # features only: frozen, deterministic
            yield arm


def report_words(keys: list[str]) -> list[str]:
    """The report's "how to read" words for these arms, in order, once per registered arm: "C: random weights, ...";
    an arm no longer registered (an older metrics.json) is left out."""
    names = list(dict.fromkeys(arm_name(key) for key in keys))
    return [f"{ARMS[name].letter}: {ARMS[name].description}" for name in names if name in ARMS]
