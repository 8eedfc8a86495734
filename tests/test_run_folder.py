"""One owner for a run folder (`common.run_folder`), tested through the `dermfed` command line: issue 18's bugs 2-6.

Each test writes the run folder a real command leaves (its config.yaml, its checkpoints, its marker files) without
training, then runs the CLI's `main` (the console script's code) on it. Where a command would go on to start a
federation, `run_simulation` / Flower's launcher are replaced by a stub that records the call: the test is about
what reaches them, and that nothing does when the folder is refused.
"""

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from common.checkpoint import save_checkpoint
from common.config import load_config, write_config
from common.run_folder import CHECKPOINT_NAME, PREVIOUS_NAME, is_complete, latest_good_checkpoint
from server.cli import main


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path below `folder` with its size and modification time: equal before and after = nothing written."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _simulation_run(folder: Path, rounds_done: int, *overrides: str, simulated: bool = True) -> Path:
    """What `dermfed simulate` leaves after `rounds_done` rounds (no training): config.yaml, sites/, checkpoints.
    With simulated=False what a real federation's ServerApp leaves: the same without sites/ (hospitals keep theirs)."""
    config = load_config("smoke", ["data.root=/nonexistent/data", *overrides])
    write_config(config, folder)
    if simulated:
        (folder / "sites").mkdir()
    for round_number in range(1, rounds_done + 1):
        save_checkpoint(folder / CHECKPOINT_NAME, config=config, encoder_state={"w": torch.full((2,), 1.0 * round_number)},
                        position={"round": round_number}, history=[{"round": r} for r in range(1, round_number + 1)],
                        extra={"shared": {"encoder.w": torch.zeros(2)}}, previous=folder / PREVIOUS_NAME)
    return folder


def _pretrain_run(folder: Path, *, finished: bool = True) -> Path:
    config = load_config("smoke", ["data.root=/nonexistent/data"])
    write_config(config, folder)
    save_checkpoint(folder / CHECKPOINT_NAME, config=config, encoder_state={"w": torch.zeros(2)},
                    position={"epoch": 1, "step": 4}, history=[])
    if finished:
        (folder / "reconstructions.png").write_bytes(b"png")
        (folder / "summary.json").write_text("{}")
    return folder


class Launches:
    """A stand-in for `run_simulation` and for every process the runner could start: records, starts nothing."""

    def __init__(self, monkeypatch):
        import simulations.runner as runner

        self.calls: list[dict] = []
        monkeypatch.setattr(runner, "run_simulation", self._record)
        monkeypatch.setattr(runner.subprocess, "Popen", self._no_process)

    def _record(self, config, run_dir, **kwargs):
        self.calls.append({"config": config, "run_dir": run_dir, **kwargs})
        return run_dir

    @staticmethod
    def _no_process(*args, **kwargs):
        raise AssertionError(f"a process was started: {args[0] if args else kwargs}")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- bug 2: on resume, the run's own config plus the overrides are validated together -------------------------------


def test_resume_validates_overrides_with_the_runs_own_config(tmp_path, monkeypatch, capsys):
    """A run shared as `vae` may add the reconstruction monitor on resume; the default preset (share=encoder) must
    not be what the override is checked against."""
    launches = Launches(monkeypatch)
    run = _simulation_run(tmp_path / "run", 1, "federation.share=vae")
    code, _, err = _run(capsys, "simulate", "--resume", str(run), "federation.monitor=reconstruction")
    assert code == 0, err
    [call] = launches.calls
    assert call["resume"] and call["config"].federation.monitor == "reconstruction"
    assert call["config"].federation.share == "all"


def test_resume_refuses_an_override_the_runs_own_config_does_not_allow(tmp_path, monkeypatch, capsys):
    launches = Launches(monkeypatch)
    run = _simulation_run(tmp_path / "run", 1)  # share=encoder: no decoder on the server
    before = _tree(run)
    code, _, err = _run(capsys, "simulate", "--resume", str(run), "federation.monitor=reconstruction")
    assert code == 2 and "federation.monitor=reconstruction needs federation.share=all" in err
    assert not launches.calls and _tree(run) == before


# -- bug 3: `deploy run` of a --resume manifest checks the locked keys, as `simulate --resume` does -----------------


