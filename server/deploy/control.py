"""The operator's commands on the coordinator's server: register, revoke, list, and run a signed manifest.

Each reaches the SuperLink's Control API through `base.operator_flwr`, i.e. through the control
socket in the coordinator's 0700 folder: nobody but the account that owns the folder can.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any, Optional

from common import flower_keys as keys
from common.config import PROJECT_ROOT, run_config_argument
from common.deployment.files import replace_file
from common.deployment.layout import CONNECTION, FederationLayout
from common.deployment.pki import crl_serials, load_ca, make_crl
from common.run_manifest import MANIFEST_KEY, SIGNATURE_KEY, UntrustedApp, bundle_sha256, load_trusted_keys, verify_manifest
from server.deploy.base import DeployError, operator_flwr
from server.deploy.registry import RegisteredSite, SiteRegistry
from server.deploy.setup import save_settings


def _node_id(stdout: str) -> Optional[int]:
    """The node id from `flwr supernode register --format json` (a JSON object after any other output)."""
    start, end = stdout.find("{"), stdout.rfind("}")
    try:
        return int(json.loads(stdout[start:end + 1])["node-id"])
    except (ValueError, KeyError, TypeError):
        return None


def _registry(layout: FederationLayout) -> SiteRegistry:
    return SiteRegistry.load(layout.registry) if layout.registry.is_file() else SiteRegistry({})


def register_hospitals(root: Path, hospitals: Optional[list[str]] = None) -> SiteRegistry:
    """`flwr supernode register` for each added hospital's public node key; writes the site registry."""
    layout = FederationLayout(root)
    entries = {h["name"]: h for h in layout.settings()["hospitals"]}
    names = hospitals or [n for n, h in entries.items() if not h["revoked"]]
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise DeployError(f"{unknown} are not hospitals of {root} (add them with `dermfed deploy add-hospital`); "
                          f"known: {list(entries)}")
    revoked = [n for n in names if entries[n]["revoked"]]
    if revoked:
        raise DeployError(f"{revoked} were revoked and cannot be registered again")
    registry = _registry(layout)
    for name in names:
        public_key = layout.public_keys(name) / "auth_key.pub"
        line = entries[name]["auth_public_key"]
        fingerprint = hashlib.sha256((line + "\n").encode()).hexdigest()
        if any(s.name == name and s.public_key_sha256 == fingerprint for s in registry.sites.values()):
            continue  # registered before, under the node id the registry holds
        result = operator_flwr(layout, ["supernode", "register", str(public_key), CONNECTION, "--name", name,
                                        "--format", "json"])
        node_id = _node_id(result.stdout)
        if result.returncode != 0 or node_id is None:
            hint = (" Its key was registered with this SuperLink before, but coordinator/registry.json does not "
                    "record it: restore that file, or start over with a new SuperLink database."
                    if "already in use" in result.stdout + result.stderr else "")
            raise DeployError(f"registering {name} failed.{hint}\n{result.stdout}{result.stderr}")
        registry.sites = {k: v for k, v in registry.sites.items() if v.name != name}
        registry.sites[node_id] = RegisteredSite(name, entries[name]["index"], fingerprint, line)
        registry.save(layout.registry)  # after each, so a failure later leaves the earlier ones recorded
    registry.save(layout.registry)
    return registry


def reload_edge(layout: FederationLayout) -> bool:
    """SIGHUP to the running edge: nginx reads the configuration and the revocation list again."""
    try:
        pid = int(layout.edge_pid.read_text().strip())
        os.kill(pid, signal.SIGHUP)
        return True
    except (OSError, ValueError):
        return False


def revoke_hospital(root: Path, name: str, ca_key: Optional[Path] = None) -> dict[str, Any]:
    """Revoke a hospital: its certificate into the edge's revocation list (at once), its node out of the
    SuperLink and the registry. Each step is idempotent: run it again if one failed."""
    layout = FederationLayout(root)
    settings = layout.settings()
    entry = next((h for h in settings["hospitals"] if h["name"] == name), None)
    if entry is None:
        raise DeployError(f"{name} is not a hospital of {root}; known: {[h['name'] for h in settings['hospitals']]}")
    ca_key = Path(ca_key) if ca_key else layout.ca_key
    if not ca_key.is_file():
        raise DeployError(f"revoking signs a new revocation list with the CA key, which is not at {ca_key}: pass "
                          "--ca-key PATH to it")
    try:
        key, cert = load_ca(ca_key, layout.coordinator / "ca.crt")
    except ValueError as exc:
        raise DeployError(str(exc)) from None
    serials = crl_serials(layout.crl.read_bytes()) | {int(entry["certificate_serial"], 16)}
    replace_file(layout.crl, make_crl(key, cert, serials), mode=0o644)
    del key
    reloaded = reload_edge(layout)
    entry["revoked"] = True
    save_settings(layout, settings)
    registry = _registry(layout)
    node = registry.node_of(name)
    if node is not None:
        site = registry.sites[node]
        registry.sites[node] = RegisteredSite(site.name, site.index, site.public_key_sha256, site.public_key, True)
        registry.save(layout.registry)
    outcome = {"name": name, "serial": entry["certificate_serial"], "edge_reloaded": reloaded, "node": node,
               "unregistered": False}
    if node is not None and layout.control_socket.exists():
        result = operator_flwr(layout, ["supernode", "unregister", str(node), CONNECTION, "--format", "json"])
        outcome["unregistered"] = result.returncode == 0 and '"success": true' in result.stdout
        if not outcome["unregistered"] and "not found" not in (result.stdout + result.stderr).lower():
            raise DeployError(f"{name}'s certificate is revoked at the edge{'' if reloaded else ' (once it starts)'} "
                              f"and in the registry, but unregistering node {node} failed; run `dermfed deploy revoke` "
                              f"again:\n{result.stdout}{result.stderr}")
    return outcome


