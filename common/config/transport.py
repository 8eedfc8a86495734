"""How a DermFed configuration travels: YAML beside a run's outputs, JSON, and Flower's run config.

The resolved configuration is written next to every run's outputs (`write_config`), so that the
run can be reproduced. A run's config reaches the ServerApp and the sites once per run, in
Flower's run config (`flower_run_config`, the one builder for simulation and deployment), never
in a round's message; each process parses it once per run (`ConfigPerRun`).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shlex
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from common import flower_keys as keys
from common.config.loading import ConfigError, build_config, load_config
from common.config.schema import DermFedConfig
from common.run_files import atomic_write_text


def toml_string(value: str) -> str:
    """A TOML basic string: how values travel in Flower's `--run-config` and node config."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_to_json(config: DermFedConfig) -> str:
    """One line: how a config is signed in a run manifest and carried in a simulation's run config."""
    return config.model_dump_json()


def config_from_json(text: str) -> DermFedConfig:
    return build_config(json.loads(text))


def encode_run_config_value(config: DermFedConfig) -> str:
    """The run config's `dermfed-config`: base64url of the JSON, because Flower's `--run-config` parser takes a
    quoted value up to its next double quote, escaped or not, and JSON is full of them."""
    return base64.urlsafe_b64encode(config_to_json(config).encode()).decode("ascii")


def decode_run_config_value(text: str) -> DermFedConfig:
    try:
        raw = json.loads(base64.urlsafe_b64decode(text.encode("ascii")))
    except (ValueError, UnicodeError, binascii.Error) as exc:
        raise ConfigError(f"the run config's {keys.DERMFED_CONFIG} is not a DermFed config ({type(exc).__name__})") \
            from None
    return build_config(raw)


def config_to_yaml(config: DermFedConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def write_config(config: DermFedConfig, folder: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config beside a run's outputs, so the run can be reproduced."""
    return atomic_write_text(Path(folder) / name, config_to_yaml(config))


def flower_run_config(*, preset: str, run_dir: str, overrides: Sequence[str] = (), resume: bool = False,
                      config: Optional[DermFedConfig] = None, site_names: Sequence[str] = (),
                      stop_after_round: int = 0, fault_injection: str = "", site_registry: str = "") -> dict[str, Any]:
    """Flower's run config of a DermFed run, for `dermfed simulate` and `dermfed deploy sign` alike.

    `config` (simulation) travels whole (`encode_run_config_value`), so that the ServerApp and every site parse exactly
    the config the command resolved; a real federation leaves it out: its config travels in the
    signed run manifest, which the hospitals check.
    """
    return {
        keys.CONFIG_PRESET: str(preset),
        keys.CONFIG_OVERRIDES: " ".join(overrides),
        keys.DERMFED_CONFIG: encode_run_config_value(config) if config is not None else "",
        keys.RUN_DIR: str(run_dir),
        keys.RESUME: bool(resume),
        keys.SITE_REGISTRY: str(site_registry),
        keys.STOP_AFTER_ROUND: int(stop_after_round),
        keys.FAULT_INJECTION: str(fault_injection),
        keys.SITE_NAMES: ",".join(site_names),
    }


def toml_value(value: Any) -> str:
    """One value of `flwr run --run-config`: TOML booleans, numbers and basic strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return toml_string(str(value))


def run_config_argument(run_config: Mapping[str, Any]) -> str:
    """The `--run-config` argument of `flwr run` that carries `run_config` (from `flower_run_config`)."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in run_config.items())


def config_of_run(run_config: Mapping[str, Any]) -> DermFedConfig:
    """The DermFed config a Flower run config carries: the signed manifest's (a real federation), else
    `dermfed-config` (a simulation), else `config-preset` with `config-overrides` (a bare `flwr run`)."""
    from common.run_manifest import RunManifest

    manifest = str(run_config.get(keys.RUN_MANIFEST, ""))
    if manifest:  # exactly the config the operator signed and the hospitals check
        return build_config(RunManifest.decode(manifest).dermfed_config)
    carried = str(run_config.get(keys.DERMFED_CONFIG, ""))
    if carried:
        return decode_run_config_value(carried)
    bare = load_config(str(run_config[keys.CONFIG_PRESET]), shlex.split(str(run_config.get(keys.CONFIG_OVERRIDES, ""))))
    return anchored_at(bare, bare_run_folder())


def bare_run_folder() -> Path:
    """Where a bare `flwr run`'s relative paths start: `dermfed/` in Flower's home (FLWR_HOME, else ~/.flwr, as
    Flower resolves it). The SuperLink, the ServerApp and every simulated ClientApp agree on it, wherever Flower
    started them and whichever copy of this code they imported (Ray's workers import the SuperLink's working
    directory's copy, if it has one, rather than the installed bundle)."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr") / "dermfed"


def anchored_at(config: DermFedConfig, folder: Path) -> DermFedConfig:
    """`config` with its relative `data.root`, `data.cache_dir` and `output_dir` made absolute under `folder`.

    A bare `flwr run`'s ServerApp and ClientApps run in whatever working directory Flower gave them (a managed
    local SuperLink keeps the one of the shell that first started it); anchored at `bare_run_folder()`, the
    embedded synthetic data is drawn once, by the ServerApp, in one fixed place that every ClientApp reads. A real
    hospital never reads `data.root` (its node config's `data-root` replaces it: `client.site.deployment_site_data`)."""
    tree = config.model_dump(mode="json")

    def anchor(path: Optional[str]) -> Optional[str]:
        return path if path is None or Path(path).is_absolute() else str(folder / path)

    tree["data"].update(root=anchor(tree["data"]["root"]), cache_dir=anchor(tree["data"]["cache_dir"]))
    tree["output_dir"] = anchor(tree["output_dir"])
    return build_config(tree)


class ConfigPerRun:
    """A process's configs by Flower run id: each run's is parsed once, from the first run config this process
    sees for it, and is the run's for as long as the process lives, whatever a later message or run config of the
    same run says (the coordinator may not change a run's config once a site has it). A first run config that cannot
    be read stays the run's too: its ConfigError is raised again, whatever a later run config of the run says."""

    def __init__(self) -> None:
        self._by_run: dict[int, DermFedConfig | ConfigError] = {}

    def __call__(self, run_id: int, run_config: Mapping[str, Any]) -> DermFedConfig:
        if run_id not in self._by_run:
            try:
                self._by_run[run_id] = config_of_run(run_config)
            except ConfigError as exc:
                self._by_run[run_id] = exc
        kept = self._by_run[run_id]
        if isinstance(kept, ConfigError):
            raise ConfigError(str(kept))
        return kept

    def clear(self) -> None:
        self._by_run.clear()
