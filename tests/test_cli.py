"""The `dermfed` command line: help with defaults, data subcommands, config errors."""

import json
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

import pytest

from server.cli import build_parser, main

SUBCOMMANDS = ["data", "config", "pretrain", "simulate", "evaluate", "report", "deploy", "node", "study"]
GROUPS = (["data"], ["deploy"], ["node"])  # commands whose help lists actions, not options


@pytest.mark.parametrize("argv", [[name] for name in SUBCOMMANDS] + [["data", "synth"], ["data", "summary"],
                                                                      ["deploy", "init"], ["deploy", "register"],
                                                                      ["deploy", "add-hospital"], ["deploy", "sign"],
                                                                      ["deploy", "run"], ["deploy", "revoke"],
                                                                      ["node", "keygen"], ["node", "start"],
                                                                      ["node", "approve"], ["node", "bundle-hash"]])
def test_every_subcommand_has_help_with_defaults(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*argv, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: dermfed" in text
    if argv not in GROUPS:
        assert "(default:" in text


def test_data_synth_then_summary_end_to_end(tmp_path, capsys):
    out = tmp_path / "synthetic"
    assert main(["data", "synth", "--config", "smoke", "--out", str(out)]) == 0
    assert (out / "synthetic_metadata.csv").is_file() and (out / "dermfed_synth_config.yaml").is_file()
    run = tmp_path / "summary"
    code = main(["data", "summary", "--config", "smoke", f"data.root={out}",
                 f"data.cache_dir={tmp_path / 'cache'}", "--out", str(run)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "hospital_1" in printed and "per site and class" in printed
    summary = json.loads((run / "summary.json").read_text())
    assert summary["usable"] > 0 and sorted(summary["sites"]) == ["hospital_1", "hospital_2", "hospital_3"]
    assert (run / "config.yaml").is_file() and (run / "summary.csv").is_file()


def test_summary_of_the_real_sample_reports_705_images_in_4_sites(ham_sample, tmp_path, capsys):
    code = main(["data", "summary", "--config", "demo", "data.format=ham10000", f"data.root={ham_sample}",
                 f"data.cache_dir={tmp_path / 'cache'}", "data.image_size=32", "--out", str(tmp_path / "run")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "usable images: 705 in 4 sites" in printed
    assert "image file missing" in printed


def test_config_errors_exit_2_with_a_message(capsys):
    assert main(["data", "summary", "--config", "smoke", "data.imagesize=64"]) == 2
    assert "unknown config key 'data.imagesize'" in capsys.readouterr().err
    assert main(["config", "--config", "smoke", "data.partition=random"]) == 2
    assert "natural" in capsys.readouterr().err


def test_missing_data_root_is_a_clear_error(tmp_path, capsys):
    assert main(["data", "summary", "--config", "smoke", "data.format=ham10000", f"data.root={tmp_path / 'absent'}"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_the_installed_dermfed_console_script_runs_this_cli():
    """The `dermfed` users type: the script beside this Python, made from the installed console-script metadata,
    whose target must be the one pyproject.toml declares and must be this CLI's `main` (a renamed or broken target,
    or a stale install, fails here; `python -m server.cli` would not notice)."""
    from importlib.metadata import entry_points

    from common.config import PROJECT_ROOT

    script = Path(sys.executable).with_name("dermfed")
    assert script.is_file(), f"no installed `dermfed` beside {sys.executable}: install the project (make install)"
    with open(PROJECT_ROOT / "pyproject.toml", "rb") as stream:
        declared = tomllib.load(stream)["project"]["scripts"]["dermfed"]
    installed = [entry for entry in entry_points(group="console_scripts") if entry.name == "dermfed"]
    assert [entry.value for entry in installed] == [declared], "the installed metadata is not pyproject's: reinstall"
    assert installed[0].load() is main
    result = subprocess.run([str(script), "config", "--config", "smoke", "--flat"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "data.format=\"synthetic\"" in result.stdout
    refused = subprocess.run([str(script), "config", "--config", "smoke", "data.imagesize=64"], capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2 and "unknown config key 'data.imagesize'" in refused.stderr


def test_federation_commands_refuse_bad_inputs_with_one_line_and_exit_2(tmp_path, capsys):
    """Files a coordinator or a hospital can get wrong: each a line that names it, never an unexpected error."""
    federation, hospital = tmp_path / "federation", tmp_path / "hospital"
    assert main(["deploy", "init", "--out", str(federation), "--host", "localhost"]) == 0
    assert main(["node", "keygen", "--dir", str(hospital), "--name", "clinic_a"]) == 0
    (tmp_path / "garbage.json").write_text("{not json")
    cases = {
        "a request that is not one": ["deploy", "add-hospital", "--dir", str(federation), "--request",
                                      str(tmp_path / "garbage.json")],
        "no CA key where it is said to be": ["deploy", "add-hospital", "--dir", str(federation), "--request",
                                             str(hospital / "request.json"), "--ca-key", str(tmp_path / "nowhere")],
        "a manifest that is not one": ["deploy", "run", "--dir", str(federation), "--manifest",
                                       str(tmp_path / "garbage.json")],
        "no operator folder": ["deploy", "sign", "--operator", str(tmp_path / "nowhere"), "--run-dir", "/srv/r",
                               "--out", str(tmp_path / "m.json")],
        "a relative run folder": ["deploy", "sign", "--operator", str(federation / "operator"), "--run-dir", "runs/r",
                                  "--out", str(tmp_path / "m.json")],
        "an unknown hospital": ["deploy", "revoke", "clinic_z", "--dir", str(federation)],
        "not a hash": ["node", "approve", "--dir", str(hospital), "1234"],
        "keys made twice": ["node", "keygen", "--dir", str(hospital), "--name", "clinic_a"],
        "a bad name": ["node", "keygen", "--dir", str(tmp_path / "other"), "--name", "../x"],
        "not a source tree": ["node", "bundle-hash", "--source", str(tmp_path)],
        "no SuperLink running": ["deploy", "ls", "--dir", str(federation)],
        "a folder without its public files": ["node", "start", "--dir", str(hospital), "--data-root", str(tmp_path)],
    }
    for case, argv in cases.items():
        capsys.readouterr()
        assert main(argv) == 2, case
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("dermfed: error: "), (case, error)
    assert main(["deploy", "add-hospital", "--dir", str(federation), "--request", str(hospital / "request.json")]) == 0
    capsys.readouterr()
    assert main(["deploy", "add-hospital", "--dir", str(federation), "--request", str(hospital / "request.json")]) == 2
    assert "a hospital of this federation already" in capsys.readouterr().err
