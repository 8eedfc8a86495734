"""`dermfed simulate --node-config SITE:'k=v ...'` and `--node-config-file FILE`: each simulated hospital's node config.

The strings are parsed by Flower's own node-config parser, the one `flower-supernode --node-config`
uses, so a simulated hospital's `dp-enabled=true dp-max-epsilon=4` has exactly the types a real
hospital's has; `client.simulated_nodes` carries them to the virtual SuperNodes.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import yaml

from client.policy import PrivacyFloor, check_node_config_keys, check_simulated_overrides, public_count
from common.config import ConfigError

RESERVED = ("partition-id", "num-partitions")


def parse_node_config(text: str) -> dict[str, Any]:
    """'dp-enabled=true dp-max-epsilon=4' -> {'dp-enabled': True, 'dp-max-epsilon': 4}, as flower-supernode parses it."""
    from flwr.common.config import parse_config_args

    try:
        return dict(parse_config_args([text]))
    except Exception as exc:  # noqa: BLE001 - Flower raises ValueError or TOML errors: one clear line instead
        raise ConfigError(f"node config {text!r} is not space-separated key=value pairs: {exc}") from None


def _site_entry(site: str, value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        return parse_node_config(value)
    if isinstance(value, Mapping) and all(isinstance(v, (str, int, float, bool)) for v in value.values()):
        return {str(k): v for k, v in value.items()}
    raise ConfigError(f"{where}: the node config of {site!r} must be a 'key=value ...' string or a mapping of "
                      "scalars")


def parse_node_configs(pairs: Iterable[str] = (), file: Optional[str] = None) -> Optional[dict[str, dict[str, Any]]]:
    """SITE:CONFIG pairs and/or a YAML or TOML file mapping site -> config; None when neither is given."""
    pairs = list(pairs)
    if not pairs and not file:
        return None
    configs: dict[str, dict[str, Any]] = {}
    if file:
        path = Path(file)
        try:
            text = path.read_text()
            table = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise ConfigError(f"--node-config-file {file}: cannot be read as {'TOML' if path.suffix == '.toml' else 'YAML'} "
                              f"({type(exc).__name__}: {exc})") from None
        if not isinstance(table, Mapping):
            raise ConfigError(f"--node-config-file {file}: must map each site's name to its node config")
        for site, value in table.items():
            configs.setdefault(str(site), {}).update(_site_entry(str(site), value, f"--node-config-file {file}"))
    for pair in pairs:
        site, sep, text = pair.partition(":")
        if not sep or not site.strip():
            raise ConfigError(f"--node-config {pair!r} must be SITE:'key=value ...', e.g. "
                              "hospital_2:'dp-enabled=true dp-max-epsilon=4'")
        configs.setdefault(site.strip(), {}).update(parse_node_config(text))
    return configs


def check_node_configs(configs: Mapping[str, Mapping[str, Any]], sites: list[str]) -> None:
    """Refuse, before any process starts, a site that does not exist or a node config a hospital's node would refuse."""
    unknown = sorted(set(configs) - set(sites))
    if unknown:
        raise ConfigError(f"--node-config names {unknown}, but the simulated hospitals are {sites}")
    for site, node_config in configs.items():
        reserved = [key for key in RESERVED if key in node_config]
        if reserved:
            raise ConfigError(f"--node-config {site}: {reserved} are set by the simulation itself")
        try:
            check_node_config_keys(node_config)
            check_simulated_overrides(node_config)
            PrivacyFloor.from_node_config(node_config)  # exactly the checks a hospital's ClientApp makes
            public_count(node_config)
        except ConfigError as exc:
            raise ConfigError(f"--node-config {site}: {exc}") from None
