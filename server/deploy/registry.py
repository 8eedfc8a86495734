"""The coordinator's registry of node keys: which SuperNode (by the node id its key was registered
under) is which hospital, and the public key its replies must be signed with.

Flower assigns a node id when `flwr supernode register` records a public key, and the SuperLink
accepts a SuperNode's requests only when they are signed with the key of that node id. So the
node id of a reply is the key's identity, and the registry turns it into a site name and index.
What a node says about itself (its `site-name`, `site-index`) is never used for that: a node
whose id is not in the registry, or whose hospital was revoked, gets no weights and its replies
are left out; a reply whose signature does not verify against its node's key is left out too
(`common.reply_signature`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from common.deployment.files import replace_file


@dataclass(frozen=True)
class RegisteredSite:
    name: str
    index: int
    public_key_sha256: str
    public_key: str = ""  # the node key's OpenSSH line: replies are verified with it
    revoked: bool = False


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
        text = json.dumps({"sites": {str(k): asdict(v) for k, v in sorted(self.sites.items())}}, indent=1)
        return replace_file(Path(path), text.encode(), mode=0o600)

    def site(self, node_id: int) -> Optional[RegisteredSite]:
        """The hospital of a node id, if it is registered and not revoked."""
        entry = self.sites.get(int(node_id))
        return entry if entry is not None and not entry.revoked else None

    def node_of(self, name: str) -> Optional[int]:
        return next((node for node, site in self.sites.items() if site.name == name), None)
