"""A real federation on loopback, tried from the outside: the coordinator (SuperLink on 127.0.0.1
behind the nginx edge), two hospitals (`dermfed node`: forwarder, SuperNode, verifying
SuperExec), an outsider who holds the public CA certificate, a hospital that claims another's
name, a SuperNode without a client certificate, an unregistered key, and app bundles that the
coordinator did not sign.
"""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import common.deployment.pki as pki
from client.node import hospital_daemons
from common.app_signature import load_signing_key, sign_bundle
from common.checkpoint import load_checkpoint
from common.config import PROJECT_ROOT, load_config
from common.data.synthetic import generate
from common.deployment.layout import FederationLayout
from common.processes import Daemon, stop_all
from server.deploy import coordinator_daemons, init_federation, register_hospitals, run_federated

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("nginx") is None,
                                 reason="nginx not installed (apt-get install nginx-light; .ci/run does)")]
BIN = Path(sys.executable).parent
HOSPITALS = ["clinic_a", "clinic_b", "clinic_c"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise TimeoutError(what)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


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


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Coordinator up, clinic_a and clinic_b registered and online; clinic_b claims to be clinic_a."""
    root = tmp_path_factory.mktemp("deployment")
    ports = {"public": _free_port(), "superlink": _free_port()}
    layout = init_federation(root / "federation", HOSPITALS, ["localhost"], ports["public"], ports["superlink"])
    for name in HOSPITALS:  # on one machine, each hospital's local ports must differ
        path = layout.hospital_dir(name) / "hospital.json"
        settings = json.loads(path.read_text())
        settings.update(proxy_port=_free_port(), runtime_port=_free_port())
        path.write_text(json.dumps(settings))
    daemons = coordinator_daemons(layout)
    started: list[Daemon] = []
    try:
        for daemon in daemons:
            started.append(daemon.start(_env(layout.flwr_home)))
        _wait_for(lambda: _listening(ports["superlink"]) and _listening(ports["public"]), "coordinator did not start")
        registry = register_hospitals(layout.root, ["clinic_a", "clinic_b"])
        folders = _hospital_images(root)
        # clinic_b edits its own settings to claim clinic_a's name and index
        claim = layout.hospital_dir("clinic_b") / "hospital.json"
        claim.write_text(json.dumps({**json.loads(claim.read_text()), "site": "clinic_a", "index": 0}))
        nodes = {}
        for name in ("clinic_a", "clinic_b"):
            node, env = hospital_daemons(layout.hospital_dir(name), folders[name], state_dir=root / "state" / name,
                                         extra_node_config='dermfed-overrides="data.val_fraction=0.2 data.test_fraction=0"')
            nodes[name] = node
            for daemon in node:
                started.append(daemon.start(env))
        for name in ("clinic_a", "clinic_b"):
            log = layout.hospital_dir(name) / "runtime" / "supernode.log"
            _wait_for(lambda log=log: log.is_file() and "SuperNode ID" in log.read_text(), f"{name} did not connect")
        yield {"root": root, "layout": layout, "registry": registry, "ports": ports, "folders": folders, "nodes": nodes}
    finally:
        stop_all(started)


def _history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "history.json").read_text())


OVERRIDES = ["federation.num_rounds=1", "federation.round_timeout=120", "federation.fraction_evaluate=0"]


def test_a_full_round_completes_and_each_site_is_who_its_key_says(federation, tmp_path):
    layout, registry = federation["layout"], federation["registry"]
    run_dir = tmp_path / "run"
    code = run_federated(layout.root, "smoke", [*OVERRIDES, f"data.cache_dir={tmp_path / 'cache'}"], run_dir)
    assert code == 0
    payload = load_checkpoint(run_dir)
    assert payload["position"]["round"] == 1
    assert "unknown" in payload["extra"]["pretraining_images"]  # the hospitals' image names never reach the coordinator
    (entry,) = _history(run_dir)
    by_node = {site["node"]: site["site"] for site in entry["sites"]}
    assert by_node == {node: site.name for node, site in registry.sites.items()}
    assert sorted(by_node.values()) == ["clinic_a", "clinic_b"]  # clinic_b's claim to be clinic_a is ignored
    assert entry["excluded"] == []
    assert all(d.running() for node in federation["nodes"].values() for d in node)  # daemons keep serving


def _flwr_run(app_dir: Path, layout: FederationLayout, run_dir: Path, signature: str, tmp_path: Path):
    overrides = " ".join([*OVERRIDES, f"data.cache_dir={tmp_path / 'cache'}"])
    run_config = (f'config-preset="smoke" config-overrides="{overrides}" run-dir="{run_dir}" '
                  f'site-registry="{layout.registry}" app-signature="{signature}"')
    return subprocess.run([str(BIN / "flwr"), "run", str(app_dir), "dermfed", "--stream", "--run-config", run_config],
                          env=_env(layout.flwr_home), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("variant", ["unsigned", "modified"])
def test_an_app_bundle_the_coordinator_did_not_sign_is_refused_at_the_hospital(federation, tmp_path, variant):
    """Even submitted through the coordinator's own SuperLink, no hospital loads its code."""
    from flwr.cli.build import build_fab_from_disk

    layout = federation["layout"]
    signature = ""
    app_dir = PROJECT_ROOT
    if variant == "modified":  # the genuine signature, replayed on a bundle with one line added
        signature = sign_bundle(build_fab_from_disk(PROJECT_ROOT), load_signing_key(layout.coordinator / "app-signing.key"))
        app_dir = tmp_path / "app"
        shutil.copytree(PROJECT_ROOT, app_dir, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "data", ".cache"))
        with open(app_dir / "client" / "client_app.py", "a") as source:
            source.write("\nprint('this line ran at the hospital')\n")
    snapshots_before = sorted((federation["root"] / "state").rglob("round-*.pt"))
    run_dir = tmp_path / "run"
    result = _flwr_run(app_dir, layout, run_dir, signature, tmp_path)
    output = result.stdout + result.stderr
    assert "RoundFailed" in output and "UntrustedApp" in output, output[-3000:]
    assert not (run_dir / "checkpoint.pt").exists()
    assert sorted((federation["root"] / "state").rglob("round-*.pt")) == snapshots_before  # no site trained
    for name in ("clinic_a", "clinic_b"):
        log = (layout.hospital_dir(name) / "runtime" / "superexec.log").read_text()
        assert "UntrustedApp" in log and "this line ran at the hospital" not in log


