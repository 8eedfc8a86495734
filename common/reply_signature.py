"""Replies bound to their senders: a site signs what it sends with its node key; the server checks it.

Flower's Fleet API authenticates the node that pushes a reply, but does not check that the
reply's `src_node_id` is that node: a registered hospital can push a reply under another's
node id. Each DermFed site therefore signs, with the private key of its SuperNode (the key the
coordinator registered for its node id), a digest of exactly what it sends (every array's
name, dtype, shape and bytes; every metric), the run, the round, the instruction it answers
and its node id. The server records an update only if the signature verifies against the key
that the site registry holds for the reply's node id.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.flower_keys import REPLY_SIGNATURE_RECORD

RECORD_KEY = REPLY_SIGNATURE_RECORD  # the ConfigRecord in a reply that carries the signature
_DOMAIN = b"dermfed-reply-v1\0"


class ForgedReply(ValueError):
    """The reply's signature does not verify against the registered key of its node id."""


def content_digest(arrays: Mapping[str, tuple[str, Sequence[int], bytes]], metrics: Mapping[str, Any]) -> str:
    """sha256 over every array (name, dtype, shape, bytes) and every metric, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        dtype, shape, data = arrays[name]
        header = json.dumps([name, str(dtype), [int(s) for s in shape], len(data)]).encode()
        digest.update(len(header).to_bytes(8, "big") + header + data)
    digest.update(json.dumps({k: metrics[k] for k in sorted(metrics)}, allow_nan=True).encode())
    return digest.hexdigest()


def reply_digest(content: Any) -> str:
    """`content_digest` of a Flower RecordDict (duck-typed: its array and metric records), signature aside."""
    arrays = {f"{record_name}/{key}": (array.dtype, array.shape, array.data)
              for record_name, record in content.array_records.items() for key, array in record.items()}
    metrics = {f"{record_name}/{key}": value
               for record_name, record in content.metric_records.items() for key, value in record.items()}
    return content_digest(arrays, metrics)


def _statement(run_id: int, round_number: int, node_id: int, reply_to: str, digest: str) -> bytes:
    return _DOMAIN + json.dumps({"run": int(run_id), "round": int(round_number), "node": int(node_id),
                                 "reply_to": str(reply_to), "content": digest}, sort_keys=True).encode()


def load_node_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC node key (made by `dermfed node keygen`)")
    return key


def sign_reply(key: ec.EllipticCurvePrivateKey, run_id: int, round_number: int, node_id: int, reply_to: str,
               digest: str) -> str:
    signature = key.sign(_statement(run_id, round_number, node_id, reply_to, digest), ec.ECDSA(hashes.SHA384()))
    return base64.b64encode(signature).decode("ascii")


def verify_reply(public_key_line: str, signature: str, run_id: int, round_number: int, node_id: int, reply_to: str,
                 digest: str) -> None:
    """Return if the node key `public_key_line` (OpenSSH) signed this reply; raise ForgedReply otherwise."""
    try:
        key = serialization.load_ssh_public_key(public_key_line.strip().encode("ascii"))
        raw = base64.b64decode(signature.encode("ascii"), validate=True)
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(raw, _statement(run_id, round_number, node_id, reply_to, digest), ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError, AssertionError, UnicodeError) as exc:
        raise ForgedReply(f"its signature does not verify against the key registered for node {node_id} "
                          f"({type(exc).__name__})") from None