@pytest.fixture()
def federation(tmp_path, capsys):
    """A federation folder with its operator's key, and an (empty) site registry: what `deploy run` needs locally."""
    from common.deployment.layout import FederationLayout
    from server.deploy.registry import SiteRegistry

    root = tmp_path / "federation"
    assert main(["deploy", "init", "--out", str(root), "--host", "localhost"]) == 0
    SiteRegistry({}).save(FederationLayout(root).registry)
    capsys.readouterr()
    return root


def _submitted(monkeypatch) -> list:
    import server.deploy.control as control

    calls: list = []
    monkeypatch.setattr(control, "operator_flwr", lambda *args, **kwargs: calls.append(args) or
                        subprocess.CompletedProcess(args, 0, "", ""))
    return calls


def _sign(capsys, federation: Path, run: Path, manifest: Path, *extra: str) -> None:
    code, _, err = _run(capsys, "deploy", "sign", "--operator", str(federation / "operator"), "--config", "smoke",
                        "--run-dir", str(run), "--out", str(manifest), "data.root=/nonexistent/data", *extra)
    assert code == 0, err


@pytest.mark.parametrize("change", ["model.encoder=convnext_femto", "dp.delta=1e-6", "data.image_size=64"])
def test_deploy_run_of_a_resume_manifest_refuses_a_locked_change_before_submitting(federation, tmp_path, monkeypatch,
                                                                                  capsys, change):
    submitted = _submitted(monkeypatch)
    run = _simulation_run(tmp_path / "run", 1, simulated=False)
    before = _tree(run)
    _sign(capsys, federation, run, tmp_path / "m.json", "--resume", change)
    code, _, err = _run(capsys, "deploy", "run", "--dir", str(federation), "--manifest", str(tmp_path / "m.json"))
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert "cannot change" in last and change.split("=")[0] in last, last
    assert not submitted and _tree(run) == before


def test_deploy_run_of_a_resume_manifest_submits_an_allowed_change(federation, tmp_path, monkeypatch, capsys):
    submitted = _submitted(monkeypatch)
    run = _simulation_run(tmp_path / "run", 1, simulated=False)
    _sign(capsys, federation, run, tmp_path / "m.json", "--resume", "federation.num_rounds=3")
    code, _, err = _run(capsys, "deploy", "run", "--dir", str(federation), "--manifest", str(tmp_path / "m.json"))
    assert code == 0, err
    assert len(submitted) == 1


def test_a_run_is_continued_only_by_hospitals_of_its_own_kind(federation, tmp_path, monkeypatch, capsys):
    """Wave-2 finding 8: `simulate --resume` of a real federation's run folder continued it on the pooled images
    (and rewrote its record of pretraining images, "unknown" at real hospitals); `deploy run` of a --resume manifest
    for a simulation's folder would hand real hospitals a run whose site states they do not hold."""
    submitted = _submitted(monkeypatch)
    launches = Launches(monkeypatch)
    deployed = _simulation_run(tmp_path / "deployed", 1, "federation.num_rounds=3", simulated=False)
    before = _tree(deployed)
    code, _, err = _run(capsys, "simulate", "--resume", str(deployed))
    assert code == 2 and "holds a real federation's run" in err and "deploy run" in err, err
    assert _tree(deployed) == before and not launches.calls
    simulation = _simulation_run(tmp_path / "simulation", 1, "federation.num_rounds=3")
    _sign(capsys, federation, simulation, tmp_path / "m.json", "--resume")
    code, _, err = _run(capsys, "deploy", "run", "--dir", str(federation), "--manifest", str(tmp_path / "m.json"))
    assert code == 2 and "holds a simulation's run" in err and "dermfed simulate --resume" in err, err
    assert not submitted


@pytest.mark.parametrize("folder", ["no run", "no round", "a pretrain run"])
def test_deploy_run_refuses_a_resume_manifest_of_a_folder_that_is_not_a_resumable_run(federation, tmp_path,
                                                                                     monkeypatch, capsys, folder):
    submitted = _submitted(monkeypatch)
    run = tmp_path / "run"
    {"no run": lambda: run.mkdir(), "no round": lambda: _simulation_run(run, 0),
     "a pretrain run": lambda: _pretrain_run(run)}[folder]()
    _sign(capsys, federation, run, tmp_path / "m.json", "--resume")
    code, _, err = _run(capsys, "deploy", "run", "--dir", str(federation), "--manifest", str(tmp_path / "m.json"))
    assert code == 2 and err.strip().splitlines()[-1].startswith("dermfed: error: the manifest's --resume of"), err
    assert not submitted


