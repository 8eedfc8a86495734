"""How a DermFed configuration travels: YAML beside a run's outputs, JSON, TOML strings for Flower.

The resolved configuration is written next to every run's outputs (`write_config`), so that the
run can be reproduced.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from common.config.loading import build_config
from common.config.schema import DermFedConfig
from common.run_files import atomic_write_text


def toml_string(value: str) -> str:
    """A TOML basic string: how values travel in Flower's `--run-config` and node config."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_to_json(config: DermFedConfig) -> str:
    """One line: how the server sends its config to the sites (Flower logs it once per round kind)."""
    return config.model_dump_json()


def config_from_json(text: str) -> DermFedConfig:
    return build_config(json.loads(text))


def config_to_yaml(config: DermFedConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def write_config(config: DermFedConfig, folder: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config beside a run's outputs, so the run can be reproduced."""
    return atomic_write_text(Path(folder) / name, config_to_yaml(config))
