"""The report credits each arm with what it is and says what every interval covers (a reviewer's reading).

A reviewer gives `dermfed evaluate` a real federation's checkpoint, whose hospitals' images are
unknown to the coordinator and which spent a DP budget, and reads the report: the arm must be named
federated with its rounds, sites and DP-SGD, and every verdict about it qualified, since its
pretraining images could not be checked against the test images.
"""

import json

from common.checkpoint import load_checkpoint, save_checkpoint
from common.config import build_config
from server.cli import main
from server.evaluation.provenance import checkpoint_provenance


def _real_federation_checkpoint(pooled_run, path):
    """What `dermfed deploy run` writes: a federated checkpoint whose images are unknown, with each site's epsilon."""
    payload = load_checkpoint(pooled_run)
    history = [{"round": r, "sites": [{"site": "clinic_a", "epsilon": 1.5 * r}, {"site": "clinic_b", "epsilon": 1.0 * r}],
                "excluded": [], "train": {}, "evaluate": {}, "monitor": {}, "seconds": 1.0} for r in (1, 2)]
    save_checkpoint(path, config=build_config(payload["config"]), encoder_state=payload["encoder"], position={"round": 2},
                    history=history, extra={"arm": "federated", "pretraining_images": {
                        "unknown": "a real federation: the hospitals' images are not known to the coordinator"}})
    return path


def test_a_real_federations_arm_is_named_by_its_record_and_its_verdicts_are_qualified(synthetic_root, tmp_path):
    common = [f"data.root={synthetic_root}", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["pretrain", "--config", "smoke", "--out", str(tmp_path / "pooled"), *common, "train.max_steps=1"]) == 0
    federated = _real_federation_checkpoint(tmp_path / "pooled", tmp_path / "federated" / "checkpoint.pt")
    assert checkpoint_provenance(load_checkpoint(federated)).describe() == \
        "federated VAE encoder (2 rounds, 2 sites, DP-SGD epsilon <= 3.00)"
    assert main(["evaluate", "--config", "smoke", "--checkpoint", str(federated.parent), "--out", str(tmp_path / "eval"),
                 *common, "evaluation.epochs=2", "evaluation.seeds=[0]", "evaluation.bootstrap_replicates=100"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    arm = metrics["arms"][0]
    assert arm["label"] == "A: federated VAE encoder (2 rounds, 2 sites, DP-SGD epsilon <= 3.00)"
    assert arm["provenance"]["objective"] == "vae" and arm["provenance"]["kind"] == "federated"
    assert arm["pretraining_overlap"]["pretraining_images"] is None
    for comparison in metrics["comparisons"]:
        assert "Qualified: A: federated VAE encoder" in comparison["words"] and "not known" in comparison["words"]
        assert comparison["caveats"]
    report = (tmp_path / "eval" / "report.html").read_text()
    assert "Qualified verdicts." in report and "A: federated VAE encoder (2 rounds, 2 sites, DP-SGD epsilon &lt;= 3.00)" in report


def test_a_verdict_about_an_older_checkpoint_says_its_lesions_were_not_checked():
    from server.evaluation.run import SOURCE, _unknown_overlap

    older = {"source": "recorded in the checkpoint (an older record: images only, not their lesions)",
             "pretraining_images": 12, "pretraining_groups": None, "train": 12, "val": 0, "test": 0}
    arm = {"label": "A: pooled VAE encoder (1 epoch, DP-SGD off)", "pretraining_overlap": older, "external_overlap": {"x": older}}
    for where in (SOURCE, "x"):
        assert "records its pretraining images but not their lesions" in _unknown_overlap(arm, where)
    arm["pretraining_overlap"] = {**older, "pretraining_groups": 5, "source": "recorded in the checkpoint"}
    assert _unknown_overlap(arm, SOURCE) is None


def test_a_metrics_file_of_an_older_evaluation_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text(json.dumps({"arms": [], "data": {}}))
    assert main(["report", str(tmp_path)]) == 2
    assert "written by an older `dermfed evaluate`" in capsys.readouterr().err