def test_deploy_run_refuses_a_new_run_into_a_folder_holding_one(federation, tmp_path, monkeypatch, capsys):
    submitted = _submitted(monkeypatch)
    run = _simulation_run(tmp_path / "run", 2)
    _sign(capsys, federation, run, tmp_path / "m.json")
    code, _, err = _run(capsys, "deploy", "run", "--dir", str(federation), "--manifest", str(tmp_path / "m.json"))
    assert code == 2 and "already holds a federated run" in err and not submitted


def test_the_server_app_refuses_a_locked_change_on_resume(tmp_path):
    """The ServerApp's own plan (for `flwr run` without `dermfed`): the same check, before any round."""
    from server.federation import ResumeError, plan_run

    run = _simulation_run(tmp_path / "run", 1)
    with pytest.raises(ResumeError, match="cannot change model.encoder"):
        plan_run(load_config("smoke", ["data.root=/nonexistent/data", "model.encoder=convnext_femto"]), run, True)


# -- bug 4: no command writes over another's run, nor over a finished run of its own kind --------------------------


def _summary(tmp_path, synthetic_root, out, *extra):
    return ["data", "summary", "--config", "smoke", f"data.root={synthetic_root}", f"data.cache_dir={tmp_path / 'c'}",
            "--out", str(out), *extra]


def _existing(kind: str, folder: Path, tmp_path: Path, synthetic_root: Path) -> None:
    if kind == "a finished simulation":
        _simulation_run(folder, 2)
    elif kind == "a finished pretrain run":
        _pretrain_run(folder)
    elif kind == "a finished evaluation":
        write_config(load_config("smoke"), folder)
        (folder / "metrics.json").write_text("{}")
        (folder / "predictions.npz").write_bytes(b"npz")
    else:
        assert main(_summary(tmp_path, synthetic_root, folder)) == 0


def _command(command: str, out: Path, tmp_path: Path, synthetic_root: Path) -> list[str]:
    data = [f"data.root={synthetic_root}", f"data.cache_dir={tmp_path / 'c'}"]
    if command == "pretrain":
        return ["pretrain", "--config", "smoke", *data, "train.max_steps=1", "--out", str(out)]
    if command == "evaluate":
        return ["evaluate", "--config", "smoke", *data, "--checkpoint", str(tmp_path / "nowhere"), "--out", str(out)]
    return _summary(tmp_path, synthetic_root, out)


@pytest.mark.parametrize("command,kind", [
    ("pretrain", "a finished simulation"), ("evaluate", "a finished simulation"), ("data summary", "a finished simulation"),
    ("pretrain", "a finished pretrain run"), ("evaluate", "a finished evaluation"), ("data summary", "a data summary"),
])
def test_a_command_refuses_an_out_holding_another_run_or_a_finished_one(command, kind, tmp_path, synthetic_root,
                                                                       capsys):
    out = tmp_path / "out"
    _existing(kind, out, tmp_path, synthetic_root)
    capsys.readouterr()
    before = _tree(out)
    code, _, err = _run(capsys, *_command(command, out, tmp_path, synthetic_root))
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dermfed") and str(out) in last and "--force" in last, last
    assert _tree(out) == before  # nothing written, nothing moved


def test_force_moves_the_old_run_aside_and_says_where(tmp_path, synthetic_root, capsys):
    out = tmp_path / "out"
    _pretrain_run(out)
    before = _tree(out)
    code, printed, err = _run(capsys, *_summary(tmp_path, synthetic_root, out, "--force"))
    assert code == 0, err
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert f"moved the run that was in {out} to {aside}" in printed
    assert _tree(aside) == before  # the old run, whole, where the message says
    assert (out / "summary.json").is_file() and not (out / CHECKPOINT_NAME).exists()


def test_an_unfinished_run_of_the_same_kind_is_started_again(tmp_path, synthetic_root, capsys):
    out = tmp_path / "out"
    _pretrain_run(out, finished=False)  # killed after its first epoch: pretraining has no --resume
    code, _, err = _run(capsys, *_command("pretrain", out, tmp_path, synthetic_root))
    assert code == 0, err
    assert is_complete(out)


