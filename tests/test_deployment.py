"""A real federation on loopback, tried as each adversary would: the coordinator (SuperLink in a private
network behind the nginx edge), two hospitals (`dermfed node start`: forwarder, SuperNode and verifying
SuperExec in a private network), set up as the README says (hospital keygen, CSR signing, the CA key and
the operator's signing key moved off the server, approvals), then attacked: by an outsider who holds the
public CA certificate, by a second Unix account on the coordinator's machine, by a hospital that claims
another's name or forges another's reply, by a SuperNode without a client certificate or with an
unregistered key, by runs the hospitals did not approve (unsigned, changed, expired, replayed, an
unapproved bundle), by an oversized body, and by a revoked certificate.
"""

import contextlib
import hashlib
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
from common.deployment.layout import CONNECTION, HospitalLayout
from common.processes import Daemon, stop_all
from server.deploy import add_hospital, coordinator_daemons, init_federation, register_hospitals, submit_run
from server.deploy.base import operator_flwr
from server.deploy.sign import build_manifest, write_manifest
from tests.run_processes import process_tree

# One worker runs this whole module: one federation serves every test (pyproject: --dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_deployment"),
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
def federation():
    """Coordinator up; clinic_a and clinic_b registered, approving this checkout's bundle and online;
    clinic_b claims to be clinic_a; clinic_c is added (has a certificate) but never registered.

    Everything lives below a folder any account may traverse (as /srv or /etc would be), so that
    what keeps another account out is the federation's and the hospitals' own folders."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="dermfed-deployment-", dir="/tmp"))
    root.chmod(0o755)
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
        shutil.rmtree(root, ignore_errors=True)


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


def test_a_full_round_completes_and_each_site_is_who_its_key_says(federation):
    layout, registry = federation["layout"], federation["registry"]
    (federation["root"] / "runs").mkdir(mode=0o755)
    run_dir = federation["root"] / "runs" / "completed"
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
    federation["approved_manifest"] = run_dir.parent / f"{run_dir.name}.manifest.json"  # replayed below
    federation["completed_run"] = run_dir


def _modified_app(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    shutil.copytree(PROJECT_ROOT, app, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "data", ".cache",
                                                                     "__pycache__", ".pytest_cache"))
    with open(app / "client" / "client_app.py", "a") as source:
        source.write("\nprint('this line ran at the hospital')\n")
    return app


def _start_run(federation, app_dir: Path, run_config: dict) -> subprocess.CompletedProcess:
    """What the coordinator's account can do with its own Control API: submit anything, bypassing `deploy run`."""
    from common.config import run_config_argument

    pairs = run_config_argument(run_config)
    return operator_flwr(federation["layout"], ["run", str(app_dir), CONNECTION, "--run-config", pairs])


def _signed_run_config(manifest_file: Path) -> dict:
    from common.run_manifest import MANIFEST_KEY, SIGNATURE_KEY, RunManifest

    body = json.loads(manifest_file.read_text())
    return {**RunManifest.decode(body["manifest"]).run_config, MANIFEST_KEY: body["manifest"],
            SIGNATURE_KEY: body["signature"]}


def _run_status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "run-status.json").read_text())
    except (OSError, ValueError):
        return {}


