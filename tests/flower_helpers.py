"""Building Flower Messages in-process, as the SuperLink would deliver them."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity


def set_identity(run_id: int = 1, node_id: int = 1) -> None:
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id
    TaskIdentity.task_id = 1


def as_record(arrays) -> ArrayRecord:
    """An ArrayRecord from a torch state dict or a dict of NumPy arrays."""
    first = next(iter(arrays.values()))
    if hasattr(first, "detach"):
        return ArrayRecord(arrays)
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def run_config_of(config, **extra) -> dict:
    """Flower's run config of a run with this DermFed config, as `dermfed simulate` builds it: the sites read the
    run's config from it (never from a round's message)."""
    from common.config.transport import encode_run_config_value
    from common.flower_keys import DERMFED_CONFIG

    return {DERMFED_CONFIG: encode_run_config_value(config), **extra}


def train_message(node_id: int, arrays: dict[str, np.ndarray] | None = None, config: dict | None = None) -> Message:
    set_identity()
    content = RecordDict({"config": ConfigRecord(config or {})})
    if arrays is not None:
        content["arrays"] = as_record(arrays)
    return Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN)


def reply(node_id: int, arrays: dict[str, np.ndarray], metrics: dict[str, float]) -> Message:
    request = train_message(node_id)
    content = RecordDict({"arrays": as_record(arrays),
                          "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=request)


def error_reply(node_id: int, reason: str) -> Message:
    return Message(Error(code=0, reason=reason), reply_to=train_message(node_id))
