"""A real federation on loopback, tried as each adversary would: the coordinator (SuperLink in a private
network behind the nginx edge), two hospitals (`dermfed node start`: forwarder, SuperNode and verifying
SuperExec in a private network), set up as the README says (hospital keygen, CSR signing, the CA key and
the operator's signing key moved off the server, approvals), then attacked: by an outsider who holds the
public CA certificate, by a second Unix account on the coordinator's machine, by a hospital that claims
another's name or forges another's reply, by a SuperNode without a client certificate or with an
unregistered key, by runs the hospitals did not approve (unsigned, changed, expired, replayed, an
unapproved bundle), by an oversized body, and by a revoked certificate.
"""

import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import common.deployment.pki as pki
from client.node import approve, bundle_hash, hospital_daemons, keygen
from common.checkpoint import load_checkpoint
from common.config import PROJECT_ROOT, load_config
from common.data.synthetic import generate
from common.deployment.layout import CONNECTION, FederationLayout, HospitalLayout
from common.processes import Daemon, stop_all
from server.deploy import add_hospital, coordinator_daemons, init_federation, register_hospitals, submit_run
from server.deploy.base import operator_flwr
from server.deploy.sign import build_manifest, write_manifest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("nginx") is None,
                                 reason="nginx not installed (apt-get install nginx-light; .ci/run does)")]
BIN = Path(sys.executable).parent
HOSPITALS = ["clinic_a", "clinic_b", "clinic_c"]
CEILING = 300.0  # seconds: generous ceilings on conditions, never fixed sleeps (a busy CI machine is slow)
# Both hospitals refuse a batch below 2; clinic_a also uses all its images for pretraining.
NODE_CONFIG = 'min-batch-size=2 dermfed-overrides="data.val_fraction=0.2 data.test_fraction=0"'


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(predicate, what: str, timeout: float = CEILING) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise TimeoutError(what)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(home),
            "FLWR_DISABLE_UPDATE_CHECK": "1", "TQDM_DISABLE": "1"}


def _hospital_images(root: Path) -> dict[str, Path]:
    generate(load_config("smoke"), root / "synthetic", progress=False)
    meta = pd.read_csv(root / "synthetic" / "synthetic_metadata.csv")
    folders = {}
    for site, hospital in zip(["hospital_1", "hospital_2", "hospital_3"], HOSPITALS):
        folder = root / "images" / hospital
        folder.mkdir(parents=True)
        for image_id in meta[meta["dataset"] == site]["image_id"]:
            shutil.copy(root / "synthetic" / "images" / f"{image_id}.jpg", folder)
        folders[hospital] = folder
    return folders


def _setup_as_documented(root: Path, public_port: int) -> dict:
    """README "Run at your hospitals", steps 1-3: keys made where they belong, the private ones moved."""
    layout = init_federation(root / "federation", ["localhost"], public_port)
    offline, workstation = root / "offline", root / "workstation"
    shutil.move(layout.offline, offline)  # the CA key to offline storage
    shutil.move(layout.operator, workstation)  # the signing key to the operator's workstation
    hospitals = {}
    for name in HOSPITALS:
        folder = root / "hospitals" / name
        request = keygen(folder, name)  # at the hospital: its keys never leave it
        add_hospital(layout.root, request, ca_key=offline / "ca.key")  # the coordinator signs the request
        for public in layout.hospital_dir(name).iterdir():  # the public files travel back
            shutil.copy(public, folder / public.name)
        hospitals[name] = HospitalLayout(folder)
    return {"layout": layout, "offline": offline, "workstation": workstation, "hospitals": hospitals}


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Coordinator up; clinic_a and clinic_b registered, approving this checkout's bundle and online;
    clinic_b claims to be clinic_a; clinic_c is added (has a certificate) but never registered."""
    root = tmp_path_factory.mktemp("deployment")
    public_port = _free_port()
    setup = _setup_as_documented(root, public_port)
    layout = setup["layout"]
    started: list[Daemon] = []
    try:
        for daemon in coordinator_daemons(layout):
            started.append(daemon.start(_env(layout.flwr_home)))
        _wait_for(lambda: "Uvicorn running" in _read(layout.runtime / "superlink.log")
                  and _read(layout.edge_pid).strip() != "", "the coordinator did not start")
        registry = register_hospitals(layout.root, ["clinic_a", "clinic_b"])
        folders = _hospital_images(root)
        digest = bundle_hash()
        # clinic_b edits its own settings to claim clinic_a's name and index
        claim = setup["hospitals"]["clinic_b"].settings_file
        claim.write_text(json.dumps({**json.loads(claim.read_text()), "site": "clinic_a", "index": 0}))
        nodes = {}
        for name in ("clinic_a", "clinic_b"):
            approve(setup["hospitals"][name].root, digest, "this checkout, reviewed by the test")
            node, env = hospital_daemons(setup["hospitals"][name].root, folders[name],
                                         state_dir=root / "state" / name, extra_node_config=NODE_CONFIG)
            nodes[name] = node
            for daemon in node:
                started.append(daemon.start(env))
        for name in ("clinic_a", "clinic_b"):
            log = setup["hospitals"][name].runtime / "supernode.log"
            _wait_for(lambda log=log: "SuperNode ID" in _read(log), f"{name} did not connect")
        yield {**setup, "root": root, "registry": registry, "public_port": public_port, "folders": folders,
               "nodes": nodes, "bundle": digest, "started": started}
    finally:
        stop_all(started)


def _history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "history.json").read_text())


OVERRIDES = ["federation.num_rounds=1", f"federation.round_timeout={int(CEILING)}", "federation.fraction_evaluate=0"]


def _sign(federation, run_dir: Path, overrides=(), **options) -> Path:
    """The operator, on its workstation: a signed manifest for this checkout's bundle."""
    manifest = build_manifest(federation["workstation"], "smoke",
                              [*OVERRIDES, f"data.cache_dir={federation['root'] / 'cache'}", *overrides],
                              str(run_dir), **options)
    return write_manifest(manifest, federation["workstation"], run_dir.parent / f"{run_dir.name}.manifest.json")


def _snapshots(federation) -> list[Path]:
    return sorted((federation["root"] / "state").rglob("round-*.pt"))


def test_a_full_round_completes_and_each_site_is_who_its_key_says(federation, tmp_path):
    layout, registry = federation["layout"], federation["registry"]
    run_dir = tmp_path / "run"
    code = submit_run(layout.root, _sign(federation, run_dir))
    assert code == 0
    payload = load_checkpoint(run_dir)
    assert payload["position"]["round"] == 1
    assert "unknown" in payload["extra"]["pretraining_images"]  # the hospitals' image names never reach the coordinator
    (entry,) = _history(run_dir)
    by_node = {site["node"]: site["site"] for site in entry["sites"]}
    assert by_node == {node: site.name for node, site in registry.sites.items()}
    assert sorted(by_node.values()) == ["clinic_a", "clinic_b"]  # clinic_b's claim to be clinic_a is ignored
    assert entry["excluded"] == []  # both replies carry signatures that verify against the registered keys
    assert all(d.running() for node in federation["nodes"].values() for d in node)  # daemons keep serving
    # run folders and histories are their owner's only
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    for name in ("history.json", "history.csv", "run-status.json", "checkpoint.pt"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o600, name
