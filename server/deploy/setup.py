"""Making a federation: `deploy init` (the coordinator's keys and certificates) and `deploy add-hospital`
(a hospital's certificate, from the request it made with its own keys).

No hospital private key is ever made or read here: a hospital runs `dermfed node keygen`, sends
its `request.json` (a certificate signing request and its public node key), and receives public
files back.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any, Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.deployment.files import private_folder, replace_file, write_public
from common.deployment.layout import FederationLayout
from common.deployment.pki import (cert_pem, issue_certificate, load_ca, make_ca, make_crl, make_signing_key,
                                   sign_client_request)
from common.deployment.proxy import DEFAULT_MAX_BODY_MB, DEFAULT_MAX_CONNECTIONS
from server.deploy.base import NAME_PATTERN, DeployError, write_connection


def init_federation(out: Path, hosts: list[str], port: int = 9092, max_body_mb: int = DEFAULT_MAX_BODY_MB,
                    max_connections: int = DEFAULT_MAX_CONNECTIONS) -> FederationLayout:
    layout = FederationLayout(out)
    if layout.settings_file.exists() or layout.offline.exists():
        raise DeployError(f"{out} already holds a federation; choose another --out")
    if not 1 <= port <= 65535:
        raise DeployError(f"--port {port} is not a port number (1-65535)")
    if not 1 <= max_body_mb <= 1024 or max_connections < 1:
        raise DeployError(f"--max-body-mb must be 1..1024 and --max-connections at least 1 "
                          f"(got {max_body_mb}, {max_connections})")
    host = hosts[0] if hosts else "localhost"
    for folder in (layout.root, layout.offline, layout.operator, layout.coordinator):
        private_folder(folder)
    ca_key, ca_cert = make_ca(layout.ca_key, layout.coordinator / "ca.crt")
    write_public(layout.offline / "ca.crt", cert_pem(ca_cert))
    write_public(layout.crl, make_crl(ca_key, ca_cert, []))
    issue_certificate(layout.coordinator, "superlink", ca_key, ca_cert, "localhost", "server")  # private network only
    issue_certificate(layout.coordinator, "edge", ca_key, ca_cert, host, "server", hosts)
    del ca_key
    make_signing_key(layout.signing_key, layout.operator / "app-signing.pub", "dermfed-operator")
    write_public(layout.coordinator / "app-signing.pub", (layout.operator / "app-signing.pub").read_bytes())
    settings = {"federation_id": secrets.token_hex(16), "server_root": str(layout.root.resolve()), "host": host,
                "hosts": hosts, "public_port": port, "max_body_mb": max_body_mb, "max_connections": max_connections,
                "hospitals": []}
    save_settings(layout, settings)
    write_connection(layout)
    _write_commands(layout)
    return layout


def save_settings(layout: FederationLayout, settings: dict[str, Any]) -> None:
    replace_file(layout.settings_file, json.dumps(settings, indent=1).encode(), mode=0o644)
    # the operator's workstation signs runs for this federation: it keeps a copy of these public settings
    if layout.operator.is_dir():
        replace_file(layout.operator / "federation.json", json.dumps(settings, indent=1).encode(), mode=0o644)


def _write_commands(layout: FederationLayout) -> None:
    from server.deploy.commands import federation_commands

    replace_file(layout.root / "COMMANDS.md", federation_commands(layout).encode(), mode=0o644)


def _node_public_key(line: str) -> str:
    try:
        key = serialization.load_ssh_public_key(line.strip().encode("ascii"))
    except (ValueError, UnicodeError):
        raise DeployError("the request's auth_public_key is not an OpenSSH public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise DeployError("the request's auth_public_key must be an EC key (made by `dermfed node keygen`)")
    return line.strip()


def read_request(path: Path) -> dict[str, str]:
    try:
        request = json.loads(Path(path).read_text())
        name, csr, public_key = request["name"], request["csr"], request["auth_public_key"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DeployError(f"{path} is not a hospital's request.json from `dermfed node keygen` "
                          f"({type(exc).__name__}: {exc})") from None
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise DeployError(f"{path}: the hospital name {name!r} must use letters, digits, '.', '_', '-'")
    return {"name": name, "csr": str(csr), "auth_public_key": _node_public_key(str(public_key))}


def add_hospital(root: Path, request_path: Path, ca_key: Optional[Path] = None) -> dict[str, Any]:
    """Sign a hospital's certificate request, keep its public node key, write the public files it receives."""
    layout = FederationLayout(root)
    settings = layout.settings()
    request = read_request(request_path)
    name = request["name"]
    if any(h["name"] == name for h in settings["hospitals"]):
        raise DeployError(f"{name} is a hospital of this federation already; a revoked hospital rejoins under a "
                          "new name")
    ca_key = Path(ca_key) if ca_key else layout.ca_key
    if not ca_key.is_file():
        raise DeployError(f"the CA key is not at {ca_key} (it belongs offline): pass --ca-key PATH to it")
    try:
        key, cert = load_ca(ca_key, layout.coordinator / "ca.crt")
        client = sign_client_request(request["csr"].encode(), name, key, cert)
    except ValueError as exc:
        raise DeployError(f"{request_path}: {exc}") from None
    del key
    kept = private_folder(layout.public_keys(name))
    write_public(kept / "auth_key.pub", (request["auth_public_key"] + "\n").encode())
    write_public(kept / "client.crt", cert_pem(client))
    index = max((h["index"] for h in settings["hospitals"]), default=-1) + 1
    entry = {"name": name, "index": index, "auth_public_key": request["auth_public_key"],
             "certificate_serial": format(client.serial_number, "x"), "revoked": False}
    settings["hospitals"].append(entry)
    save_settings(layout, settings)
    _write_package(layout, settings, entry, client)
    _write_commands(layout)
    return entry


def _write_package(layout: FederationLayout, settings: dict[str, Any], entry: dict[str, Any],
                   client: x509.Certificate) -> Path:
    from server.deploy.commands import hospital_commands

    folder = private_folder(layout.hospital_dir(entry["name"]))
    write_public(folder / "ca.crt", (layout.coordinator / "ca.crt").read_bytes())
    write_public(folder / "client.crt", cert_pem(client))
    write_public(folder / "trusted-app-keys.pub", (layout.coordinator / "app-signing.pub").read_bytes())
    hospital = {"site": entry["name"], "index": entry["index"], "federation_id": settings["federation_id"],
                "coordinator_host": settings["host"], "coordinator_port": settings["public_port"]}
    write_public(folder / "hospital.json", json.dumps(hospital, indent=1).encode())
    write_public(folder / "START.md", hospital_commands(layout, entry["name"]).encode())
    return folder