def list_federation(root: Path) -> str:
    """What the SuperLink knows: its nodes and runs (`flwr supernode list`, `flwr list`)."""
    layout = FederationLayout(root)
    parts = []
    for args in (["supernode", "list", CONNECTION, "--format", "json"], ["list", CONNECTION, "--format", "json"]):
        result = operator_flwr(layout, args)
        if result.returncode != 0:
            raise DeployError(f"`flwr {' '.join(args)}` failed:\n{result.stdout}{result.stderr}")
        parts.append(result.stdout.strip())
    return "\n".join(parts)


def read_manifest_file(path: Path) -> tuple[str, str]:
    try:
        raw = json.loads(Path(path).read_text())
        return str(raw["manifest"]), str(raw["signature"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DeployError(f"{path} is not a run manifest from `dermfed deploy sign` ({type(exc).__name__})") from None


def check_run_folder(run_config: dict[str, Any], dermfed_config: dict[str, Any]) -> None:
    """The signed run's folder on this server, checked before anything is submitted, as `dermfed simulate` checks its
    own (`common.run_folder`): a `--resume` continues a resumable run without changing a locked key (encoder, data,
    privacy accounting, ...); a new run never writes into a folder holding another run."""
    from common.config import ConfigError, build_config
    from common.run_folder import DEPLOYMENT, SIMULATE, RunFolderError, check_resume, live_run, refusal

    run_dir = Path(str(run_config.get("run-dir", "")))
    if not str(run_config.get("run-dir", "")):
        return  # the ServerApp picks output_dir/federated-<run id>: a new folder
    if holder := live_run(run_dir):
        raise DeployError(f"{run_dir} is in use by a live run ({holder}): wait for it to end, or stop it, before "
                          "submitting another run there")
    try:
        if run_config.get("resume"):
            check_resume(run_dir, build_config(dermfed_config), option="the manifest's --resume of", by=DEPLOYMENT)
        elif why := refusal(run_dir, SIMULATE, option="the manifest's --run-dir",
                            remedy="sign a manifest with another --run-dir (or with --resume)"):
            raise RunFolderError(why)
    except (RunFolderError, ConfigError) as exc:
        raise DeployError(str(exc)) from None


def submit_run(root: Path, manifest_path: Path, stream: bool = True) -> int:
    """Forward a signed run: check it here first (signature, this checkout's bundle, this registry), then submit."""
    from flwr.cli.build import build_fab_from_disk

    layout = FederationLayout(root)
    encoded, signature = read_manifest_file(manifest_path)
    try:
        manifest = verify_manifest(encoded, signature, load_trusted_keys(layout.coordinator / "app-signing.pub"))
    except UntrustedApp as exc:
        raise DeployError(f"{manifest_path}: {exc}") from None
    settings = layout.settings()
    if manifest.federation != settings["federation_id"]:
        raise DeployError(f"{manifest_path} is signed for federation {manifest.federation}, not this one "
                          f"({settings['federation_id']})")
    digest = bundle_sha256(build_fab_from_disk(PROJECT_ROOT))
    if digest != manifest.bundle_sha256:
        raise DeployError(f"this checkout ({PROJECT_ROOT}) builds the app bundle {digest}, but the manifest signs "
                          f"{manifest.bundle_sha256}: check out the release the operator signed")
    registry = str(manifest.run_config.get(keys.SITE_REGISTRY, ""))
    if Path(registry) != layout.registry.resolve():
        raise DeployError(f"the manifest names the site registry {registry!r}, not this federation's "
                          f"{layout.registry.resolve()}; sign it again with this federation's folder")
    if not layout.registry.is_file():
        raise DeployError(f"no site registry in {layout.coordinator}: run `dermfed deploy register --dir {root}` first")
    check_run_folder(manifest.run_config, manifest.dermfed_config)
    run_config = {**manifest.run_config, MANIFEST_KEY: encoded, SIGNATURE_KEY: signature}
    args = ["run", str(PROJECT_ROOT), CONNECTION, *(["--stream"] if stream else []),
            "--run-config", run_config_argument(run_config)]
    print(f"submitting run {manifest.run} (app bundle sha256 {digest[:16]}..., signed by the operator) to the "
          f"federation in {root}", flush=True)
    return operator_flwr(layout, args, capture=False, cwd=PROJECT_ROOT).returncode
