"""A real federation on loopback: one SuperLink and two SuperNodes over TLS with node
authentication, one pretraining round, and an unregistered SuperNode that is refused."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import shutil

from common.checkpoint import load_checkpoint
from common.config import PROJECT_ROOT, load_config
from common.data.synthetic import generate
from server.deploy import init_federation, register_hospitals

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on port {port}")


@pytest.fixture()
def processes():
    started: list[subprocess.Popen] = []

    def start(args, log: Path, env) -> subprocess.Popen:
        with open(log, "wb") as sink:
            process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in started:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _hospital_folders(root: Path) -> dict[str, Path]:
    generate(load_config("smoke"), root / "synthetic", progress=False)
    meta = pd.read_csv(root / "synthetic" / "synthetic_metadata.csv")
    folders = {}
    for site, hospital in [("hospital_1", "clinic_a"), ("hospital_2", "clinic_b"), ("hospital_3", "rogue")]:
        folder = root / "images" / hospital
        folder.mkdir(parents=True)
        for image_id in meta[meta["dataset"] == site]["image_id"]:
            shutil.copy(root / "synthetic" / "images" / f"{image_id}.jpg", folder)
        folders[hospital] = folder
    return folders


def test_tls_federation_with_node_authentication(tmp_path, processes):
    port = _free_port()
    layout = init_federation(tmp_path / "federation", ["clinic_a", "clinic_b", "rogue"], ["127.0.0.1"], port)
    certs = layout.certificates
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(layout.flwr_home),
           "FLWR_DISABLE_UPDATE_CHECK": "1", "TQDM_DISABLE": "1"}
    processes([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"),
               "--ssl-certfile", str(certs / "superlink.crt"), "--ssl-keyfile", str(certs / "superlink.key"),
               "--enable-supernode-auth", "--disable-runtime-dependency-installation", "--isolation", "subprocess",
               "--host", "127.0.0.1", "--port", str(port), "--database", str(tmp_path / "superlink.db")],
              tmp_path / "superlink.log", env)
    _wait_for_port(port)
    time.sleep(2)
    assert register_hospitals(layout.root, ["clinic_a", "clinic_b"]) == ["clinic_a", "clinic_b"]  # not rogue

    folders = _hospital_folders(tmp_path)
    nodes = {}
    for index, name in enumerate(["clinic_a", "clinic_b", "rogue"]):
        node_config = (f'data-root="{folders[name]}" site-name="{name}" site-index={index} '
                       f'state-dir="{tmp_path / "state"}"')
        nodes[name] = processes([str(BIN / "flower-supernode"), "--root-certificates", str(certs / "ca.crt"),
                                 "--superlink", f"127.0.0.1:{port}",
                                 "--auth-supernode-private-key", str(layout.hospital_dir(name) / "auth_key"),
                                 "--node-config", node_config, "--port", str(_free_port()),
                                 "--max-retries", "2", "--max-wait-time", "15"],
                                tmp_path / f"{name}.log", env)
    # the unregistered hospital is refused and its daemon stops
    assert nodes["rogue"].wait(timeout=90) != 0
    assert "Failed to activate SuperNode" in (tmp_path / "rogue.log").read_text()

    run_dir = tmp_path / "runs" / "r1"
    overrides = f"data.val_fraction=0.2 data.test_fraction=0 data.cache_dir={tmp_path / 'cache'} federation.num_rounds=1"
    run = subprocess.run([str(BIN / "flwr"), "run", str(PROJECT_ROOT), "dermfed", "--stream", "--run-config",
                          f'config-preset="smoke" config-overrides="{overrides}" run-dir="{run_dir}" '
                          f'site-names="clinic_a,clinic_b"'],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert load_checkpoint(run_dir)["position"]["round"] == 1
    history = json.loads((run_dir / "history.json").read_text())
    assert sorted(site["site"] for site in history[0]["sites"]) == ["clinic_a", "clinic_b"]
    assert all(nodes[name].poll() is None for name in ("clinic_a", "clinic_b"))  # daemons keep serving
    assert (tmp_path / "state" / "clinic_a" / "round-0001.pt").is_file()  # site state stays at the site
