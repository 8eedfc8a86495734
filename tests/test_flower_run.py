"""Flower's own way: a Flower user's bare `flwr run . --stream` of this app, as from a fresh clone."""

import importlib.metadata
import json
import re
import shutil
import subprocess
import tempfile
import tomllib
import uuid
from pathlib import Path

import pytest

from common.config import PROJECT_ROOT, load_config

PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())


def _lower_bound(spec: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.search(r">=\s*([\d.]+)", spec).group(1).split("."))


def test_the_project_asks_for_the_python_flower_needs():
    """Flower's runtime installer (`uv sync`) refuses a project that allows a Python flwr[simulation] does not."""
    ours = _lower_bound(PYPROJECT["project"]["requires-python"])
    flowers = _lower_bound(importlib.metadata.metadata("flwr")["Requires-Python"])
    assert ours >= flowers, (ours, flowers)


def test_a_bare_flwr_run_simulates_as_many_hospitals_as_flowers_default_federation():
    """No app setting can size Flower's federation (flwr 1.42), so the preset a bare `flwr run` loads must make as
    many hospitals as Flower's local SuperLink simulates SuperNodes by default."""
    from flwr.supercore.constant import DEFAULT_SIMULATION_CONFIG

    assert "federations" not in PYPROJECT["tool"]["flwr"]  # flwr would rewrite pyproject.toml to migrate it
    config = load_config(PYPROJECT["tool"]["flwr"]["app"]["config"]["config-preset"])
    assert config.data.format == "synthetic" and config.data.partition == "natural"
    assert config.synth.num_sites == DEFAULT_SIMULATION_CONFIG.num_supernodes


@pytest.mark.slow
def test_flwr_run_stream_completes_on_the_embedded_synthetic_data(tmp_path):
    """Against a local SuperLink (Flower's default federation: no --federation-config), with only a tiny model and
    images asked for: the ServerApp draws the synthetic data once, in Flower's home, and both hospitals train. The
    SuperLink runs in the source folder, as a managed one started there does (Ray's workers then import that copy)."""
    from common.processes import RUN_MARKER, stop_marked
    from simulations.processes import CONNECTION, free_port, local_superlink, simulation_environment, write_connection

    flwr_home = tmp_path / "flwr-home"
    ray_tmp = Path(tempfile.mkdtemp(prefix="dermfed-ray-"))  # Ray's socket paths must stay under 108 bytes
    token = uuid.uuid4().hex
    env = {**simulation_environment(flwr_home, ray_tmp), RUN_MARKER: token}
    port = free_port()
    write_connection(flwr_home, port)
    tiny = ("model.encoder=convnext_atto model.vae.latent_dim=16 model.vae.decoder_width=8 data.image_size=32 "
            "data.min_image_side=16 synth.lesions_per_site=8 synth.image_size=64 train.max_steps=2 "
            "train.batch_size=8 federation.num_rounds=1 federation.monitor=none")
    try:
        with local_superlink(port, env, flwr_home / "superlink.log"):
            done = subprocess.run(["flwr", "run", ".", CONNECTION, "--stream", "--run-config",
                                   f'config-overrides="{tiny}"'], cwd=PROJECT_ROOT, env=env, capture_output=True,
                                  text=True, timeout=300)
    finally:
        stop_marked(token, [str(ray_tmp)])
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    finished = re.search(r"federated pretraining finished after round 1: checkpoint (\S+), history", output)
    assert finished, output[-3000:]
    run_dir = Path(finished.group(1)).parent
    history = json.loads((run_dir / "history.json").read_text())
    assert [entry["round"] for entry in history] == [1]
    assert sorted(site["site"] for site in history[0]["sites"]) == ["hospital_1", "hospital_2"]
    assert run_dir.parent == flwr_home / "dermfed" / "runs"  # a bare run's relative paths start there, not in cwd
    assert (flwr_home / "dermfed" / "data" / "flower" / "synthetic_metadata.csv").is_file()
