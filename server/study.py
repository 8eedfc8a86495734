"""`dermfed study`: the paper's protocol end to end from one config, as steps that are the other commands.

For each objective of `study.objectives`: federated pretraining (`dermfed simulate`), then its controls
(`study.controls`): pooled (`dermfed pretrain` on every site's pretraining images) and local-only (`dermfed pretrain
data.site=SITE` on one site's), each with the federated run's budget (`control_budget`); then one `dermfed evaluate`
with every arm: the federated encoders (A, A2, ...), ImageNet where available (B), random init (C), the pooled (D, D2,
...) and local-only (E, E2, ...) controls, on the source's test split and the external sets of `evaluation.external`.

The study owns its folder (`common.run_folder`, kind `study`): its resolved `config.yaml`, `study.json` (the steps,
their equivalent commands, how far it got) and one subfolder per step, each an ordinary run of its command. Each step
is run by the command's own handler (`server/cli/`), parsed from the command line it prints, with the step's config:
the study's plus the step's overrides. Running the same study again continues it: a finished step is kept, an
interrupted simulation is resumed (`dermfed simulate --resume`), any other unfinished step is started again.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from common.config import DermFedConfig, apply_overrides, flatten_config, load_config, write_config
from common.interrupts import Interrupted
from common.run_files import atomic_write_text
from common.run_folder import (CONFIG_NAME, FREE_KEYS, SIMULATE, STUDY, STUDY_NAME, RunFolderError, completed_rounds_or_none,
                               is_complete, move_aside, read_json, refusal, run_kind)

EVALUATION_FOLDER = "evaluation"
REPORT_NAME = "report.html"
FOLDER_OPTIONS = ("--out", "--checkpoint", "--pooled", "--local")  # options whose value is a folder of the study


@dataclass
class Step:
    """One step of the study: a command run into a subfolder of the study."""

    number: int
    kind: str  # federated, pooled, local, evaluate
    objective: Optional[str]
    folder: str  # relative to the study folder
    argv: list[str]  # the command's arguments after `dermfed` (without --config and the overrides)
    overrides: list[str]  # the step's config: the study's config.yaml plus these
    what: str  # in words, for the progress lines
    status: str = "pending"  # pending, done, failed, stopped (interrupted)
    seconds: Optional[float] = None

    def in_study(self, study: Path) -> list[str]:
        """The step's arguments with its folders (`--out`, and the runs evaluation reads) inside the study folder."""
        named = {self.argv[i + 1] for i, word in enumerate(self.argv[:-1]) if word in FOLDER_OPTIONS}
        return [str(study / word) if word in named else word for word in self.argv]

    def command(self, study: Path, argv: Optional[list[str]] = None) -> str:
        """The equivalent command line a person could type (`argv`: the step's arguments as run, if not its own)."""
        argv = argv or self.in_study(study)
        words = ["dermfed", *argv[:1], "--config", str(study / CONFIG_NAME), *argv[1:], *self.overrides]
        return " ".join(shlex.quote(word) for word in words)


@dataclass
class Plan:
    steps: list[Step]
    local_site: Optional[str]
    budget: dict[str, Any] = field(default_factory=dict)


def study_objectives(config: DermFedConfig) -> list[str]:
    return list(config.study.objectives or [config.model.objective])


def control_budget(config: DermFedConfig, sites: int) -> dict[str, dict[str, Optional[int]]]:
    """The controls' training, as the federated run's: in each of `study.control_rounds` (default: all) rounds a site
    trains `train.epochs` epochs, capped at `train.max_steps` steps. The local-only control gets one site's share in one
    run (epochs x rounds, the cap x rounds: the steps that site took in the federation); the pooled control the whole
    federation's (epochs x rounds over all sites' images, the cap x rounds x sites)."""
    rounds = config.study.control_rounds or config.federation.num_rounds
    epochs, cap = config.train.epochs * rounds, config.train.max_steps
    return {"rounds": {"rounds": rounds, "sites": sites},  # type: ignore[dict-item]
            "local": {"epochs": epochs, "max_steps": cap * rounds if cap else None},
            "pooled": {"epochs": epochs, "max_steps": cap * rounds * sites if cap else None}}


def _budget_overrides(budget: dict[str, Optional[int]]) -> list[str]:
    steps = [f"train.max_steps={budget['max_steps']}"] if budget["max_steps"] else []
    return [f"train.epochs={budget['epochs']}", *steps]