def test_simulate_refuses_an_out_holding_a_run_before_anything_starts(tmp_path, monkeypatch, capsys):
    launches = Launches(monkeypatch)
    for rounds, says in ((2, "already holds a federated run; continue it with --resume"),
                         (0, "holds a federated run that completed no round")):
        run = _simulation_run(tmp_path / f"run{rounds}", rounds)
        before = _tree(run)
        code, _, err = _run(capsys, "simulate", "--config", "smoke", "--out", str(run))
        assert code == 2 and says in err, err
        assert _tree(run) == before and not launches.calls


# -- bug 5: a full disk or a kill while a round is saved never costs the last good round -----------------------------


def _recorder_with_round_1(run_dir: Path):
    from server.rounds import RunRecorder

    recorder = RunRecorder(run_dir, load_config("smoke", ["data.root=/nonexistent/data"]))
    (run_dir / "sites").mkdir()  # a simulation's: its virtual hospitals' states are in the run folder
    recorder.record(1)
    recorder.finish(1, {"encoder.w": torch.ones(1000)}, {})
    return recorder


def test_a_full_disk_mid_save_keeps_round_1_resumable(tmp_path, monkeypatch, capsys):
    """ENOSPC half-way through writing round 2's checkpoint: round 1 stays the latest good checkpoint, history.json
    does not claim round 2, no temporary file is left, and `dermfed simulate --resume` continues after round 1."""
    import common.run_files as run_files

    run = tmp_path / "run"
    recorder = _recorder_with_round_1(run)
    history = (run / "history.json").read_bytes()
    real_fdopen = run_files.os.fdopen

    class FullDisk:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        def write(self, data):
            self.stream.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.stream, name)

    monkeypatch.setattr(run_files.os, "fdopen", lambda *args, **kwargs: FullDisk(real_fdopen(*args, **kwargs)))
    recorder.record(2)
    with pytest.raises(OSError) as failure:
        recorder.finish(2, {"encoder.w": torch.full((1000,), 2.0)}, {})
    monkeypatch.undo()
    assert failure.value.errno == errno.ENOSPC and failure.value.filename == str(run / CHECKPOINT_NAME)
    assert latest_good_checkpoint(run)["position"]["round"] == 1
    assert (run / "history.json").read_bytes() == history
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
    launches = Launches(monkeypatch)
    code, _, err = _run(capsys, "simulate", "--resume", str(run))
    assert code == 0, err
    assert len(launches.calls) == 1


def test_a_kill_between_keeping_the_previous_and_the_save_loses_nothing(tmp_path, monkeypatch, capsys, caplog):
    """On a file system without hard links, the old checkpoint is renamed to checkpoint.prev.pt just before the new
    one (already complete and synced) is renamed into place: a kill in between leaves no checkpoint.pt. The run is
    still a resumable simulation at round 1, with a warning, and the complete round-2 file was written first."""
    import common.run_files as run_files

    run = tmp_path / "run"
    recorder = _recorder_with_round_1(run)
    real_replace = run_files.os.replace

    class Killed(BaseException):
        pass

    def no_link(*args, **kwargs):
        raise OSError(errno.EPERM, "no hard links here")

    def replace(source, target):
        if Path(target).name == CHECKPOINT_NAME and Path(source).name.startswith(f".{CHECKPOINT_NAME}."):
            assert torch.load(source, weights_only=True)["position"]["round"] == 2  # complete before anything moved
            raise Killed()
        return real_replace(source, target)

    monkeypatch.setattr(run_files.os, "link", no_link)
    monkeypatch.setattr(run_files.os, "replace", replace)
    recorder.record(2)
    with pytest.raises(Killed):
        recorder.finish(2, {"encoder.w": torch.full((1000,), 2.0)}, {})
    monkeypatch.undo()
    assert not (run / CHECKPOINT_NAME).exists() and (run / PREVIOUS_NAME).is_file()
    assert latest_good_checkpoint(run)["position"]["round"] == 1
    assert "falling back to the previous round" in caplog.text
    launches = Launches(monkeypatch)
    code, _, err = _run(capsys, "simulate", "--resume", str(run))
    assert code == 0, err
    assert len(launches.calls) == 1


def test_a_torn_latest_checkpoint_resumes_from_the_previous_round(tmp_path, monkeypatch, capsys, caplog):
    run = _simulation_run(tmp_path / "run", 2)
    latest = run / CHECKPOINT_NAME
    latest.write_bytes(latest.read_bytes()[:100])  # torn by a crash mid-write (not by dermfed's writer)
    launches = Launches(monkeypatch)
    code, _, err = _run(capsys, "simulate", "--resume", str(run))
    assert code == 0, err
    assert len(launches.calls) == 1 and "falling back to the previous round" in caplog.text


