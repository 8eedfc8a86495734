"""Every extension point at once, from test modules only: a toy objective and a toy data format
(`tests/toy_extensions.py`), a toy strategy with a client hook (`tests/toy_strategy.py`) and a toy evaluation arm
(below) run through the real `dermfed pretrain`, `dermfed simulate` and `dermfed evaluate`, with no change
anywhere else in the tree. Each registry is asked by name at every step: a registry that ignored an entry
registered from outside would fail here (unknown name, exit 2) or train the VAE instead (no `colour` metric)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import timm

from common.checkpoint import load_checkpoint
from common.config import PROJECT_ROOT
from server.cli import main
from server.evaluation.arms import ARMS, Arm, ArmContext, ArmInput, EvaluationArm, register_arm

FAST_EVALUATION = ["evaluation.epochs=2", "evaluation.seeds=[0]", "evaluation.bootstrap_replicates=100"]


class ProjectionArm(EvaluationArm):
    """A frozen, randomly initialised timm model named on the command line."""

    name = "toyprojection"
    letter = "P"
    description = "a toy arm registered from tests/test_extensions.py"
    input = ArmInput("--toy-projection", "model", "TIMM_NAME", help="the toy arm's timm architecture",
                     hint="a timm model name")

    def build(self, given: Optional[str], context: ArmContext) -> Arm:
        import torch

        torch.manual_seed(context.config.seed + 7)
        model = timm.create_model(str(given), pretrained=False, num_classes=0).eval()
        return Arm(self.name, "P: toy projection", model, f"{given}, random init (seed {context.config.seed + 7})")


@pytest.fixture()
def toys():
    """Import the toy modules (they register themselves, as a plugin does) and register the toy arm; afterwards every
    registry is as it was, so that other tests in this process see the registered names they expect."""
    from common.data.formats import FORMATS
    from common.objectives import OBJECTIVES
    from common.strategies import STRATEGIES

    registries = (OBJECTIVES, FORMATS, STRATEGIES, ARMS)
    before = [dict(registry) for registry in registries]
    modules = set(sys.modules)
    import tests.toy_extensions as toy_extensions
    import tests.toy_strategy as toy_strategy

    register_arm(ProjectionArm)
    yield toy_extensions, toy_strategy
    for registry, entries in zip(registries, before):
        registry.clear()
        registry.update(entries)
    for name in set(sys.modules) - modules:
        del sys.modules[name]


@pytest.mark.slow
def test_a_toy_of_every_extension_point_runs_through_pretrain_simulate_and_evaluate(tmp_path, toys, capsys):
    toy, toy_strategy = toys
    data = toy.write_clinics(tmp_path / "clinics")
    common = [f"data.format={toy.TOY_FORMAT}", f"data.root={data}", f"data.cache_dir={tmp_path / 'cache'}",
              f"model.objective={toy.TOY_OBJECTIVE}", f"model.{toy.TOY_OBJECTIVE}.weight=2", "train.device=cpu"]

    # pretrain (in this process): the toy objective on the toy format
    assert main(["pretrain", "--config", "smoke", "--out", str(tmp_path / "pooled"), *common,
                 "train.max_steps=1"]) == 0, capsys.readouterr().err
    assert "colour" in json.loads((tmp_path / "pooled" / "history.json").read_text())[-1]

    # simulate (the ServerApp and each hospital in processes of their own): the plugin is named in the environment
    bin_dir = Path(sys.executable).parent
    hooks, run = tmp_path / "hooks.jsonl", tmp_path / "federated"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DERMFED_PLUGINS": "tests.toy_extensions",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
           toy_strategy.LOG_VAR: str(hooks)}
    done = subprocess.run([str(bin_dir / "dermfed"), "simulate", "--config", "smoke", *common,
                           "federation.num_rounds=1", "federation.strategy=toy-counting", "federation.proximal_mu=0.25",
                           "federation.fraction_evaluate=0", "--out", str(run)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    [round_one] = json.loads((run / "history.json").read_text())
    assert round_one["excluded"] == [] and sorted(s["site"] for s in round_one["sites"]) == ["clinic_0", "clinic_1"]
    assert all("colour" in site and "kl" not in site for site in round_one["sites"])  # the toy objective trained
    seen = [json.loads(line) for line in hooks.read_text().splitlines()]
    encoder_tensors = len(list(timm.create_model("convnext_atto", num_classes=0).parameters()))
    assert len(seen) == 2 and all(hook["mu"] == 0.25 and hook["bound"] == encoder_tensors for hook in seen)
    assert sorted(hook["steps"] for hook in seen) == sorted(int(site["steps"]) for site in round_one["sites"])
    payload = load_checkpoint(run)
    assert payload["config"]["model"]["objective"] == toy.TOY_OBJECTIVE
    timm.create_model("convnext_atto", num_classes=0).load_state_dict(payload["encoder"], strict=True)

    # evaluate (in this process): the federated toy encoder against the toy arm, on the toy format, identical heads
    out = tmp_path / "evaluation"
    assert main(["evaluate", "--config", "smoke", "--checkpoint", str(run), "--pooled", str(tmp_path / "pooled"),
                 "--toy-projection", "convnext_atto", "--out", str(out), *common, *FAST_EVALUATION,
                 "evaluation.arms=[federated,pooled,toyprojection]"]) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert [arm["key"] for arm in metrics["arms"]] == ["federated", "pooled", "toyprojection"]
    assert not metrics["skipped_arms"]
    assert "P: toy projection" in (out / "report.html").read_text()