def choose_local_site(config: DermFedConfig, counts: dict[str, int]) -> str:
    """`study.local_site`, or the site with the most pretraining images (ties: the first by name): the hospital that
    has the best chance to do as well alone."""
    from common.data.catalog import DataError

    if config.study.local_site is not None:
        if config.study.local_site not in counts:
            raise DataError(f"study.local_site={config.study.local_site!r} is not a site of this data set; sites: "
                            f"{sorted(counts)}")
        return config.study.local_site
    return sorted(counts, key=lambda site: (-counts[site], site))[0]


def site_sizes(config: DermFedConfig) -> tuple[dict[str, int], int]:
    """Pretraining images per site of the source, and how many hospitals the federation makes of it."""
    from common.data.partition import partition_catalog
    from common.data.pipeline import ensure_data, prepare_data

    ensure_data(config)  # the synthetic data if absent, the cache: written here, explicitly, never by reading
    catalog = prepare_data(config).catalog
    pretraining = catalog.frame[catalog.frame["split"].isin(config.data.pretrain_splits)]
    counts = {str(site): int(n) for site, n in pretraining["site"].value_counts().items()}
    parts, _ = partition_catalog(catalog, config.data.partition, config.data.num_partitions,
                                 config.data.dirichlet_alpha, config.seed)
    return counts, len(parts)


def make_plan(config: DermFedConfig, counts: dict[str, int], sites: int,
              imagenet_argv: Optional[list[str]] = None) -> Plan:
    """The study's steps: federated pretraining per objective, then each objective's controls, then one evaluation."""
    objectives = study_objectives(config)
    budget = control_budget(config, sites)
    local_site = choose_local_site(config, counts) if "local" in config.study.controls else None
    steps: list[Step] = []

    def add(kind: str, objective: Optional[str], folder: str, argv: list[str], overrides: list[str], what: str) -> None:
        steps.append(Step(len(steps) + 1, kind, objective, folder, argv, overrides, what))

    for objective in objectives:
        add("federated", objective, f"federated-{objective}", ["simulate", "--out", f"federated-{objective}"],
            [f"model.objective={objective}"], f"federated pretraining, objective {objective}")
    for objective in objectives:
        if "pooled" in config.study.controls:
            add("pooled", objective, f"pooled-{objective}", ["pretrain", "--out", f"pooled-{objective}"],
                [f"model.objective={objective}", *_budget_overrides(budget["pooled"])],
                f"pooled control (all sites' images), objective {objective}")
        if local_site is not None:
            add("local", objective, f"local-{objective}", ["pretrain", "--out", f"local-{objective}"],
                [f"model.objective={objective}", f"data.site={json.dumps(local_site)}",
                 *_budget_overrides(budget["local"])],
                f"local-only control ({local_site}'s images only), objective {objective}")
    arms = [("--checkpoint", "federated"), ("--pooled", "pooled"), ("--local", "local")]
    argv = ["evaluate", *[word for flag, kind in arms for step in steps if step.kind == kind
                          for word in (flag, step.folder)], *(imagenet_argv or []), "--out", EVALUATION_FOLDER]
    add("evaluate", None, EVALUATION_FOLDER, argv, [], "evaluation of every arm, one report")
    return Plan(steps, local_site, budget)


def check_same_study(study: Path, config: DermFedConfig) -> Optional[str]:
    """Why an unfinished study in `study` cannot be continued with `config` (a key it changes), or None."""
    original = flatten_config(load_config(study / CONFIG_NAME))
    changed = {key: (original.get(key), value) for key, value in flatten_config(config).items()
               if value != original.get(key) and not key.startswith(FREE_KEYS) and key != "train.progress"}
    if not changed:
        return None
    listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in list(changed.items())[:4])
    return (f"--out {study} holds an unfinished study with another config ({listed}): its finished steps were made "
            "with the original. Run it again with its own config to continue it, choose another --out, or pass "
            "--force to move it aside")


def claim_study(study: Path, config: DermFedConfig, force: bool) -> bool:
    """Make `study` ready: refuse (RunFolderError) or, with `force`, move aside another kind's run, a finished study,
    or an unfinished study with another config. Returns whether an unfinished study is continued."""
    why = refusal(study, STUDY)
    found = run_kind(study)
    if why is None and found is not None and (study / CONFIG_NAME).is_file():
        why = check_same_study(study, config)
    if why is None:
        return found is not None
    if not force:
        raise RunFolderError(why)
    print(f"--force: moved the run that was in {study} to {move_aside(study)}", flush=True)
    return False


