"""`dermfed evaluate`: frozen encoders under identical heads. Its flags are built in `register` below."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from server.cli.options import add_common, add_force, claim_out, out_folder

if TYPE_CHECKING:
    from common.config import DermFedConfig


def cmd_evaluate(args: argparse.Namespace, config: DermFedConfig) -> int:
    from server.evaluation.arms import arm_inputs, given_values
    from server.evaluation.report import write_report
    from server.evaluation.run import run_evaluation

    config = with_external_sets(config, args.external)
    inputs = arm_inputs(args, config)  # checked now (a wrong weights file), not after the other arms were evaluated
    folder = out_folder(config, "evaluation", args.out)
    refuse_evaluation_out(folder, inputs.runs(), args.force)
    checkpoints = given_values(args.checkpoint)  # repeatable: the first is arm A, the others A2, A3, ...
    metrics = run_evaluation(config, Path(checkpoints[0]), folder, inputs.given)
    report = write_report(folder, metrics)
    print(f"metrics: {folder / 'metrics.json'}")
    print(f"report: {report.resolve()}")
    return 0


def refuse_evaluation_out(folder: Path, inputs: dict[str, list[str]], force: bool = False) -> None:
    """`evaluate --out` never lies in a run it reads (not even with --force: it would move that run away), nor in
    any folder holding a checkpoint.pt (it would overwrite that run's config.yaml and mix its metrics in)."""
    from common.config import ConfigError
    from common.run_folder import CHECKPOINT_NAME, EVALUATE, move_aside

    out = folder.resolve()
    for option, given in ((option, one) for option, values in inputs.items() for one in values):
        run = Path(given).resolve()
        inside = out == run or out.is_relative_to(run)  # a run folder, and all below it
        if run.is_file():  # a checkpoint file: only its own folder, whose config.yaml describes it
            inside = out == run.parent
        if inside:
            raise ConfigError(f"--out {folder} lies in the {option} run {given}: evaluate writes its config.yaml and "
                              "metrics there; choose another --out")
    if (folder / CHECKPOINT_NAME).exists() and not force:
        raise ConfigError(f"--out {folder} holds a {CHECKPOINT_NAME} (a pretraining or simulation run): evaluate would "
                          "overwrite its config.yaml; choose another --out, or pass --force to move it aside")
    claim_out(folder, EVALUATE, force)
    if (folder / CHECKPOINT_NAME).exists():  # --force, and a checkpoint of no kind known (torn): aside too
        print(f"--force: moved the run that was in {folder} to {move_aside(folder)}", flush=True)


def parse_external(spec: str) -> dict[str, str]:
    """`FORMAT:ROOT[:NAME]` -> an `evaluation.external` entry (a ROOT holding ':' needs the config list)."""
    from common.config import ConfigError

    fmt, _, rest = spec.partition(":")
    root, name = rest.rsplit(":", 1) if ":" in rest else (rest, "")
    if not fmt or not root:
        raise ConfigError(f"--external {spec!r}: expected FORMAT:ROOT[:NAME], e.g. isic-gt:/data/isic2018-task3-test:isic2018")
    return {"format": fmt, "root": root, **({"name": name} if name else {})}


def with_external_sets(config: DermFedConfig, specs: Sequence[str]) -> DermFedConfig:
    """The config's `evaluation.external` list (its one owner), extended by `--external` flags and validated."""
    from common.config import build_config

    if not specs:
        return config
    tree = config.model_dump(mode="json")
    tree["evaluation"]["external"] = [*tree["evaluation"]["external"], *(parse_external(spec) for spec in specs)]
    return build_config(tree)


def register(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    """The flags of `dermfed evaluate` (each arm's own flag comes from the arms' registry)."""
    from server.evaluation.arms import add_arm_arguments  # the arms' registry alone: no torch, no timm

    evaluate = sub.add_parser("evaluate", help="frozen encoders against ImageNet ConvNeXt-Tiny under identical heads",
                              formatter_class=fmt)
    add_arm_arguments(evaluate)  # --checkpoint, --imagenet-weights, --pooled, --local: each arm's own option
    evaluate.add_argument("--external", action="append", default=[], metavar="FORMAT:ROOT[:NAME]",
                          help="also score the heads on this labelled data set, all of it test data (repeat; "
                               "adds to evaluation.external)")
    evaluate.add_argument("--out", default=None, help="run folder (default: output_dir/run_name)")
    add_force(evaluate)
    add_common(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)