def test_runs_the_hospitals_did_not_approve_are_refused_before_any_code_loads(federation, tmp_path):
    """The coordinator controls its Control API and every run config key; it cannot make a hospital run
    anything but a signed, unexpired, first-time run of a bundle the hospital approved, within its limits."""
    from flwr.cli.build import build_fab_from_disk

    app = _modified_app(tmp_path)
    modified_hash = hashlib.sha256(build_fab_from_disk(app)).hexdigest()
    genuine = _signed_run_config(_sign(federation, tmp_path / "genuine"))
    variants: dict[str, tuple[Path, dict, str]] = {}

    def run_dir(name: str) -> Path:
        return tmp_path / name

    # 1. no manifest at all (a plain `flwr run`)
    variants["unsigned"] = (PROJECT_ROOT, {**{k: v for k, v in genuine.items() if "manifest" not in k},
                                           "run-dir": str(run_dir("unsigned"))}, "carries no signed run manifest")
    # 2. the genuine signature, replayed with the coordinator's own config: per-image values, no registry
    changed = {**genuine, "config-overrides": genuine["config-overrides"] + " train.batch_size=1 train.max_steps=1",
               "site-registry": "", "run-dir": str(run_dir("changed"))}
    variants["changed config"] = (PROJECT_ROOT, changed, "differs from the signed one in ['config-overrides', "
                                                         "'run-dir', 'site-registry']")
    # 3. signed two days ago, valid for a day
    expired = _sign(federation, run_dir("expired"), now=time.time() - 2 * 86400, valid_hours=24)
    variants["expired"] = (PROJECT_ROOT, _signed_run_config(expired), "the run manifest expired")
    # 4. the manifest of the completed run, submitted again
    variants["reused run id"] = (PROJECT_ROOT, {**_signed_run_config(federation["approved_manifest"])},
                                 "was used before at this hospital")
    # 5. the genuine signature on a bundle with one line added
    variants["modified bundle"] = (app, {**genuine, "run-dir": str(run_dir("modified"))},
                                   f"the app bundle (sha256 {modified_hash}) is not the one the manifest signs")
    # 6. a bundle the operator signed but the hospitals never approved
    unapproved = build_manifest(federation["workstation"], "smoke", OVERRIDES, str(run_dir("unapproved")),
                                bundle=build_fab_from_disk(app))
    unapproved_file = write_manifest(unapproved, federation["workstation"], tmp_path / "unapproved.manifest.json")
    variants["unapproved bundle"] = (app, _signed_run_config(unapproved_file),
                                     f"the app bundle sha256 {modified_hash} is not approved by this hospital")
    replayed_dir = Path(variants["reused run id"][1]["run-dir"])  # the completed run's own folder
    # The coordinator controls its own disk: its ServerApp would refuse to start a new run over the finished one
    # (`common.run_folder`), so it moves that folder aside first. What stops the replay is then the hospitals' ledger.
    moved = replayed_dir.with_name(f"{replayed_dir.name}.moved-by-the-coordinator")
    replayed_dir.rename(moved)
    federation["completed_run"] = moved
    snapshots_before = _snapshots(federation)
    for name, (app_dir, run_config, _) in variants.items():  # all at once: the refusals overlap
        started = _start_run(federation, app_dir, run_config)
        assert "Successfully started run" in started.stdout, (name, started.stdout + started.stderr)
    for name, (_, run_config, expected) in variants.items():
        folder = Path(run_config["run-dir"])
        _wait_for(lambda folder=folder: _run_status(folder).get("state") in ("failed", "finished"),
                  f"{name}: the run did not end")
        status = _run_status(folder)
        assert status["state"] == "failed" and "RoundFailed" in status["reason"], (name, status)
        assert status["reason"].count("UntrustedApp") == 2, (name, status)  # both hospitals refused
        assert expected in status["reason"], (name, expected, status["reason"])
        assert not (folder / "checkpoint.pt").exists(), name
    assert _snapshots(federation) == snapshots_before  # no site trained
    for hospital in ("clinic_a", "clinic_b"):
        log = _read(federation["hospitals"][hospital].runtime / "superexec.log")
        assert "this line ran at the hospital" not in log