def test_an_outsider_with_the_ca_certificate_cannot_register_a_node_or_submit_a_run(federation, tmp_path):
    layout, ports = federation["layout"], federation["ports"]
    home = tmp_path / "outsider"
    home.mkdir()
    shutil.copy(layout.coordinator / "ca.crt", home / "ca.crt")
    (home / "config.toml").write_text(f'[superlink]\ndefault = "edge"\n\n[superlink.edge]\n'
                                      f'address = "localhost:{ports["public"]}"\nroot-certificates = "{home / "ca.crt"}"\n')
    pki.make_node_key(home)
    env = _env(home)
    register = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(home / "auth_key.pub"), "edge",
                               "--format", "json"], env=env, capture_output=True, text=True, timeout=60)
    assert '"success": true' not in register.stdout
    run = subprocess.run([str(BIN / "flwr"), "run", str(PROJECT_ROOT), "edge"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0 and "Successfully started run" not in run.stdout
    # a hospital's client certificate opens the Fleet API only, never the Control API
    import ssl

    import httpx

    hospital = layout.hospital_dir("clinic_a")
    mutual = ssl.create_default_context(cafile=str(hospital / "ca.crt"))
    mutual.load_cert_chain(hospital / "client.crt", hospital / "client.key")
    with httpx.Client(verify=mutual) as client:
        assert client.post(f"https://localhost:{ports['public']}/v1/fleet/get-run").status_code not in (400, 403)
        assert client.post(f"https://localhost:{ports['public']}/v1/control/register-node").status_code == 403
        assert client.post(f"https://localhost:{ports['public']}/v1/control/start-run").status_code == 403
    with httpx.Client(verify=str(hospital / "ca.crt")) as client:  # no client certificate: no TLS session
        response = client.post(f"https://localhost:{ports['public']}/v1/fleet/get-run")
        assert response.status_code == 400
    # the SuperLink itself listens on loopback only
    assert _listen_addresses(ports["superlink"]) == {"127.0.0.1"}
    assert set(json.loads(layout.registry.read_text())["sites"]) == {str(n) for n in federation["registry"].sites}


def _listen_addresses(port: int) -> set[str]:
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).is_file():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                raw = bytes.fromhex(address)
                addresses.add(socket.inet_ntoa(raw[::-1]) if len(raw) == 4 else socket.inet_ntop(socket.AF_INET6, raw))
    return addresses


def _supernode(layout, key: Path, superlink: str, root_cert: Path, log: Path, env) -> subprocess.Popen:
    with open(log, "wb") as sink:
        return subprocess.Popen([str(BIN / "flower-supernode"), "--root-certificates", str(root_cert),
                                 "--superlink", superlink, "--auth-supernode-private-key", str(key),
                                 "--isolation", "process", "--port", str(_free_port()),
                                 "--max-retries", "2", "--max-wait-time", "15"],
                                stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def test_nodes_without_a_client_certificate_or_a_registered_key_are_refused(federation, tmp_path):
    layout, ports = federation["layout"], federation["ports"]
    env = _env(tmp_path / "home")
    # a registered hospital's key, but straight to the edge: no client certificate, no TLS session
    direct = _supernode(layout, layout.hospital_dir("clinic_c") / "auth_key", f"localhost:{ports['public']}",
                        layout.coordinator / "ca.crt", tmp_path / "direct.log", env)
    # a valid client certificate (clinic_c's forwarder), but a key the coordinator never registered
    forwarder, forwarder_env = hospital_daemons(layout.hospital_dir("clinic_c"), federation["folders"]["clinic_c"])
    proxy = forwarder[0].start(forwarder_env)
    try:
        settings = json.loads((layout.hospital_dir("clinic_c") / "hospital.json").read_text())
        _wait_for(lambda: _listening(settings["proxy_port"]), "clinic_c's forwarder did not start")
        pki.make_node_key(tmp_path / "rogue")
        rogue = _supernode(layout, tmp_path / "rogue" / "auth_key", f"127.0.0.1:{settings['proxy_port']}",
                           layout.hospital_dir("clinic_c") / "runtime" / "loopback.crt", tmp_path / "rogue.log", env)
        assert rogue.wait(timeout=120) != 0
        assert direct.wait(timeout=120) != 0
    finally:
        stop_all([proxy])
        for process in (direct,):
            if process.poll() is None:
                process.kill()
    assert "Failed to activate SuperNode" in (tmp_path / "rogue.log").read_text()
    assert "SuperNode ID" not in (tmp_path / "direct.log").read_text()


def test_private_keys_are_created_unreadable_to_others_and_each_folder_holds_only_its_own(tmp_path, monkeypatch):
    """Checked at the syscall that creates each key file, with a permissive umask."""
    created: dict[str, int] = {}
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kwargs):
        descriptor = real_open(path, flags, mode, *args, **kwargs)
        if flags & os.O_CREAT:
            created[str(path)] = stat.S_IMODE(os.fstat(descriptor).st_mode)
        return descriptor

    monkeypatch.setattr(os, "open", spy)
    previous = os.umask(0)
    try:
        layout = init_federation(tmp_path / "federation", ["clinic_a", "clinic_b"], ["fl.example.org"])
    finally:
        os.umask(previous)
    monkeypatch.setattr(os, "open", real_open)
    private = [p for p in layout.root.rglob("*") if p.is_file() and (p.suffix == ".key" or p.name == "auth_key")]
    assert len(private) == 1 + 3 + 2 * 2  # CA; SuperLink, edge, app signing; per hospital: node key, client key
    for path in private:
        assert created.get(str(path)) == 0o600, path  # 0600 from the first byte, not chmod-ed later
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.relative_to(layout.root) for p in layout.root.rglob("ca.key")] == [Path("ca-offline/ca.key")]
    for folder in (layout.offline, layout.coordinator, *(layout.hospital_dir(n) for n in ("clinic_a", "clinic_b"))):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    for name, other in (("clinic_a", "clinic_b"), ("clinic_b", "clinic_a")):
        folder = layout.hospital_dir(name)
        assert sorted(p.name for p in folder.iterdir()) == ["START.md", "auth_key", "auth_key.pub", "ca.crt",
                                                            "client.crt", "client.key", "hospital.json",
                                                            "trusted-app-keys.pub"]
        other_secrets = {(layout.hospital_dir(other) / n).read_bytes() for n in ("auth_key", "client.key")}
        assert not any(p.read_bytes() in other_secrets for p in folder.iterdir())
