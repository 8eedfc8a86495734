"""Writing a run's files so that a failed write never costs the previous good state.

A full disk, a quota, a read-only mount or a kill in the middle of a write must leave the run
folder as it was before the write began. Every checkpoint, history, status and config file of a
run (and every site snapshot) is therefore written here: completely, to a temporary file in the
same folder, flushed to the disk (fsync), and only then renamed over the old one. With
`previous`, the old file is first kept under that name (checkpoint.pt -> checkpoint.prev.pt),
by a hard link, so that at every moment the path holds a complete file.

A failed write removes its temporary file and raises an OSError that names the path it was
writing (a bare `write()` error such as "No space left on device" names none).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (the folder's entry), where the file system allows it."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _named(exc: OSError, path: Path) -> OSError:
    """The same error, naming `path` when the system call named nothing (e.g. ENOSPC from write)."""
    if exc.filename is not None:
        return exc
    return OSError(exc.errno, exc.strerror or str(exc), str(path))  # errno picks the subclass (PermissionError, ...)


@contextmanager
def writing_into(folder: str | Path) -> Iterator[None]:
    """For writers that are not ours (PIL, pandas): an OSError that names no path names `folder`."""
    try:
        yield
    except OSError as exc:
        raise _named(exc, Path(folder)) from None


def atomic_write_bytes(path: str | Path, data: bytes, previous: Optional[str | Path] = None) -> Path:
    """Write `data` to `path` so that `path` always holds either its old content or all of `data`.

    With `previous`, the old file (if any) is kept under that name once the new one is safely on disk.
    """
    return atomic_write_with(path, lambda stream: stream.write(data), previous)


def atomic_write_with(path: str | Path, write: Callable[[BinaryIO], Any], previous: Optional[str | Path] = None) -> Path:
    """As `atomic_write_bytes`, with `write(stream)` filling the temporary file: a large payload (a site's
    snapshot, hundreds of MB) streams to the disk without a second copy of it in memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            with os.fdopen(handle, "wb") as stream:
                write(stream)
                stream.flush()
                os.fsync(stream.fileno())
        except OSError as exc:
            raise _named(exc, path) from None
        except RuntimeError as exc:  # torch.save's zip writer: its stream's OSError (a full disk) comes back as this
            if isinstance(exc.__context__, OSError):
                raise _named(exc.__context__, path) from None
            raise
        if previous is not None and path.is_file():
            _keep_previous(path, Path(previous))
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    _fsync_folder(path.parent)
    return path


def _keep_previous(path: Path, previous: Path) -> None:
    """previous <- path, without a moment in which `path` is missing (a hard link, renamed into place)."""
    staged = previous.with_name(f".{previous.name}.link")
    try:
        staged.unlink(missing_ok=True)
        os.link(path, staged)
        os.replace(staged, previous)
    except OSError:  # a file system without hard links: rename (path is briefly absent; readers fall back)
        staged.unlink(missing_ok=True)
        os.replace(path, previous)


def atomic_write_text(path: str | Path, text: str, previous: Optional[str | Path] = None) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), previous)


def atomic_torch_save(path: str | Path, payload: Any, previous: Optional[str | Path] = None) -> Path:
    """`torch.save` streamed into `path` as `atomic_write_with` writes (a full disk: an OSError naming `path`, which
    torch's zip writer alone would report as a RuntimeError without it), without a copy of the payload in memory."""
    import torch  # here, so that writing a config does not import torch

    return atomic_write_with(path, lambda stream: torch.save(payload, stream), previous)
