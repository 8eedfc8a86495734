"""Flower's strategies with a robust front door (the only server module that imports Flower's
strategy API, besides the ServerApp adapter).

The configured strategy's registry entry (`common/strategies/`) names a class of
`flwr.serverapp.strategy` and its keyword arguments; this adapter resolves and builds it.
`RobustAggregation` is mixed into it (FedAvg, FedProx, FedAdam, FedMedian, ...): before Flower
aggregates a round, it drops replies that are errors, missing (timed out), or unsound (NaN/Inf,
wrong keys or shapes, no positive example count), records who was left out and why, and
refuses the round when fewer than `federation.min_clients` remain. With `federation.compression`,
each reply's update is decoded onto the global weights sent that round first, so every check and
Flower's aggregation see float32 weights (`common.compression`). It also numbers rounds
from the resume point, so a resumed run continues round numbers, schedules and FedAdam's
bias correction where the interrupted run stopped.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flower_strategies

from common.compression import CompressionError, apply_update
from common.config import DermFedConfig
from common.strategies import strategy_named
from common.reply_signature import RECORD_KEY, ForgedReply, reply_digest, verify_reply
from server.deploy.registry import SiteRegistry
from server.rounds import RoundFailed, RoundRecord, RunRecorder, screen_update

# Averaging these across sites means nothing: they are kept per site in the history.
PER_SITE_ONLY = {"site-index", "epsilon", "delta"}


class RobustAggregation:
    """Mixin for a Flower message-API strategy; call `attach` before `start`.

    With a site registry (a real federation), a site is who its key says: replies are labelled by
    the registry entry of their node id, whatever the node reports about itself; a node that is
    not in the registry (or was revoked) is sent nothing and its replies are left out; and a reply
    is recorded only if it is signed by the key registered for its node id (Flower's Fleet API
    does not bind a pushed reply's `src_node_id` to the node that pushed it), otherwise it is
    left out as forged. Without a registry (a simulation on one machine), the node's configured
    `site-index` names it.
    """

    recorder: RunRecorder
    expected: dict[str, tuple[int, ...]]
    min_clients: int
    round_offset: int
    site_names: dict[int, str]
    registry: Optional[SiteRegistry]
    compression: str = "none"  # federation.compression: replies carry an encoded update, decoded in `screen`

    def attach(self, recorder: RunRecorder, expected: dict[str, tuple[int, ...]], min_clients: int,
               round_offset: int = 0, site_names: Optional[dict[int, str]] = None,
               registry: Optional[SiteRegistry] = None) -> None:
        self.recorder, self.expected, self.min_clients = recorder, expected, min_clients
        self.round_offset, self.site_names, self.registry = round_offset, dict(site_names or {}), registry
        self._sent: list[int] = []
        self._seen: dict[int, str] = {}  # node id -> the label of its last sound reply
        self._broadcast: dict[str, np.ndarray] = {}  # this round's global weights, when replies are compressed

    def site_label(self, index: Optional[float], node_id: int) -> str:
        if self.registry is not None:
            entry = self.registry.site(node_id)
            return entry.name if entry else f"unregistered node-{node_id}"
        if index is not None and int(index) in self.site_names:
            return self.site_names[int(index)]
        return f"site-{int(index)}" if index is not None else f"node-{node_id}"

    def silent_label(self, node_id: int) -> str:
        """A node that sent an error or nothing reports no site index: name it by its key (a real
        federation) or by what it was called in an earlier round (a simulation)."""
        if self.registry is not None:
            return self.site_label(None, node_id)
        return self._seen.get(node_id, f"node-{node_id}")

    def site_order(self, index: Optional[float], node_id: int) -> float:
        if self.registry is not None:
            entry = self.registry.site(node_id)
            return float(entry.index) if entry else float("inf")
        return float(index) if index is not None else float("inf")

    def _to_registered(self, messages: list[Message], record: Optional[RoundRecord] = None) -> list[Message]:
        """Drop messages to nodes the registry does not know: they get no weights."""
        if self.registry is None:
            return messages
        kept = []
        for message in messages:
            node = message.metadata.dst_node_id
            if self.registry.site(node) is not None:
                kept.append(message)
            elif record is not None:
                record.excluded.append({"site": f"unregistered node-{node}", "node": node,
                                        "reason": "node id not in the site registry: sent nothing"})
        return kept

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        real_round = self.round_offset + server_round
        record = self.recorder.begin(real_round)
        messages = self._to_registered(list(super().configure_train(real_round, arrays, config, grid)),  # type: ignore[misc]
                                       record)
        self._sent = [m.metadata.dst_node_id for m in messages]
        self._broadcast = {k: v.numpy() for k, v in arrays.items()} if self.compression != "none" else {}
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._to_registered(list(super().configure_evaluate(self.round_offset + server_round, arrays,  # type: ignore[misc]
                                                                   config, grid)))

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Keep the sound replies, sorted by site (aggregation order must not depend on arrival)."""
        record = self.recorder.record(self.round_offset + server_round)
        replies = list(replies)
        good: list[tuple[float, int, Message]] = []
        for message in replies:
            node = message.metadata.src_node_id
            if message.has_error():
                record.excluded.append({"site": self.silent_label(node), "node": node,
                                        "reason": f"client error: {message.error.reason}"})
                continue
            reason, metrics, index, arrays = self._check(message)
            label = self.site_label(index, node)
            if self.registry is not None:
                reason = self.sender_problem(message, self.round_offset + server_round) or reason
            if reason:
                record.excluded.append({"site": label, "node": node, "reason": reason})
                continue
            if self.compression != "none":  # from here on (aggregation, monitors) the reply holds float32 weights
                message.content[next(iter(message.content.array_records))] = ArrayRecord(
                    {k: Array(v) for k, v in arrays.items()})
            record.sites.append({"site": label, "node": node, **metrics})
            self._seen[node] = label
            good.append((self.site_order(index, node), node, message))
        answered = {m.metadata.src_node_id for m in replies}
        for node in self._sent:
            if node not in answered:
                record.excluded.append({"site": self.silent_label(node), "node": node,
                                        "reason": "no reply within federation.round_timeout"})
        if len(good) < self.min_clients:
            raise RoundFailed(
                f"round {record.round}: only {len(good)} valid update(s), federation.min_clients={self.min_clients}; "
                f"left out: {record.excluded}. The last completed round's checkpoint is kept; fix the sites and resume.")
        return [message for _, _, message in sorted(good, key=lambda item: (item[0], item[1]))]

    def sender_problem(self, message: Message, real_round: int) -> Optional[str]:
        """Why a reply cannot be attributed to its node id's registered key, or None when its signature verifies."""
        node = message.metadata.src_node_id
        entry = self.registry.site(node) if self.registry is not None else None
        if entry is None:
            return "node id not in the site registry"
        record = message.content.config_records.get(RECORD_KEY)
        if record is None or "signature" not in record:
            return f"unsigned reply: not recorded under node {node} (each site signs its replies with its node key)"
        try:
            verify_reply(entry.public_key, str(record["signature"]), message.metadata.run_id, real_round, node,
                         message.metadata.reply_to_message_id, reply_digest(message.content))
        except ForgedReply as exc:
            return f"forged or altered reply: {exc}"
        return None

    def _check(self, message: Message) -> tuple[Optional[str], dict[str, Any], Optional[float], dict[str, np.ndarray]]:
        """Why the reply must be left out (or None), its metrics, its site index, and its (decoded) weights."""
        content = message.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return "reply must hold exactly one ArrayRecord and one MetricRecord", {}, None, {}
        metrics = {k: float(v) for k, v in next(iter(content.metric_records.values())).items()
                   if isinstance(v, (int, float))}
        arrays = {k: v.numpy() for k, v in next(iter(content.array_records.values())).items()}
        if self.compression != "none":
            try:
                arrays = apply_update(self._broadcast, arrays, self.compression)
            except CompressionError as exc:
                return f"undecodable {self.compression} update: {exc}", metrics, metrics.get("site-index"), {}
        return screen_update(arrays, self.expected, metrics), metrics, metrics.get("site-index"), arrays

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        good = self.screen(server_round, replies)
        arrays, metrics = super().aggregate_train(self.round_offset + server_round, good)  # type: ignore[misc]
        if metrics is not None:
            self.recorder.record(self.round_offset + server_round).train = {
                k: float(v) for k, v in metrics.items() if k not in PER_SITE_ONLY}
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        sound = [m for m in replies if not m.has_error()
                 and (self.registry is None or self.sender_problem(m, self.round_offset + server_round) is None)]
        metrics = super().aggregate_evaluate(self.round_offset + server_round, sound) if sound else None  # type: ignore[misc]
        if metrics is not None:
            self.recorder.record(self.round_offset + server_round).evaluate = {
                k: float(v) for k, v in metrics.items() if k not in PER_SITE_ONLY}
        return metrics

    def export_state(self) -> dict[str, Any]:
        """Server-optimizer moments (FedAdam), so a resumed run continues them."""
        state: dict[str, Any] = {}
        for name in ("m_t", "v_t"):
            value = getattr(self, name, None)
            if value:
                state[name] = {k: np.asarray(v) for k, v in value.items()}
        return state

    def import_state(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, {k: np.asarray(v) for k, v in value.items()})


def build_strategy(config: DermFedConfig) -> RobustAggregation:
    """The configured Flower strategy, with robust aggregation mixed in."""
    fed = config.federation
    entry = strategy_named(fed.strategy)
    base = getattr(flower_strategies, entry.flower_class, None)
    if not (isinstance(base, type) and issubclass(base, flower_strategies.Strategy)):
        raise ValueError(f"strategy {entry.name!r} names {entry.flower_class!r}, which is not a strategy class of "
                         "flwr.serverapp.strategy")
    # Under DP sites refuse client evaluation (an un-noised loss on private images), so none is asked for.
    fraction_evaluate = 0.0 if config.dp.enabled else fed.fraction_evaluate
    kwargs: dict[str, Any] = dict(
        fraction_train=fed.fraction_train, fraction_evaluate=fraction_evaluate,
        min_train_nodes=fed.min_clients, min_evaluate_nodes=fed.min_clients if fraction_evaluate else 0,
        min_available_nodes=fed.min_clients,
    )
    kwargs.update(entry.server_kwargs(config))
    cls = type(f"Robust{base.__name__}", (RobustAggregation, base), {})
    strategy = cls(**kwargs)
    strategy.compression = fed.compression
    return strategy
