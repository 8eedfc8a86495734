"""The `dermfed` command line: help with defaults, data subcommands, config errors."""

import json
import subprocess
import sys

import pytest

from server.cli import build_parser, main

SUBCOMMANDS = ["data", "config", "pretrain", "simulate", "evaluate", "report", "deploy"]
GROUPS = (["data"], ["deploy"])  # commands whose help lists actions, not options


@pytest.mark.parametrize("argv", [[name] for name in SUBCOMMANDS] + [["data", "synth"], ["data", "summary"],
                                                                      ["deploy", "init"], ["deploy", "register"]])
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


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "server.cli", "config", "--config", "smoke", "--flat"],
                            capture_output=True, text=True, check=True)
    assert "data.format=\"synthetic\"" in result.stdout
