"""The Flower ClientApp: a thin adapter between Flower Messages and `client.site.SiteRunner`.

Where the site's data comes from:
- simulation: the node config's `partition-id` / `num-partitions` pick a virtual hospital of
  the pooled data set described by the server's DermFed config;
- deployment: `flower-supernode --node-config "data-root=/path/to/images"` (optional
  `data-format`, `site-name`, `site-index`, `state-dir`, and `dermfed-overrides`: space-separated
  key=value applied on top of the server's config, e.g. a hospital's own `dp.target_epsilon=4`).

The reply holds exactly one ArrayRecord (the shared weights) and one MetricRecord (scalars).
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import SiteRunner, deployment_site_data, simulation_site_data
from common.config import DermFedConfig, apply_overrides, config_from_json

log = logging.getLogger("dermfed.client")

app = ClientApp()

_RUNNERS: dict[tuple[int, int], SiteRunner] = {}
SNAPSHOT_KEY = "dermfed-site"


def _site_config(message: Message, context: Context) -> DermFedConfig:
    """The server's DermFed config, with this node's own overrides on top."""
    config = config_from_json(str(message.content["config"]["dermfed-config"]))
    return apply_overrides(config, shlex.split(str(context.node_config.get("dermfed-overrides", ""))))


def _state_dir(context: Context, site_name: str) -> Path:
    if "state-dir" in context.node_config:
        return Path(str(context.node_config["state-dir"])) / site_name
    run_dir = str(context.run_config.get("run-dir", ""))
    if run_dir:
        return Path(run_dir) / "sites" / site_name
    return Path.home() / ".dermfed" / "state" / site_name


def runner_for(message: Message, context: Context) -> SiteRunner:
    key = (context.run_id, context.node_id)
    if key not in _RUNNERS:
        config = _site_config(message, context)
        if "partition-id" in context.node_config:
            data = simulation_site_data(config, int(context.node_config["partition-id"]),
                                        int(context.node_config["num-partitions"]))
        else:
            data = deployment_site_data(config, context.node_config)
        _RUNNERS[key] = SiteRunner(config, data, _state_dir(context, data.name))
    return _RUNNERS[key]


@app.train()
def train(message: Message, context: Context) -> Message:
    runner = runner_for(message, context)
    config = message.content["config"]
    round_number = int(config["server-round"]) + int(config.get("round-offset", 0))
    stored = context.state.get(SNAPSHOT_KEY)
    snapshot = stored["snapshot"] if isinstance(stored, ConfigRecord) else None
    output = runner.train_round(round_number, message.content["arrays"].to_torch_state_dict(), snapshot,
                                prox_mu=float(config.get("proximal-mu", 0.0)))
    context.state[SNAPSHOT_KEY] = ConfigRecord({"snapshot": output.snapshot})
    reply = RecordDict({"arrays": ArrayRecord(output.shared), "metrics": MetricRecord(output.metrics)})
    return Message(content=reply, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    runner = runner_for(message, context)
    metrics = runner.evaluate(message.content["arrays"].to_torch_state_dict())
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)
