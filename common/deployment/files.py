"""Files of a federation written as what they are: private keys and state for their owner only.

Every private key goes through `write_private`: the file is created with mode 0600 by `os.open`,
so it is never readable by others, not even for the instant between creation and a `chmod`,
and an existing file is never overwritten. `replace_file` writes state (registries, ledgers,
revocation lists) atomically and durably through `common.run_files`, never readable by others
before it has the mode it is given.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from common.run_files import atomic_write_bytes

PRIVATE_MODE = 0o600


def write_private(path: Path, data: bytes) -> Path:
    """Create `path` with mode 0600 from its first byte; refuse to replace an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(data)
    return path


def write_public(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def replace_file(path: Path, data: bytes, mode: int = PRIVATE_MODE) -> Path:
    """Write `path` atomically and durably (see `common.run_files`), then give it `mode`."""
    atomic_write_bytes(path, data)  # created 0600 by mkstemp: never readable by others in between
    if mode != PRIVATE_MODE:
        os.chmod(path, mode)
    return Path(path)


def private_folder(path: Path) -> Path:
    """A folder only its owner can open (created 0700, or tightened to 0700)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def open_to_others(path: Path) -> bool:
    """True when accounts other than the owner may read, write or enter `path`."""
    return bool(stat.S_IMODE(path.stat().st_mode) & 0o077)
