"""`dermfed study`: the whole protocol from one config, through the installed command, as a reviewer reads its output.

One end-to-end run (a Flower simulation; marked slow) on a tiny config: the masked-modelling objective federated over
3 synthetic hospitals for 1 round, its pooled and local-only controls, one evaluation with an external set. Its first
attempt fails at the evaluation (the external set is not there yet): the study must name the step and say how to
continue; the second attempt keeps the finished steps and ends with one report naming every arm by what it is.
The plan and the config's validation are checked in-process, without training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from common.run_folder import EVALUATE, PRETRAIN, SIMULATE, STUDY, is_complete, run_kind
from server.cli import main
from server.study import make_plan

FAST = ["federation.num_rounds=1", "evaluation.epochs=2", "evaluation.seeds=[0]", "evaluation.bootstrap_replicates=100",
        "evaluation.arms=[federated,random,pooled,local]"]


def _dermfed() -> str:
    script = Path(sys.executable).with_name("dermfed")
    assert script.is_file(), f"no installed `dermfed` beside {sys.executable}: install the project (make install)"
    return str(script)


@pytest.mark.slow
def test_one_command_runs_the_study_and_reports_every_arm_by_what_it_is(tmp_path, synthetic_root):
    study, external = tmp_path / "study", tmp_path / "external"
    command = [_dermfed(), "study", "--config", "smoke", "--out", str(study), f"data.root={synthetic_root}",
               f"data.cache_dir={tmp_path / 'cache'}", "study.objectives=[masked]", *FAST,
               f"evaluation.external=[{{format: synthetic, root: {external}, name: elsewhere}}]"]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 2, first.stderr[-3000:]
    assert "[step 1/4] federated pretraining, objective masked" in first.stdout
    assert "dermfed study: step 4/4 (evaluation of every arm, one report) failed; finished steps are kept: run the " \
           "same `dermfed study` command again" in first.stderr
    record = json.loads((study / "study.json").read_text())
    assert record["status"] == "failed" and [s["status"] for s in record["steps"]] == ["done", "done", "done", "failed"]

    assert main(["data", "synth", "--config", "smoke", "--out", str(external), "seed=1", "synth.shortcut=false",
                 "synth.lesions_per_site=6"]) == 0
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    for number in (1, 2, 3):
        assert f"[step {number}/4]" in second.stdout and f"done already ({study}" in second.stdout
    assert "(continuing an unfinished study)" in second.stdout

    # the layout: the study's own config and record, one ordinary run of its command per step
    assert run_kind(study)[0] == STUDY and is_complete(study)
    record = json.loads((study / "study.json").read_text())
    assert record["status"] == "finished" and record["objectives"] == ["masked"]
    steps = {s["folder"]: s for s in record["steps"]}
    assert list(steps) == ["federated-masked", "pooled-masked", "local-masked", "evaluation"]
    assert {folder: run_kind(study / folder)[0] for folder in steps} == {
        "federated-masked": SIMULATE, "pooled-masked": PRETRAIN, "local-masked": PRETRAIN, "evaluation": EVALUATE}
    assert all(is_complete(study / folder) for folder in steps) and (study / "evaluation" / "report.html").is_file()
    assert steps["pooled-masked"]["command"].startswith(f"dermfed pretrain --config {study / 'config.yaml'} --out ")
    site = record["local_site"]
    local = load_config(study / "local-masked" / "config.yaml")
    assert local.data.site == site and local.model.objective == "masked"
    assert (local.train.epochs, local.train.max_steps) == (1, 4)  # one round's worth, as a site in the federation

    # one report: every arm named by what its checkpoint records, never by the slot it was passed in
    metrics = json.loads((study / "evaluation" / "metrics.json").read_text())
    labels = {arm["key"]: arm["label"] for arm in metrics["arms"]}
    assert list(labels) == ["federated", "random", "pooled", "local"]
    assert labels["federated"].startswith("A: federated masked image modelling encoder (1 round, 3 sites")
    assert labels["pooled"].startswith("D: pooled masked image modelling encoder (1 epoch")
    assert labels["local"].startswith(f"E: local-only masked image modelling encoder ({site}, 1 epoch")
    assert labels["random"] == "C: random init (control)"
    assert {arm["key"]: arm["provenance"]["kind"] for arm in metrics["arms"] if arm["provenance"]} == {
        "federated": "federated", "pooled": "pooled", "local": "local-only"}
    assert list(metrics["external"]) == ["elsewhere"]
    report = (study / "evaluation" / "report.html").read_text()
    assert all(label in report for label in labels.values())
    assert "generalisation to external test set elsewhere" in report

    # a finished study is refused as --out, like every other command's finished run
    assert main(["study", "--config", "smoke", "--out", str(study), f"data.root={synthetic_root}"]) == 2


def test_the_plan_pretrains_each_objective_and_its_controls_with_the_federated_budget():
    config = load_config("smoke", ["study.objectives=[vae,masked]", "federation.num_rounds=3", "train.epochs=2",
                                   "train.max_steps=5"])
    plan = make_plan(config, {"a": 10, "b": 30, "c": 30}, 3)
    assert plan.local_site == "b"  # the most pretraining images; ties: the first by name
    assert [(s.kind, s.objective, s.folder) for s in plan.steps] == [
        ("federated", "vae", "federated-vae"), ("federated", "masked", "federated-masked"),
        ("pooled", "vae", "pooled-vae"), ("local", "vae", "local-vae"),
        ("pooled", "masked", "pooled-masked"), ("local", "masked", "local-masked"),
        ("evaluate", None, "evaluation")]
    steps = {s.folder: s for s in plan.steps}
    assert steps["pooled-vae"].overrides == ["model.objective=vae", "train.epochs=6", "train.max_steps=45"]
    assert steps["local-masked"].overrides == ["model.objective=masked", 'data.site="b"', "train.epochs=6",
                                               "train.max_steps=15"]
    assert steps["evaluation"].argv == [
        "evaluate", "--checkpoint", "federated-vae", "--checkpoint", "federated-masked", "--pooled", "pooled-vae",
        "--pooled", "pooled-masked", "--local", "local-vae", "--local", "local-masked", "--out", "evaluation"]
    shorter = make_plan(load_config("smoke", ["study.control_rounds=1", "study.controls=[local]",
                                              "study.local_site=a"]), {"a": 10, "b": 30}, 2)
    assert [(s.folder, s.overrides) for s in shorter.steps if s.kind == "local"] == [
        ("local-vae", ["model.objective=vae", 'data.site="a"', "train.epochs=1", "train.max_steps=4"])]
    assert not any(s.kind == "pooled" for s in shorter.steps)


@pytest.mark.parametrize("override, message", [
    ("study.objectives=[vea]", "study.objectives.0: not a registered objective; did you mean vae? allowed: masked, vae"),
    ("study.objectives=[vae,vae]", "study.objectives: vae given twice; list each once"),
    ("study.objectives=[]", "study.objectives: List should have at least 1 item"),
    ("study.controls=[pooled,central]", "study.controls.1: Input should be 'pooled' or 'local'"),
    ("study.control_rounds=0", "study.control_rounds: Input should be greater than or equal to 1"),
    ("study.objective=vae", "unknown config key 'study.objective' in section 'study'; allowed: control_rounds, controls, "
                            "local_site, objectives"),
])
def test_a_bad_study_config_is_one_line_and_exit_2(override, message, tmp_path, capsys):
    assert main(["study", "--config", "smoke", "--out", str(tmp_path / "study"), override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "study").exists()


def test_an_unknown_local_site_or_another_config_is_refused_before_any_step(tmp_path, synthetic_root, capsys):
    common = ["--out", str(tmp_path / "study"), f"data.root={synthetic_root}", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["study", "--config", "smoke", *common, "study.local_site=nowhere"]) == 2
    assert ("dermfed: error: study.local_site='nowhere' is not a site of this data set; sites: ['hospital_1', "
            "'hospital_2', 'hospital_3']") in capsys.readouterr().err
    assert not (tmp_path / "study" / "study.json").exists()
    # an unfinished study (as a killed one leaves it) is continued only with its own config
    study = tmp_path / "other"
    study.mkdir()
    (study / "config.yaml").write_text((Path(__file__).parents[1] / "configs" / "smoke.yaml").read_text())
    (study / "study.json").write_text(json.dumps({"status": "running", "steps": []}))
    assert main(["study", "--config", "smoke", "--out", str(study), "seed=3"]) == 2
    err = capsys.readouterr().err
    assert f"--out {study} holds an unfinished study with another config (seed: 0 -> 3)" in err
    with pytest.raises(ConfigError):
        load_config("smoke", ["study.local_site=[a]"])