# -- bug 6: --resume of a folder that is not a resumable run: refused before any process starts or file is written ---


RESUMABLE_OR_NOT = {
    "a folder with only a config.yaml (a run killed before its first checkpoint)":
        lambda folder: write_config(load_config("smoke", [f"data.root={folder.parent / 'data'}"]), folder),
    "a simulation that completed no round": lambda folder: _simulation_run(folder, 0),
    "a pretrain run whose latest checkpoint is torn": lambda folder: (
        _pretrain_run(folder, finished=False), (folder / PREVIOUS_NAME).write_bytes((folder / CHECKPOINT_NAME).read_bytes()),
        (folder / CHECKPOINT_NAME).write_bytes(b"torn")),
    "an evaluation": lambda folder: (write_config(load_config("smoke", [f"data.root={folder.parent / 'data'}"]), folder),
                                     (folder / "metrics.json").write_text("{}")),
    "an empty folder": lambda folder: folder.mkdir(),
    "no folder": lambda folder: None,
}


@pytest.mark.parametrize("name", list(RESUMABLE_OR_NOT))
def test_resume_of_a_folder_that_is_not_a_resumable_run_is_refused_before_anything(name, tmp_path, monkeypatch,
                                                                                    capsys):
    import simulations.runner as runner

    folder = tmp_path / "run"
    RESUMABLE_OR_NOT[name](folder)
    before = _tree(folder)
    monkeypatch.setattr(runner.subprocess, "Popen", Launches._no_process)  # the real run_simulation, no process
    code, _, err = _run(capsys, "simulate", "--resume", str(folder), f"data.cache_dir={tmp_path / 'cache'}")
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dermfed simulate: refused: --resume") and str(folder) in last, last
    assert _tree(folder) == before and not (tmp_path / "cache").exists()


def test_status_of_a_run_is_read_from_one_place(tmp_path):
    """`is_complete`: one answer for every kind (the CLI's refusals and the runner's messages use it)."""
    assert not is_complete(tmp_path / "absent")
    assert is_complete(_simulation_run(tmp_path / "done", 2)) and not is_complete(_simulation_run(tmp_path / "half", 1))
    assert is_complete(_pretrain_run(tmp_path / "pre")) and not is_complete(_pretrain_run(tmp_path / "pre2", finished=False))
    status = tmp_path / "half" / "run-status.json"
    status.write_text(json.dumps({"state": "finished"}))  # a status file does not make a run complete: its rounds do
    assert not is_complete(tmp_path / "half")


def test_force_never_moves_a_live_run_and_moves_nothing_when_the_command_is_refused(tmp_path, monkeypatch, capsys):
    """The attack: `--force` renamed a folder a live simulation still writes into (its hospitals' ledgers by path),
    and did so before the command's own checks refused it."""
    import fcntl

    launches = Launches(monkeypatch)
    run = _simulation_run(tmp_path / "run", 1)
    before = _tree(run)
    code, _, err = _run(capsys, "simulate", "--out", str(run), "--force", "--stop-after-round", "999")
    assert code == 2 and "--stop-after-round 999" in err and _tree(run) == before  # refused: nothing moved
    with open(run / ".run.lock", "a+") as lock:  # a live run holds its folder's lock
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = _run(capsys, "simulate", "--out", str(run), "--force")
        assert code == 2 and "in use by a live run" in err
        assert run.is_dir() and not list(tmp_path.glob("run.old-*"))
    assert not launches.calls


def test_resume_cannot_drop_or_swap_the_warm_start(tmp_path, monkeypatch, capsys):
    """A warm-started run records the warm start's images for evaluation's leak check; that record is made again from
    the resumed config, so a resume that drops `federation.initial_checkpoint` (or names another) would leave a
    checkpoint that hides what its encoder saw. Refused, as a locked key, before anything starts."""
    launches = Launches(monkeypatch)
    warm = _pretrain_run(tmp_path / "warm") / CHECKPOINT_NAME
    run = _simulation_run(tmp_path / "run", 1, f"federation.initial_checkpoint={warm}")
    for change in ("federation.initial_checkpoint=null", f"federation.initial_checkpoint={tmp_path / 'other.pt'}"):
        code, _, err = _run(capsys, "simulate", "--resume", str(run), change)
        assert code == 2 and "cannot change federation.initial_checkpoint" in err, err
    assert not launches.calls


