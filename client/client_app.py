"""The Flower ClientApp: a thin adapter between Flower Messages and `client.site.SiteRunner`.

Where the site's data comes from:
- simulation: the node config's `partition-id` / `num-partitions` pick a virtual hospital of
  the pooled data set described by the run's DermFed config;
- deployment: `flower-supernode --node-config "data-root=/path/to/images"` (optional
  `data-format`, `site-name`, `site-index`, `state-dir`, `min-batch-size`; the hospital's privacy floor
  `dp-enabled`, `dp-max-epsilon`, `dp-delta`, `dp-max-grad-norm`; `public-num-examples`; and
  `dermfed-overrides`: space-separated key=value applied on top of the run's config, except
  `dp.*`, which only the node config keys above may set).

The run's DermFed config reaches a site once per run, in Flower's run config (the signed run
manifest in a real federation, which `client.trusted_app` has checked before this code loads;
`dermfed-config` in a simulation: `common.config.transport.config_of_run`), never in a round's
message. This process parses it once per run and keeps the first one it got for that run id: a
coordinator that later sends another (in a message or a changed run config) is ignored, and a
config the site refused stays refused for the whole run.

A simulated hospital's own node config (`dermfed simulate --node-config SITE:...`) is merged in
by `client.simulated_nodes` and then read by the same code as a real hospital's. The site's state
folder comes from the node config's `state-dir`, else ~/.dermfed/state: never from the run config.

The reply holds exactly one ArrayRecord (the shared weights) and one MetricRecord (scalars),
or an Error whose reason is an error class and a fixed message (`client.policy.public_error`):
exceptions are logged here, at the site, and their text and class never leave it. The privacy floor
is checked before any image is read, and a DP site answers every data-dependent failure with one
fixed reason, so that error classes answer no question about its images.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client.faults import FaultSwitch
from client.policy import (PrivacyFloor, check_simulated_overrides, min_batch_size, node_overrides, override_keys,
                           public_count, public_error, site_state_dir)
from client.simulated_nodes import node_config_of
from client.site import PrivacyLedger, SiteRunner, deployment_site_data, deployment_site_name, simulation_site_data
from common import flower_keys as keys
from common.console_logging import one_line_per_event
from common.config import ConfigError, ConfigPerRun, DermFedConfig, apply_overrides

log = logging.getLogger("dermfed.client")

one_line_per_event()  # Flower prints its own log lines: no second copy through Opacus's root handler
app = ClientApp()


class _SiteProcess(dict[tuple[int, int], SiteRunner]):
    """What this process holds: its site runners by (run id, node id), and each run's config (`configs`), parsed
    once per run. A restarted daemon has neither (`clear`)."""

    def __init__(self) -> None:
        super().__init__()
        self.configs = ConfigPerRun()

    def clear(self) -> None:
        super().clear()
        self.configs.clear()


_RUNNERS: _SiteProcess = _SiteProcess()
SITE_ERROR_CODE = ErrorCode.CLIENT_APP_RAISED_EXCEPTION  # the reason string carries DermFed's error class


def _site_config(context: Context, node_config: dict) -> DermFedConfig:
    """The run's DermFed config, with this node's own overrides on top (never the privacy settings)."""
    config = _RUNNERS.configs(context.run_id, context.run_config)
    overrides = node_overrides(node_config)
    privacy = [o for o, key in zip(overrides, override_keys(overrides)) if key.startswith("dp.")]
    if privacy:
        raise ConfigError(f"dermfed-overrides may not set {privacy}: a hospital's privacy settings are the node "
                          "config keys dp-enabled, dp-max-epsilon, dp-delta and dp-max-grad-norm")
    return apply_overrides(config, overrides) if overrides else config


def _known_floor(node_config: dict) -> PrivacyFloor:
    """The floor known before any image is read: the node config's, and at a real hospital (whose state folder
    is named by its node config) its privacy ledger's."""
    floor = PrivacyFloor.from_node_config(node_config)
    if "partition-id" in node_config:  # a simulated hospital's name comes from the data; SiteRunner reads its ledger
        return floor
    state_dir = site_state_dir(node_config, deployment_site_name(node_config))
    return floor.stricter(PrivacyLedger(state_dir / "privacy_ledger.json").floor())


def _private_site(context: Context) -> bool:
    """Whether this site answers under DP: its floor requires it, or the run asks for it. In doubt: yes."""
    runner = _RUNNERS.get((context.run_id, context.node_id))
    if runner is not None:
        return runner.floor.dp_required or runner.config.dp.enabled
    try:
        node_config = node_config_of(context.node_config)
        return _known_floor(node_config).dp_required or _site_config(context, node_config).dp.enabled
    except Exception:  # noqa: BLE001 - a floor or config that cannot be read: answer as a DP site would
        return True


def runner_for(context: Context) -> SiteRunner:
    key = (context.run_id, context.node_id)
    if key not in _RUNNERS:
        node_config = node_config_of(context.node_config)  # a simulated hospital's own settings, if any
        floor = _known_floor(node_config)  # before any data is read: a bad floor stops here
        config = _site_config(context, node_config)
        floor.apply(config)  # a request for less privacy is refused before any image is read (SiteRunner re-checks)
        if "partition-id" in node_config:
            check_simulated_overrides(node_config)  # its images must be the ones the run records
            data = simulation_site_data(config, int(node_config["partition-id"]), int(node_config["num-partitions"]))
        else:
            data = deployment_site_data(config, node_config)
        _RUNNERS[key] = SiteRunner(config, data, site_state_dir(node_config, data.name), floor=floor,
                                   public_count=public_count(node_config), min_batch_size=min_batch_size(node_config))
    return _RUNNERS[key]


def _replies_without_secrets(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Any failure becomes an Error reply with a fixed reason; its details go to this site's log only."""

    @functools.wraps(handler)
    def guarded(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except Exception as exc:  # noqa: BLE001 - every failure must be answered without its text
            log.exception("this site could not answer %s (the details below stay here)", message.metadata.message_type)
            reason = public_error(exc, private=_private_site(context))
            return Message(Error(code=SITE_ERROR_CODE, reason=reason), reply_to=message)

    return guarded


@app.train()
@_replies_without_secrets
def train(message: Message, context: Context) -> Message:
    runner = runner_for(context)
    instruction = message.content[keys.CONFIG_RECORD]
    round_number = int(instruction[keys.SERVER_ROUND])
    fault = FaultSwitch.of_simulated_site(context.node_config, context.run_config)
    if fault is not None:
        fault.before_training(round_number, runner.first_image_path())
    output = runner.train_round(round_number, message.content[keys.ARRAYS_RECORD].to_torch_state_dict(),
                                instruction=dict(instruction))
    shared = fault.corrupt(round_number, output.shared) if fault is not None else output.shared
    reply = RecordDict({keys.ARRAYS_RECORD: ArrayRecord(shared), keys.METRICS_RECORD: MetricRecord(output.metrics)})
    return Message(content=reply, reply_to=message)


@app.evaluate()
@_replies_without_secrets
def evaluate(message: Message, context: Context) -> Message:
    runner = runner_for(context)
    metrics = runner.evaluate(message.content[keys.ARRAYS_RECORD].to_torch_state_dict())
    return Message(content=RecordDict({keys.METRICS_RECORD: MetricRecord(metrics)}), reply_to=message)