def _listening_ports(pids) -> set[int]:
    """TCP ports in LISTEN state in this (the host's) network namespace whose sockets these processes hold."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(fd.path)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        except OSError:
            continue
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in _read(Path(table)).splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _federation_state(layout) -> tuple[dict, set]:
    """Node ids (with their status) and run ids, as the operator sees them (`deploy ls`)."""
    from server.deploy import list_federation

    text = list_federation(layout.root)
    nodes, runs = {}, set()
    for part in text.split("\n{"):
        data = json.loads(part if part.startswith("{") else "{" + part)
        nodes.update({str(n["node-id"]): n.get("status") for n in data.get("nodes", [])})
        runs |= {str(r.get("run-id")) for r in data.get("runs", [])}
    return nodes, runs


def test_another_account_on_the_coordinators_machine_cannot_command_the_federation(federation, tmp_path):
    """A second Unix account with the public CA certificate and Flower's own CLI tries `flwr ls`, `flwr supernode
    list/register` and `flwr run` on every address the SuperLink could be at, the Control API on every TCP port of
    this deployment, its sockets and files: everything is refused, and the federation is unchanged."""
    import pwd
    import tempfile

    from common.deployment.layout import SUPERLINK_PORT, SUPERNODE_FORWARD_PORT, SUPERNODE_RUNTIME_PORT

    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("creating a second Unix account needs root and useradd (CI runs as root)")
    layout = federation["layout"]
    name = f"dfattack{os.getpid() % 100000}"
    created = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                             capture_output=True, text=True)
    if created.returncode != 0:
        pytest.skip(f"cannot create a second Unix account: {created.stderr.strip()}")
    home = Path(tempfile.mkdtemp(prefix="dermfed-attacker-", dir="/tmp"))
    try:
        account = pwd.getpwnam(name)
        shutil.copy(layout.coordinator / "ca.crt", home / "ca.crt")  # public: every hospital has it
        pki.make_node_key(home / "key")
        shutil.copytree(PROJECT_ROOT, home / "app", ignore=shutil.ignore_patterns(
            ".venv", ".git", "runs", "data", ".cache", "__pycache__", ".pytest_cache"))
        for path in [home, *home.rglob("*")]:
            os.lchown(path, account.pw_uid, account.pw_gid)
        ours = process_tree([d.process.pid for d in federation["started"] if d.process is not None])
        ports = _listening_ports(ours)
        assert ports == {federation["public_port"]}  # the edge; no port of the SuperLink or of a SuperNode
        hospitals = federation["hospitals"]
        spec = {
            "uid": account.pw_uid, "gid": account.pw_gid, "home": str(home), "ca": str(home / "ca.crt"),
            "public_key": str(home / "key" / "auth_key.pub"), "app": str(home / "app"),
            "addresses": [f"127.0.0.1:{p}" for p in (SUPERLINK_PORT, SUPERNODE_RUNTIME_PORT, SUPERNODE_FORWARD_PORT)
                          if not _listening(p)] + [f"localhost:{federation['public_port']}"],
            "sockets": [str(layout.control_socket), str(layout.fleet_socket),
                        *(str(hospitals[h].forward_socket) for h in ("clinic_a", "clinic_b"))],
            "files": [str(layout.registry), str(layout.coordinator / "superlink-state.db"),
                      str(layout.coordinator / "edge.key"),
                      *([str(federation["completed_run"] / "history.json")] if "completed_run" in federation else []),
                      *(str(hospitals[h].root / k) for h in ("clinic_a", "clinic_b") for k in ("auth_key", "client.key"))],
            "ports": sorted(ports),
        }
        nodes_before, runs_before = _federation_state(layout)
        attempt = subprocess.run([sys.executable, "-m", "tests.attacker", json.dumps(spec)], cwd=PROJECT_ROOT,
                                 capture_output=True, text=True, timeout=CEILING, env=_env(home / "flwr-home"))
        assert attempt.returncode == 0, attempt.stderr[-3000:]
        results = json.loads(attempt.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
    assert results["uid"] == account.pw_uid != 0
    for address, attempts in results["flwr"].items():
        for what, outcome in attempts.items():
            output = outcome["output"]
            assert outcome["code"] != 0, (address, what, output)
            assert "Successfully" not in output and '"success": true' not in output, (address, what, output)
            assert not any(s in output for s in ("ModuleNotFoundError", "ImportError")), (address, what, output)
            if what != "run":  # `run` builds the app first; all of them then fail to reach a Control API
                assert any(s in output for s in ("unavailable", "SSL", "certificate", "400", "Connect")), output
    assert set(results["sockets"].values()) == {"EACCES"}, results["sockets"]
    assert set(results["files"].values()) == {"EACCES"}, results["files"]
    for port, answers in results["ports"].items():  # the edge: neither plain HTTP nor TLS without a certificate
        assert answers["plain"].startswith("HTTP/1.1 400") and answers["tls"].startswith("HTTP/1.1 400"), answers
    nodes_after, runs_after = _federation_state(layout)
    assert set(nodes_after) == set(nodes_before) and runs_after == runs_before  # no node registered, no run started


def test_an_outsider_with_the_ca_certificate_cannot_register_a_node_or_submit_a_run(federation, tmp_path):
    import httpx

    layout, port = federation["layout"], federation["public_port"]
    home = tmp_path / "outsider"
    home.mkdir()
    shutil.copy(layout.coordinator / "ca.crt", home / "ca.crt")
    (home / "config.toml").write_text(f'[superlink]\ndefault = "edge"\n\n[superlink.edge]\n'
                                      f'address = "localhost:{port}"\nroot-certificates = "{home / "ca.crt"}"\n')
    pki.make_node_key(home)
    env = _env(home)
    register = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(home / "auth_key.pub"), "edge",
                               "--format", "json"], env=env, capture_output=True, text=True, timeout=CEILING)
    assert '"success": true' not in register.stdout
    run = subprocess.run([str(BIN / "flwr"), "run", str(PROJECT_ROOT), "edge"], env=env, capture_output=True,
                         text=True, timeout=CEILING)
    assert run.returncode != 0 and "Successfully started run" not in run.stdout
    # a hospital's client certificate opens the Fleet API only, never the Control API
    with httpx.Client(verify=_mutual_tls(federation, "clinic_a")) as client:
        assert client.post(f"https://localhost:{port}/v1/fleet/get-run").status_code not in (400, 403)
        assert client.post(f"https://localhost:{port}/v1/control/register-node").status_code == 403
        assert client.post(f"https://localhost:{port}/v1/control/start-run").status_code == 403
    no_certificate = ssl.create_default_context(cafile=str(layout.coordinator / "ca.crt"))
    with httpx.Client(verify=no_certificate) as client:  # no client certificate: no session
        assert client.post(f"https://localhost:{port}/v1/fleet/get-run").status_code == 400


def _mutual_tls(federation, name: str) -> ssl.SSLContext:
    hospital = federation["hospitals"][name].root
    context = ssl.create_default_context(cafile=str(hospital / "ca.crt"))
    context.load_cert_chain(hospital / "client.crt", hospital / "client.key")
    return context


def test_nodes_without_a_client_certificate_or_a_registered_key_are_refused(federation, tmp_path):
    layout, port = federation["layout"], federation["public_port"]
    clinic_c = federation["hospitals"]["clinic_c"]
    # a hospital's own key, but straight to the edge: no client certificate, no TLS session
    with open(tmp_path / "direct.log", "wb") as sink:
        direct = subprocess.Popen([str(BIN / "flower-supernode"), "--root-certificates", str(layout.coordinator / "ca.crt"),
                                   "--superlink", f"localhost:{port}", "--auth-supernode-private-key",
                                   str(clinic_c.node_key), "--isolation", "process", "--port", str(_free_port()),
                                   "--max-retries", "2", "--max-wait-time", "15"],
                                  stdout=sink, stderr=subprocess.STDOUT, env=_env(tmp_path / "home"),
                                  start_new_session=True)
    # clinic_c: a valid client certificate, but a node key the coordinator never registered
    approve(clinic_c.root, federation["bundle"])
    daemons, env = hospital_daemons(clinic_c.root, federation["folders"]["clinic_c"], state_dir=tmp_path / "state")
    started = [d.start(env) for d in daemons]
    try:
        _wait_for(lambda: "Failed to activate SuperNode" in _read(clinic_c.runtime / "supernode.log"),
                  "clinic_c's unregistered key was not refused")
        assert direct.wait(timeout=CEILING) != 0
    finally:
        stop_all(started)
        if direct.poll() is None:
            direct.kill()
    assert "SuperNode ID" not in _read(tmp_path / "direct.log")


def _raw_status(federation, name: str, method: str, target: str) -> str:
    """The status line the edge answers to a request line sent byte for byte (no client normalises it)."""
    context = _mutual_tls(federation, name)
    with context.wrap_socket(socket.create_connection(("localhost", federation["public_port"]), timeout=CEILING),
                             server_hostname="localhost") as stream:
        stream.sendall(f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n"
                       "Connection: close\r\n\r\n".encode())
        answer = b""
        while b"\r\n" not in answer and (chunk := stream.recv(4096)):
            answer += chunk
    return answer.split(b"\r\n")[0].decode()


def test_the_edge_forwards_only_fleet_endpoints_as_they_were_sent(federation):
    """nginx matches `location` on the decoded, normalised path but forwards the raw one: a hospital's
    certificate tries encoded and dot segments that normalise into /v1/fleet/ (reviewer: the first reached
    the SuperLink)."""
    tricks = ["/v1/control/%2e%2e/fleet/get-run", "/v1/control/%2E%2E/fleet/get-run", "/v1/control/..%2ffleet/get-run",
              "/v1/control/x/../../fleet/get-run", "/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs",
              "/v1/fleet//../control/list-runs", "/v1/fleet%2f..%2fcontrol/list-runs", "/v1/fleet/get%2drun",
              "/v1/Fleet/get-run", "/v1/fleet/get-run/", "/v1/fleet/get-run/../../control/list-runs",
              "http://localhost/v1/control/list-runs", "/v1/control/list-runs"]
    for target in tricks:
        for method in ("POST", "GET"):
            status = _raw_status(federation, "clinic_a", method, target)
            assert " 403 " in status + " ", f"{method} {target}: {status}"
    assert " 403 " not in _raw_status(federation, "clinic_a", "POST", "/v1/fleet/get-run") + " "
    assert " 403 " not in _raw_status(federation, "clinic_a", "POST", "/v1/fleet/get-run?x=1") + " "


def test_the_edge_bounds_bodies_and_connections_before_anything_reaches_the_superlink(federation):
    """9 MiB (over the 8 MiB cap) from a hospital's certificate: 413 at the edge, never in the SuperLink's log,
    with a length announced or streamed; one certificate cannot hold more than its share of connections."""
    import secrets

    import httpx

    layout, port = federation["layout"], federation["public_port"]
    log = layout.runtime / "superlink.log"
    marks = {kind: secrets.token_hex(8) for kind in ("small", "big", "streamed")}
    url = f"https://localhost:{port}/v1/fleet/push-object?probe="
    big = b"\0" * (9 << 20)
    with httpx.Client(verify=_mutual_tls(federation, "clinic_a"), timeout=CEILING) as client:
        assert client.post(url + marks["big"], content=big).status_code == 413
        assert client.post(url + marks["streamed"], content=iter([big[: 1 << 20]] * 9)).status_code == 413
        assert client.post(url + marks["small"], content=b"\0" * 1024).status_code not in (403, 413)
    _wait_for(lambda: marks["small"] in _read(log), "the small request did not reach the SuperLink")
    assert marks["big"] not in _read(log) and marks["streamed"] not in _read(log)
    # connections: requests whose body never comes hold their connection; the edge refuses those beyond 16
    context = _mutual_tls(federation, "clinic_a")
    held = []
    try:
        for _ in range(16):
            stream = context.wrap_socket(socket.create_connection(("localhost", port)), server_hostname="localhost")
            stream.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n")
            held.append(stream)
        with httpx.Client(verify=_mutual_tls(federation, "clinic_a")) as client:
            _wait_for(lambda: client.post(f"https://localhost:{port}/v1/fleet/get-run").status_code == 429,
                      "a 17th concurrent request from one certificate was served")
        with httpx.Client(verify=_mutual_tls(federation, "clinic_b")) as client:  # another hospital is not starved
            assert client.post(f"https://localhost:{port}/v1/fleet/get-run").status_code != 429
    finally:
        for stream in held:
            stream.close()


def test_no_hospital_private_key_is_on_the_coordinators_machine_after_the_documented_setup(federation):
    layout = federation["layout"]
    secrets_of_hospitals = {(h.root / name).read_bytes() for h in federation["hospitals"].values()
                            for name in ("auth_key", "client.key")}
    on_server = [p for p in layout.root.rglob("*") if p.is_file()]
    assert not [p for p in on_server if p.name in ("auth_key", "client.key", "ca.key", "app-signing.key")]
    assert not [p for p in on_server if p.stat().st_size < 1 << 20 and any(s in p.read_bytes() for s in secrets_of_hospitals)]
    private = sorted(str(p.relative_to(layout.root)) for p in on_server if b"PRIVATE KEY" in p.read_bytes()[:100])
    assert private == ["coordinator/edge.key", "coordinator/superlink.key"]  # the coordinator's own TLS keys
    for hospital in federation["hospitals"].values():  # what travelled back is public
        assert not any(b"PRIVATE KEY" in p.read_bytes() for p in layout.hospital_dir(hospital.root.name).iterdir())


def test_private_keys_are_created_unreadable_to_others_where_their_owner_runs(tmp_path, monkeypatch):
    """Checked at the syscall that creates each key file, with a permissive umask: the coordinator's
    `deploy init` and `add-hospital`, and a hospital's `node keygen`."""
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
        layout = init_federation(tmp_path / "federation", ["fl.example.org"])
        requests = [keygen(tmp_path / "hospitals" / name, name) for name in ("clinic_a", "clinic_b")]
        for request in requests:
            add_hospital(layout.root, request)
    finally:
        os.umask(previous)
    monkeypatch.setattr(os, "open", real_open)
    private = [p for p in tmp_path.rglob("*") if p.is_file() and (p.suffix == ".key" or p.name == "auth_key")]
    assert len(private) == 1 + 3 + 2 * 2  # CA; SuperLink, edge, app signing; per hospital: node key, client key
    for path in private:
        assert created.get(str(path)) == 0o600, path  # 0600 from the first byte, not chmod-ed later
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    on_coordinator = [p.relative_to(layout.root) for p in layout.root.rglob("*") if p in private]
    assert sorted(map(str, on_coordinator)) == ["ca-offline/ca.key", "coordinator/edge.key",
                                                "coordinator/superlink.key", "operator/app-signing.key"]
    for folder in (layout.root, layout.offline, layout.operator, layout.coordinator,
                   tmp_path / "hospitals" / "clinic_a"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert sorted(p.name for p in layout.hospital_dir("clinic_a").iterdir()) == [
        "START.md", "ca.crt", "client.crt", "hospital.json", "trusted-app-keys.pub"]


def test_serve_refuses_while_keys_that_belong_elsewhere_are_on_the_server_or_namespaces_are_missing(tmp_path,
                                                                                                  monkeypatch):
    from common.deployment import sandbox
    from server.deploy import DeployError, serve

    layout = init_federation(tmp_path / "federation", ["localhost"])
    with pytest.raises(DeployError, match="must not stay on the coordinator's server"):
        serve(layout.root)
    shutil.move(layout.offline, tmp_path / "offline")
    shutil.move(layout.operator, tmp_path / "workstation")
    monkeypatch.setattr(sandbox, "probe", lambda: "unshare(CLONE_NEWUSER|CLONE_NEWNET) failed: EPERM (...)")
    with pytest.raises(DeployError, match="cannot keep the SuperLink's ports private on this machine: unshare"):
        serve(layout.root)
    layout.root.chmod(0o755)
    with pytest.raises(DeployError, match="can be opened by other accounts"):
        serve(layout.root)


def test_a_revoked_hospital_is_refused_by_the_edge_at_once_and_its_node_unregistered(federation):
    """Last: it revokes clinic_b, which is registered and online."""
    import httpx

    from server.deploy import revoke_hospital
    from server.deploy.registry import SiteRegistry

    layout, port = federation["layout"], federation["public_port"]
    url = f"https://localhost:{port}/v1/fleet/get-run"
    with httpx.Client(verify=_mutual_tls(federation, "clinic_b")) as client:
        assert client.post(url).status_code not in (400, 403)
    node = SiteRegistry.load(layout.registry).node_of("clinic_b")
    nodes_before, _ = _federation_state(layout)
    assert str(node) in nodes_before
    outcome = revoke_hospital(layout.root, "clinic_b", ca_key=federation["offline"] / "ca.key")
    assert outcome["edge_reloaded"] and outcome["unregistered"] and outcome["node"] == node

    def refused() -> bool:
        with httpx.Client(verify=_mutual_tls(federation, "clinic_b")) as client:
            response = client.post(url)
        return response.status_code == 400 and "certificate" in response.text

    _wait_for(refused, "the edge still accepts a revoked certificate", timeout=30)  # nginx reloads in well under 1 s
    with httpx.Client(verify=_mutual_tls(federation, "clinic_a")) as client:  # the others are not affected
        assert client.post(url).status_code not in (400, 403)
    assert SiteRegistry.load(layout.registry).sites[node].revoked
    assert SiteRegistry.load(layout.registry).site(node) is None  # sent nothing, its replies left out
    nodes_after, _ = _federation_state(layout)
    assert nodes_after[str(node)] == "unregistered"