@pytest.mark.parametrize("holding", ["a finished simulation", "a simulation with a round done", "a pretrain run"])
def test_the_server_app_never_starts_a_new_run_over_one_it_would_overwrite(holding, tmp_path):
    """`flwr run` straight into a run folder (no `dermfed` in front, resume=false): the ServerApp's own plan refuses a
    folder holding a completed round or another kind's run, before round 1 rotates its checkpoints away and rewrites
    its history under a config.yaml that no longer describes them."""
    from server.federation import ResumeError, plan_run

    run = tmp_path / "run"
    if holding == "a pretrain run":
        _pretrain_run(run)
    else:
        _simulation_run(run, 3 if holding == "a finished simulation" else 1, "federation.num_rounds=3")
    before = _tree(run)
    with pytest.raises(ResumeError, match="holds"):
        plan_run(load_config("smoke", ["data.root=/nonexistent/data", "seed=5"]), run, False)
    assert _tree(run) == before


def test_a_live_deployed_run_holds_its_folder_against_force_another_serverapp_and_deploy_run(tmp_path, monkeypatch,
                                                                                           capsys):
    """The attack: only `dermfed simulate` locked its folder, so `--force` moved a live deployed run aside, and a
    second ServerApp (or `deploy run` of a --resume manifest) wrote into the folder the live one still writes. The
    ServerApp of a real federation (a site registry in its run config) now holds the folder's lock while it runs."""
    import server.server_app as server_app
    from flwr.app import Context, RecordDict

    from common.flower_keys import RUN_DIR, SITE_REGISTRY
    from common.run_folder import live_run
    from server.deploy.control import DeployError, check_run_folder

    run = _simulation_run(tmp_path / "run", 1, "federation.num_rounds=3")
    config = load_config(run / "config.yaml")
    context = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(),
                      run_config={RUN_DIR: str(run), SITE_REGISTRY: str(tmp_path / "registry.json")})
    monkeypatch.setattr(server_app, "config_of", lambda run_id, run_config: config)
    seen = {}

    def a_live_run(grid, context, config, run_dir, registry_path):  # the deployed run, while it runs
        seen["holder"] = live_run(run_dir)
        before = _tree(run)
        code, _, err = _run(capsys, "pretrain", "--config", "smoke", "--out", str(run), "--force")
        seen["force"] = (code, err, _tree(run) == before, list(tmp_path.glob("run.old-*")))
        with pytest.raises(DeployError, match="in use by a live run") as refused:
            check_run_folder({"run-dir": str(run), "resume": True}, config.model_dump(mode="json"))
        seen["deploy"] = str(refused.value)
        with pytest.raises(Exception, match="in use by a live run"):  # a second ServerApp of the same folder
            server_app.main(None, context)

    monkeypatch.setattr(server_app, "_federate", a_live_run)
    server_app.main(None, context)
    assert seen["holder"].startswith("a deployed run's ServerApp, pid ")
    code, err, untouched, moved = seen["force"]
    assert code == 2 and "in use by a live run (a deployed run's ServerApp" in err and untouched and not moved, err
    assert "a deployed run's ServerApp" in seen["deploy"]
    assert live_run(run) is None  # released when the run ends


class _OneRound:
    """A stand-in for DermFed's strategy in the ServerApp: completes one round with the weights it was given."""

    def attach(self, *args, **kwargs):
        pass

    def import_state(self, state):
        pass

    def export_state(self):
        return {}

    def start(self, grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn):
        evaluate_fn(0, initial_arrays)
        evaluate_fn(1, initial_arrays)


