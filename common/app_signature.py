"""Signing the DermFed app bundle (FAB) at the coordinator, verifying it at each hospital.

Flower's own `--trusted-entities` verifies only bundles that Flower Hub has signed: a bundle
built locally and submitted with `flwr run` carries no verification record, so a SuperNode
that trusts entities refuses every such run, and one that does not runs anything. DermFed
therefore signs the exact bundle bytes with the coordinator's Ed25519 key (`dermfed deploy
run`), sends the signature in the run config (`app-signature`), and each hospital checks it
against the coordinator's public key before the bundle is installed or any of its code is
imported (`client.trusted_app`).
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_KEY = "app-signature"  # run config key that carries the signature
_DOMAIN = b"dermfed-app-bundle-v1\0"  # a signature over a bundle can be nothing else


class UntrustedApp(RuntimeError):
    """The app bundle is not signed by a key this hospital trusts; none of its code was loaded."""


def _message(bundle: bytes) -> bytes:
    return _DOMAIN + hashlib.sha256(bundle).digest()


def sign_bundle(bundle: bytes, private_key: Ed25519PrivateKey) -> str:
    return base64.urlsafe_b64encode(private_key.sign(_message(bundle))).decode("ascii")


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_trusted_keys(path: Path) -> list[Ed25519PublicKey]:
    """One `ssh-ed25519 AAAA... comment` line per trusted key; other lines are ignored."""
    keys = []
    for line in path.read_text().splitlines():
        if line.startswith("ssh-ed25519 "):
            key = serialization.load_ssh_public_key(line.encode("ascii"))
            assert isinstance(key, Ed25519PublicKey)
            keys.append(key)
    if not keys:
        raise ValueError(f"{path} holds no ssh-ed25519 public key")
    return keys


def verify_bundle(bundle: bytes, signature: str, trusted: list[Ed25519PublicKey]) -> None:
    """Return if one trusted key signed exactly these bytes; raise UntrustedApp otherwise."""
    if not signature:
        raise UntrustedApp("the app bundle carries no app-signature; this hospital runs only bundles signed by "
                           "its coordinator (dermfed deploy run)")
    try:
        raw = base64.urlsafe_b64decode(signature.encode("ascii"))
    except (ValueError, UnicodeError):
        raise UntrustedApp("the app-signature is not valid base64") from None
    for key in trusted:
        try:
            key.verify(raw, _message(bundle))
            return
        except InvalidSignature:
            continue
    raise UntrustedApp(f"the app bundle (sha256 {hashlib.sha256(bundle).hexdigest()[:16]}...) is not signed by a "
                       "key this hospital trusts; none of its code was loaded")
