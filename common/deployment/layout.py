"""Where a federation's files live, who holds each folder, and what it is for.

The coordinator (`dermfed deploy init --out FEDERATION`):

    FEDERATION/               mode 0700
      federation.json         federation id, host, ports, body cap, hospitals (name, index, keys' public parts)
      COMMANDS.md             the exact commands of this federation
      ca-offline/             the CA's key: move it offline (a USB key in a safe) before `deploy serve`;
                              needed again only to add or revoke a hospital
      operator/               the operator's app-signing key: move it to the operator's workstation before
                              `deploy serve`; `deploy sign` uses it there
      coordinator/            stays on the coordinator's server
        ca.crt, crl.pem (revoked client certificates), superlink.crt/.key (TLS inside the private
        network), edge.crt/.key (public TLS), app-signing.pub, registry.json, flwr-home/,
        hospitals/NAME/ (auth_key.pub, client.crt), sockets/ (Unix sockets, 0700), runtime/ (logs)
      hospitals/NAME/         public files for hospital NAME (ca.crt, client.crt, trusted-app-keys.pub,
                              hospital.json, START.md): send them to it

A hospital (`dermfed node keygen --dir HOSPITAL`), mode 0700:

    HOSPITAL/
      auth_key (+ .pub)       its SuperNode key; also signs its replies
      client.key, client.csr  its TLS client key and the signing request for the coordinator's CA
      request.json            what it sends to the coordinator: the request and the public node key
      ca.crt, client.crt, trusted-app-keys.pub, hospital.json    what the coordinator sends back
      approved-bundles        the app bundles (sha256) it approved (`dermfed node approve`)
      accepted-runs.json      the signed runs it accepted, each bound to one Flower run
      runtime/                logs, the loopback certificate, sockets/
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONNECTION = "dermfed"  # the operator's flwr connection name (coordinator/flwr-home/config.toml)
SUPERLINK_PORT = 9091  # inside the coordinator's private network namespace: reachable by nothing else
SUPERNODE_FORWARD_PORT = 9095  # inside a hospital's private network namespace
SUPERNODE_RUNTIME_PORT = 9094


@dataclass(frozen=True)
class FederationLayout:
    root: Path

    @property
    def settings_file(self) -> Path:
        return self.root / "federation.json"

    @property
    def offline(self) -> Path:
        return self.root / "ca-offline"

    @property
    def ca_key(self) -> Path:
        return self.offline / "ca.key"

    @property
    def operator(self) -> Path:
        return self.root / "operator"

    @property
    def signing_key(self) -> Path:
        return self.operator / "app-signing.key"

    @property
    def coordinator(self) -> Path:
        return self.root / "coordinator"

    @property
    def flwr_home(self) -> Path:
        return self.coordinator / "flwr-home"

    @property
    def registry(self) -> Path:
        return self.coordinator / "registry.json"

    @property
    def crl(self) -> Path:
        return self.coordinator / "crl.pem"

    @property
    def sockets(self) -> Path:
        return self.coordinator / "sockets"

    @property
    def fleet_socket(self) -> Path:
        return self.sockets / "fleet.sock"

    @property
    def control_socket(self) -> Path:
        return self.sockets / "control.sock"

    @property
    def runtime(self) -> Path:
        return self.coordinator / "runtime"

    @property
    def edge_pid(self) -> Path:
        return self.runtime / "nginx.pid"

    def public_keys(self, name: str) -> Path:
        """What the coordinator keeps of hospital `name`: its public node key and its certificate."""
        return self.coordinator / "hospitals" / name

    def hospital_dir(self, name: str) -> Path:
        """The public files to send to hospital `name`."""
        return self.root / "hospitals" / name

    def settings(self) -> dict[str, Any]:
        if not self.settings_file.is_file():
            raise FileNotFoundError(f"{self.root} is not a federation folder (no federation.json; "
                                    "create one with `dermfed deploy init`)")
        return json.loads(self.settings_file.read_text())

    def hospitals(self) -> list[str]:
        return [h["name"] for h in self.settings()["hospitals"]]


@dataclass(frozen=True)
class HospitalLayout:
    """A hospital's own folder: its keys (made there) and what the coordinator sent back."""

    root: Path

    @property
    def settings_file(self) -> Path:
        return self.root / "hospital.json"

    @property
    def node_key(self) -> Path:
        return self.root / "auth_key"

    @property
    def trusted_keys(self) -> Path:
        return self.root / "trusted-app-keys.pub"

    @property
    def approved_bundles(self) -> Path:
        return self.root / "approved-bundles"

    @property
    def accepted_runs(self) -> Path:
        return self.root / "accepted-runs.json"

    @property
    def runtime(self) -> Path:
        return self.root / "runtime"

    @property
    def forward_socket(self) -> Path:
        return self.runtime / "sockets" / "forward.sock"

    def settings(self) -> dict[str, Any]:
        if not self.settings_file.is_file():
            raise FileNotFoundError(f"{self.root} has no hospital.json yet: copy in the files the coordinator sent "
                                    "back for this hospital (`dermfed deploy add-hospital` makes them)")
        return json.loads(self.settings_file.read_text())
