"""Node configs of a simulation's virtual hospitals, as their IT would set them (`dermfed simulate --node-config`).

A real hospital's SuperNode gets its node config from the command line its IT starts it with
(`dermfed node --node-config ...`). A simulation's virtual SuperNodes are all started by Flower
with the same generated node config (`partition-id`, `num-partitions`), so `dermfed simulate`,
acting as the simulated hospitals' IT, writes each hospital's own settings to a file in the run
folder and names it in the environment variable `DERMFED_SIMULATED_NODE_CONFIGS` of the
simulation's processes. Nothing the coordinator of a real federation controls reaches this
channel: it is not the run config, and only a node whose node config has a `partition-id` (a
simulation, as for `client.faults`) reads it. The merged node config then goes through exactly
the code a real hospital's does (`client.policy`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from common.config import ConfigError

ENV_VAR = "DERMFED_SIMULATED_NODE_CONFIGS"
FILE_NAME = "simulated-node-configs.json"
FLOWER_KEYS = ("partition-id", "num-partitions")  # set by Flower's simulation engine; never overridden


def node_config_of(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The node config this node runs with: Flower's, plus its simulated hospital's own settings in a simulation."""
    merged = dict(node_config)
    path = os.environ.get(ENV_VAR)
    if "partition-id" not in node_config or not path:
        return merged
    try:
        table = json.loads(Path(path).read_text())
        own = table["partitions"].get(str(int(node_config["partition-id"])), {})
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise ConfigError(f"{ENV_VAR}={path}: the simulated hospitals' node configs cannot be read "
                          f"({type(exc).__name__})") from None
    merged.update({key: value for key, value in own.items() if key not in FLOWER_KEYS})
    return merged


def write_table(path: Path, by_site: Mapping[str, Mapping[str, Any]], partitions: Mapping[int, Mapping[str, Any]]) -> Path:
    """The file `node_config_of` reads: what the researcher asked per site, and each partition's merged settings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"sites": {k: dict(v) for k, v in by_site.items()},
                                "partitions": {str(k): dict(v) for k, v in partitions.items()}}, indent=1))
    return path


def read_sites(path: Path) -> dict[str, dict[str, Any]]:
    """What a run's researcher asked per site (kept in the run folder, so that --resume keeps the floors)."""
    if not path.is_file():
        return {}
    return {k: dict(v) for k, v in json.loads(path.read_text()).get("sites", {}).items()}
