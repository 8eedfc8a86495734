"""Where a federation's files live, and what each folder is for.

    FEDERATION/
      federation.json         host, ports, hospitals (name, index)
      COMMANDS.md             the exact commands of this federation
      ca-offline/ca.key       the CA's private key: move it offline after `deploy init`
      coordinator/            stays on the coordinator's server
        ca.crt, superlink.crt/.key (loopback TLS), edge.crt/.key (public TLS),
        app-signing.key/.pub (signs the app bundle), flwr-home/, registry.json, runtime/
      hospitals/NAME/         copied to hospital NAME only, by a secure channel
        ca.crt, auth_key (+ .pub), client.crt/.key (mutual TLS), trusted-app-keys.pub,
        hospital.json, START.md
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONNECTION = "dermfed"  # the coordinator's flwr connection name (flwr-home/config.toml)


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
    def coordinator(self) -> Path:
        return self.root / "coordinator"

    @property
    def flwr_home(self) -> Path:
        return self.coordinator / "flwr-home"

    @property
    def registry(self) -> Path:
        return self.coordinator / "registry.json"

    @property
    def runtime(self) -> Path:
        return self.coordinator / "runtime"

    def hospital_dir(self, name: str) -> Path:
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
    """The folder a hospital received: everything its daemon needs, and nothing of anyone else's."""

    root: Path

    @property
    def settings_file(self) -> Path:
        return self.root / "hospital.json"

    @property
    def runtime(self) -> Path:
        return self.root / "runtime"

    def settings(self) -> dict[str, Any]:
        if not self.settings_file.is_file():
            raise FileNotFoundError(f"{self.root} is not a hospital folder from `dermfed deploy init` "
                                    "(no hospital.json)")
        return json.loads(self.settings_file.read_text())