def test_a_bare_flwr_run_resuming_a_real_federations_folder_keeps_its_pretraining_images_unknown(
        synthetic_root, tmp_path, monkeypatch):
    """Attack (wave 3): `dermfed simulate --resume` refuses a real federation's folder (wave-2 finding 8), but a bare
    `flwr run . --run-config 'resume=true run-dir=...'` (no site registry: the ServerApp runs a simulation) resumed it
    and rewrote the checkpoint's record of pretraining images from "unknown" (the hospitals' images) to the pooled
    images alone: evaluation's leak guard then checked a test set against the wrong list. A resumed run's record is
    now the union of the run's earlier record and its own (unknown when either is)."""
    import server.server_app as server_app
    from flwr.app import Context, RecordDict

    from common.data.partition import partition_catalog
    from common.data.pipeline import prepare_data
    from common.flower_keys import RESUME, RUN_DIR
    from common.model import build_model, shared_state

    overrides = [f"data.root={synthetic_root}", f"data.cache_dir={tmp_path / 'cache'}", "federation.num_rounds=3"]
    config = load_config("smoke", overrides)
    run = tmp_path / "real-federation"
    write_config(config, run)  # what a real federation's ServerApp leaves: no sites/, its record "unknown"
    shared = shared_state(build_model(config.model, config.data.image_size), config.federation.share)
    real = {"unknown": "a real federation: the hospitals' images are not known to the coordinator"}
    save_checkpoint(run / CHECKPOINT_NAME, config=config, encoder_state={"w": torch.zeros(2)}, position={"round": 1},
                    history=[{"round": 1, "seconds": 1.0, "sites": [], "excluded": [], "train": {}, "evaluate": {}, "monitor": {}}],
                    extra={"shared": shared, "pretraining_images": real},
                    previous=run / PREVIOUS_NAME)
    hospitals = len(partition_catalog(prepare_data(config).catalog, config.data.partition, config.data.num_partitions,
                                      config.data.dirichlet_alpha, config.seed)[0])

    class Grid:
        def get_node_ids(self):
            return list(range(hospitals))

    monkeypatch.setattr(server_app, "config_of", lambda run_id, run_config: config)
    monkeypatch.setattr(server_app, "build_strategy", lambda config: _OneRound())
    context = Context(run_id=9, node_id=0, node_config={}, state=RecordDict(), run_config={RUN_DIR: str(run), RESUME: True})
    server_app.main(Grid(), context)
    payload = latest_good_checkpoint(run)
    assert payload["position"]["round"] == 2  # the bare `flwr run` did continue the run
    assert "unknown" in payload["extra"]["pretraining_images"], payload["extra"]["pretraining_images"].keys()