Handler = Callable[[list[str], Optional[DermFedConfig]], int]


def run_study(config: DermFedConfig, study: Path, force: bool, run_command: Handler,
              imagenet_argv: Optional[list[str]] = None) -> int:
    """Run (or continue) the study in `study`; `run_command(argv, config)` runs one `dermfed` command with a config."""
    continuing = claim_study(study, config, force)
    counts, sites = site_sizes(config)
    plan = make_plan(config, counts, sites, imagenet_argv)
    study.mkdir(parents=True, exist_ok=True)
    if not continuing:
        write_config(config, study)
    record = {"status": "running", "config": CONFIG_NAME, "objectives": study_objectives(config),
              "controls": config.study.controls, "local_site": plan.local_site, "control_budget": plan.budget,
              "report": f"{EVALUATION_FOLDER}/{REPORT_NAME}", "steps": []}
    for step in plan.steps:
        step.status = "done" if _finished(step, study / step.folder) else "pending"
    _write_record(study, record, plan)
    total = len(plan.steps)
    print(f"dermfed study: {total} steps in {study}" + (" (continuing an unfinished study)" if continuing else ""),
          flush=True)
    for step in plan.steps:
        folder = study / step.folder
        header = f"[step {step.number}/{total}] {step.what}"
        if _finished(step, folder):
            step.status = "done"
            print(f"{header}: done already ({folder})", flush=True)
            _write_record(study, record, plan)
            continue
        argv = step.in_study(study)
        if step.kind == "federated" and (completed_rounds_or_none(folder) or 0) > 0 and run_kind(folder) and \
                run_kind(folder)[0] == SIMULATE:  # type: ignore[index]
            argv = ["simulate", "--resume", str(folder)]  # interrupted: continue it from its last round
            step_config = None
        else:
            if (step.kind == "federated" and folder.exists()) or (step.kind == "evaluate" and is_complete(folder)):
                argv = [*argv, "--force"]  # a simulation that completed no round, an evaluation without its report
            step_config = apply_overrides(load_config(study / CONFIG_NAME), step.overrides)
        same = step.command(study, argv) if step_config is not None else " ".join(shlex.quote(w) for w in ["dermfed", *argv])
        print(f"{header}\n  as: {same}", flush=True)
        started = time.perf_counter()
        failed = f"dermfed study: step {step.number}/{total} ({step.what}) failed"
        resume = (f"finished steps are kept: run the same `dermfed study` command again (--out {study}) to continue "
                  f"from this step")
        try:
            code = run_command(argv, step_config)
        except BaseException as exc:
            stopped = isinstance(exc, (Interrupted, KeyboardInterrupt))
            step.status = record["status"] = "stopped" if stopped else "failed"
            _write_record(study, record, plan)
            print(f"{failed.replace('failed', 'was stopped') if stopped else failed}; {resume}", file=sys.stderr,
                  flush=True)
            raise
        step.seconds = round(time.perf_counter() - started, 1)
        if code != 0:
            step.status, record["status"] = "failed", "failed"
            _write_record(study, record, plan)
            print(f"{failed} (exit code {code}); {resume}", file=sys.stderr, flush=True)
            return code
        step.status = "done"
        print(f"[step {step.number}/{total}] done in {step.seconds:.0f} s", flush=True)
        _write_record(study, record, plan)
    record["status"] = "finished"
    _write_record(study, record, plan)
    report = study / EVALUATION_FOLDER / REPORT_NAME
    print(f"study finished: {study / STUDY_NAME}\nreport: {report.resolve()}", flush=True)
    return 0


def _finished(step: Step, folder: Path) -> bool:
    if step.kind == "evaluate":
        return is_complete(folder) and (folder / REPORT_NAME).is_file()
    return is_complete(folder)


def _write_record(study: Path, record: dict[str, Any], plan: Plan) -> None:
    record["steps"] = [{**asdict(step), "command": step.command(study)} for step in plan.steps]
    atomic_write_text(study / STUDY_NAME, json.dumps(record, indent=2))


def study_record(study: Path) -> dict[str, Any]:
    return read_json(Path(study) / STUDY_NAME)
