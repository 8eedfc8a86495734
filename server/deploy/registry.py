"""The coordinator's registry of node keys: which SuperNode (by the node id its key was registered
under) is which hospital.

Flower assigns a node id when `flwr supernode register` records a public key, and the SuperLink
accepts a SuperNode's messages only when they are signed with the key of that node id. So the
node id of a reply is the key's identity, and the registry turns it into a site name and index.
What a node says about itself (its `site-name`, `site-index`) is never used for that: a node
whose id is not in the registry gets no weights and its replies are left out.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class RegisteredSite:
    name: str
    index: int
    public_key_sha256: str


@dataclass
class SiteRegistry:
    sites: dict[int, RegisteredSite]

    @classmethod
    def load(cls, path: Path | str) -> "SiteRegistry":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"site registry {path} not found (written by `dermfed deploy register`)")
        raw = json.loads(path.read_text())
        return cls({int(node): RegisteredSite(**entry) for node, entry in raw["sites"].items()})

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"sites": {str(k): asdict(v) for k, v in sorted(self.sites.items())}}, indent=1))
        return path

    def site(self, node_id: int) -> Optional[RegisteredSite]:
        return self.sites.get(int(node_id))