def test_a_serverapp_without_a_site_registry_never_writes_into_a_folder_another_live_run_holds(
        synthetic_root, tmp_path, monkeypatch):
    """Attack (wave 3): the ServerApp took the folder's lock only when its run config named a site registry (a real
    federation), trusting that `dermfed simulate` holds it otherwise. A bare `flwr run . --run-config 'resume=true
    run-dir=LIVE'` (no registry) therefore resumed, and checkpointed into, the folder a live deployed run's
    ServerApp (another process) was writing. Now a ServerApp without a registry runs only in a folder it can lock,
    or one whose lock `dermfed simulate` holds as its own ancestor process."""
    import subprocess
    import sys

    import server.server_app as server_app
    from flwr.app import Context, RecordDict

    from common.flower_keys import RESUME, RUN_DIR
    from common.model import build_model, shared_state
    from common.run_folder import RunFolderError, live_run

    config = load_config("smoke", [f"data.root={synthetic_root}", f"data.cache_dir={tmp_path / 'cache'}",
                                   "federation.num_rounds=3"])
    run = tmp_path / "live"
    write_config(config, run)
    shared = shared_state(build_model(config.model, config.data.image_size), config.federation.share)
    save_checkpoint(run / CHECKPOINT_NAME, config=config, encoder_state={"w": torch.zeros(2)}, position={"round": 1},
                    history=[{"round": 1, "seconds": 1.0, "sites": [], "excluded": [], "train": {}, "evaluate": {},
                              "monitor": {}}], extra={"shared": shared}, previous=run / PREVIOUS_NAME)
    holder = subprocess.Popen(  # the live deployed run's ServerApp: another process holds the folder
        [sys.executable, "-c", "import sys, time; from common.run_folder import RunFolderLock; "
         f"RunFolderLock({str(run)!r}, \"a deployed run's ServerApp\"); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert live_run(run).startswith("a deployed run's ServerApp")
        before = _tree(run)
        monkeypatch.setattr(server_app, "config_of", lambda run_id, run_config: config)
        monkeypatch.setattr(server_app, "build_strategy", lambda config: _OneRound())
        monkeypatch.setattr(server_app, "check_federation_size", lambda config, prepared, supernodes: [])
        context = Context(run_id=11, node_id=0, node_config={}, state=RecordDict(),
                          run_config={RUN_DIR: str(run), RESUME: True})
        grid = type("Grid", (), {"get_node_ids": lambda self: [1, 2]})()
        with pytest.raises(RunFolderError, match="in use by a live run"):
            server_app.main(grid, context)
        assert _tree(run) == before
    finally:
        holder.kill()
        holder.wait()


def test_another_account_cannot_open_a_live_runs_lock_to_hold_the_folder_after_it_ends(tmp_path):
    """Attack (wave 3), as another local account on the coordinator's machine (uid 65534, a real second process):
    `dermfed simulate` created its folder and `.run.lock` with the umask's modes (0755, 0644), so the other account
    opened the lock file while the run started, and flocked it the moment the run ended: every later `--resume`,
    `--force` or run there was refused as "in use by a live run (dermfed simulate, pid N)", for as long as the other
    account liked. The lock now makes the folder owner-only before it creates the lock file, 0600."""
    import subprocess
    import tempfile

    from simulations.lifecycle import RunLock

    if os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("a second Unix account needs root (CI runs as root) and a system python3")
    previous = os.umask(0o022)  # the usual umask
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        base.chmod(0o755)  # a researcher's world-readable folder of runs
        run = base / "runs" / "sim"
        lock = RunLock(run)  # what `dermfed simulate` takes before it starts anything
        code = ("import fcntl, os, sys\ntry:\n    fd = os.open(sys.argv[1], os.O_RDONLY)\n    print('opened')\n"
                "except OSError as exc:\n    print(type(exc).__name__)")
        attempt = subprocess.run(["/usr/bin/python3", "-c", code, str(run / ".run.lock")], user=65534, group=65534,
                                 capture_output=True, text=True, timeout=60)
        lock.release()
        assert attempt.stdout.strip() == "PermissionError", attempt.stdout + attempt.stderr
        assert (run.stat().st_mode & 0o077) == 0 and ((run / ".run.lock").stat().st_mode & 0o077) == 0
    finally:
        os.umask(previous)
        shutil.rmtree(base, ignore_errors=True)


def test_a_real_federations_serverapp_never_continues_a_simulations_run_however_it_was_submitted(tmp_path,
                                                                                               monkeypatch):
    """Attack (wave 3): `deploy run` refuses a --resume manifest for a simulation's folder (wave-2 finding 8), but the
    ServerApp's own check did not ask who continues the run: the operator's plain `flwr run` of that signed manifest
    continued a simulation's run with real hospitals. A ServerApp with a site registry now refuses it itself."""
    import server.server_app as server_app
    from flwr.app import Context, RecordDict

    from common.flower_keys import RESUME, RUN_DIR, SITE_REGISTRY
    from server.federation import ResumeError

    run = _simulation_run(tmp_path / "run", 1, "federation.num_rounds=3")
    config = load_config(run / "config.yaml")
    monkeypatch.setattr(server_app, "config_of", lambda run_id, run_config: config)
    context = Context(run_id=12, node_id=0, node_config={}, state=RecordDict(),
                      run_config={RUN_DIR: str(run), RESUME: True, SITE_REGISTRY: str(tmp_path / "registry.json")})
    before = {k: v for k, v in _tree(run).items() if k != ".run.lock"}
    with pytest.raises(ResumeError, match="simulation's run"):
        server_app.main(None, context)
    assert {k: v for k, v in _tree(run).items() if k != ".run.lock"} == before


def test_a_full_disk_while_a_site_streams_its_snapshot_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    """A site's snapshot is streamed by torch.save straight into its file; on a full disk torch's zip writer turns the
    stream's ENOSPC into a RuntimeError without a path. The site must still fail with an OSError naming the file,
    and keep no temporary file (the previous round's snapshot is what a restart continues)."""
    import common.run_files as run_files
    from common.serialization import write_site_snapshot
    from common.training import SiteState

    real_fdopen = run_files.os.fdopen

    class FullDisk:
        def __init__(self, stream):
            self.stream, self.written = stream, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        def write(self, data):
            if self.written + len(data) > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.stream.write(data)

        def __getattr__(self, name):
            return getattr(self.stream, name)

    monkeypatch.setattr(run_files.os, "fdopen", lambda *args, **kwargs: FullDisk(real_fdopen(*args, **kwargs)))
    target = tmp_path / "site" / "round-0002.pt"
    with pytest.raises(OSError) as failure:
        write_site_snapshot(target, 2, SiteState(step=7), {"decoder.w": torch.ones(100_000)})
    monkeypatch.undo()
    assert failure.value.errno == errno.ENOSPC and failure.value.filename == str(target)
    assert list(target.parent.iterdir()) == []
