"""Evaluation arms are a registry: an arm registered from this test module runs through `dermfed evaluate` unchanged.

The toy arm reads a timm model name from its own option (`--toy-model`), builds that architecture
randomly initialised from the run's seed, with stochastic depth, and hands it back in training
mode. Through the real CLI it must get its option, be accepted by `evaluation.arms`, be frozen by
the registry, be fed to the same heads as every other arm (its predictions equal arm C's, which is
the same architecture from the same seed), and be named in metrics.json, predictions.npz and the
report. Nothing outside this file knows it.
"""

from __future__ import annotations

import json
from typing import Optional

import numpy as np
import pytest

from server.cli import main
from server.evaluation.arms import ARMS, Arm, ArmContext, ArmInput, EvaluationArm, build_arms, register_arm

# One worker runs this whole module: its module-scoped fixtures are computed once (pyproject: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_arms")

FAST = ["evaluation.epochs=2", "evaluation.seeds=[0,1]", "evaluation.bootstrap_replicates=100"]
TOY_LABEL = "T: toy encoder (random init, stochastic depth)"


class ToyArm(EvaluationArm):
    name = "toy"
    letter = "T"
    description = "a toy arm registered from tests/test_arms.py"
    input = ArmInput("--toy-model", "model", "TIMM_NAME", help="the toy arm's timm architecture", hint="a timm model name")

    def build(self, given: Optional[str], context: ArmContext) -> Arm:
        import timm
        import torch

        torch.manual_seed(context.config.seed)
        model = timm.create_model(str(given), pretrained=False, num_classes=0, drop_path_rate=0.5).train()
        return Arm(self.name, TOY_LABEL, model, f"{given}, random init (seed {context.config.seed}), left in training mode")


@pytest.fixture(scope="module")
def toy_arm():
    register_arm(ToyArm)
    yield ARMS["toy"]
    ARMS.pop("toy")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, synthetic_root):
    folder = tmp_path_factory.mktemp("arms")
    common = [f"data.root={synthetic_root}", f"data.cache_dir={folder / 'cache'}"]
    assert main(["pretrain", "--config", "smoke", "--out", str(folder / "pretrain"), *common, "train.max_steps=1"]) == 0
    return folder, common


def test_an_arm_registered_from_a_test_module_runs_through_dermfed_evaluate(toy_arm, pretrained, capsys):
    folder, common = pretrained
    with pytest.raises(SystemExit) as done:
        main(["evaluate", "--help"])
    assert done.value.code == 0 and "--toy-model TIMM_NAME" in capsys.readouterr().out  # its option, from the registry
    out = folder / "eval"
    assert main(["evaluate", "--config", "smoke", "--checkpoint", str(folder / "pretrain"), "--toy-model", "convnext_atto",
                 "--checkpoint", str(folder / "pretrain" / "checkpoint.pt"),  # a repeatable option: a second arm A2
                 "--out", str(out), *common, *FAST, "evaluation.arms=[federated,random,toy]"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    arms = {arm["key"]: arm for arm in metrics["arms"]}
    assert list(arms) == ["federated", "federated-2", "random", "toy"] and not metrics["skipped_arms"]
    assert arms["federated-2"]["label"] == arms["federated"]["label"].replace("A: ", "A2: ", 1)
    toy, random = arms["toy"], arms["random"]
    assert toy["label"] == TOY_LABEL and "convnext_atto" in toy["source"]
    # identical heads, frozen features: the same architecture from the same seed gives arm C's predictions exactly
    # (left in training mode, its stochastic depth would have drawn other features)
    predictions = np.load(out / "predictions.npz")
    assert predictions["split0_toy"].shape == predictions["split0_random"].shape
    assert np.array_equal(predictions["split0_toy"], predictions["split0_random"])
    assert {m: v["mean"] for m, v in toy["summary"].items()} == {m: v["mean"] for m, v in random["summary"].items()}
    assert toy["curves"] == random["curves"]  # (intervals differ: each arm has its own bootstrap stream)
    assert [s["best_epoch"] for s in toy["seeds"]] == [s["best_epoch"] for s in random["seeds"]]
    # every encoder under study against every other arm, each pair once
    assert [(c["a"], c["b"]) for c in metrics["comparisons"]][::2] == [
        ("federated", "federated-2"), ("federated", "random"), ("federated", "toy"), ("federated-2", "random"),
        ("federated-2", "toy")]
    assert np.array_equal(predictions["split0_federated"], predictions["split0_federated-2"])  # one checkpoint, twice
    report = (out / "report.html").read_text()
    assert report.count(TOY_LABEL) >= 3  # comparisons, test metrics, training table
    assert "T: a toy arm registered from tests/test_arms.py" in report


def test_evaluation_arms_is_checked_against_the_registry(toy_arm, capsys):
    assert main(["config", "--config", "smoke", "evaluation.arms=[toy,random]"]) == 0  # a registered arm is a valid name
    capsys.readouterr()
    assert main(["config", "--config", "smoke", "evaluation.arms=[random,tooy]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("dermfed: error: invalid configuration: evaluation.arms.1: Input should be 'federated', 'imagenet', "
                   "'random', 'pooled', 'local' or 'toy' (got 'tooy')")


def test_an_arm_whose_option_is_absent_is_skipped_with_what_to_pass(toy_arm, smoke_config):
    config = smoke_config.model_copy(update={"evaluation": smoke_config.evaluation.model_copy(update={"arms": ["toy"]})})
    skipped: dict[str, str] = {}
    assert list(build_arms(ArmContext(config, "convnext_atto"), {}, skipped)) == []
    assert skipped == {"toy": "not requested (pass --toy-model a timm model name)"}


def test_a_name_or_option_registered_twice_is_refused(toy_arm):
    class Twin(ToyArm):
        input = ArmInput("--toy-twin", "model", "TIMM_NAME", help="")

    class Thief(ToyArm):
        name = "thief"

    with pytest.raises(ValueError, match="'toy' is registered twice"):
        register_arm(Twin)
    with pytest.raises(ValueError, match="option --toy-model is already arm 'toy'"):
        register_arm(Thief)
    assert "thief" not in ARMS
