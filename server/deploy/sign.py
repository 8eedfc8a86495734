"""`deploy sign`, on the operator's workstation: the signed run manifest that hospitals check.

The manifest covers the app bundle this checkout builds, the complete run config (every key of
the app's `[tool.flwr.app.config]`, after the operator's choices), the complete DermFed config
after overrides, the federation, a fresh run identifier and an expiry (`common.run_manifest`).
The SuperLink's server only forwards it (`deploy run --manifest`): the signing key never goes
there.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from common.config import PROJECT_ROOT, config_to_json, flower_run_config, load_config
from common.deployment.files import replace_file
from common.run_manifest import CARRIER_KEYS, RunManifest, bundle_sha256, load_signing_key, sign_manifest
from server.deploy.base import DeployError


def app_run_config_defaults(project: Path = PROJECT_ROOT) -> dict[str, Any]:
    """The app's run config keys and defaults (pyproject `[tool.flwr.app.config]`): what Flower starts from."""
    with open(project / "pyproject.toml", "rb") as stream:
        return dict(tomllib.load(stream)["tool"]["flwr"]["app"]["config"])


def build_manifest(operator: Path, preset: str, overrides: list[str], run_dir: str, resume: bool = False,
                   valid_hours: float = 24.0, stop_after_round: int = 0, bundle: bytes | None = None,
                   now: float | None = None) -> RunManifest:
    from flwr.cli.build import build_fab_from_disk

    settings_file = Path(operator) / "federation.json"
    if not settings_file.is_file():
        raise DeployError(f"{operator} is not the operator's folder of a federation (no federation.json)")
    settings = json.loads(settings_file.read_text())
    config = load_config(preset, overrides)
    if not Path(run_dir).is_absolute():
        raise DeployError(f"--run-dir must be an absolute path on the coordinator's server, got {run_dir!r}")
    registry = str(Path(settings["server_root"]) / "coordinator" / "registry.json")
    chosen = flower_run_config(preset=preset, overrides=overrides, run_dir=run_dir, resume=resume,
                               site_registry=registry, stop_after_round=stop_after_round)
    defaults = {k: v for k, v in app_run_config_defaults().items() if k not in CARRIER_KEYS}
    unknown = sorted(set(chosen) - set(defaults))
    if unknown:
        raise DeployError(f"the app's pyproject.toml lacks run config keys {unknown}")
    if valid_hours <= 0:
        raise DeployError(f"--valid-hours must be positive, got {valid_hours}")
    bundle = build_fab_from_disk(PROJECT_ROOT) if bundle is None else bundle
    now = time.time() if now is None else now
    return RunManifest(federation=settings["federation_id"], run=secrets.token_hex(16),
                       expires=int(now + valid_hours * 3600), bundle_sha256=bundle_sha256(bundle),
                       run_config={**defaults, **chosen}, dermfed_config=json.loads(config_to_json(config)))


def write_manifest(manifest: RunManifest, operator: Path, out: Path) -> Path:
    key_path = Path(operator) / "app-signing.key"
    if not key_path.is_file():
        raise DeployError(f"no app-signing key {key_path}: `deploy sign` runs on the operator's workstation, with "
                          "the operator/ folder made by `deploy init`")
    encoded, signature = sign_manifest(manifest, load_signing_key(key_path))
    summary = {"federation": manifest.federation, "run": manifest.run,
               "expires": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(manifest.expires)),
               "bundle_sha256": manifest.bundle_sha256, "run_config": manifest.run_config}
    body = {"summary (not signed: read it, the hospitals check the signed manifest)": summary,
            "manifest": encoded, "signature": signature}
    return replace_file(Path(out), json.dumps(body, indent=1).encode(), mode=0o644)
