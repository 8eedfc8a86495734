"""A private network for a group of processes: no other account on the machine can reach their ports.

Flower 1.42's SuperLink serves its Control API (run submission, node registration, logs)
without account authentication on the one port it listens on, and a hospital's SuperNode serves
its local app API in plain HTTP. On a shared machine, any account can connect to a loopback
port. DermFed therefore runs these daemons inside a network namespace of their own (Linux),
created through a user namespace so that no root privilege is needed at run time: inside it
they listen on 127.0.0.1 as usual, but that loopback is not the machine's, and nothing of the
host can connect to it.

What must cross the wall crosses it through Unix sockets in a folder only the owner's account
can open (mode 0700), relayed byte for byte by this process:

- `expose`: a Unix socket outside that leads to a TCP port inside (the coordinator's edge proxy
  reaches the SuperLink's Fleet API this way; the operator's commands reach its Control API);
- `connect`: a TCP port inside that leads to a Unix socket outside (a hospital's SuperNode
  reaches its forwarder; an operator's `flwr` reaches the Control API socket).

Run as `python -m common.deployment.sandbox SPEC_JSON`; `probe()` says whether the kernel
allows it. Children are started with umask 077 (what they write is their owner's only) and
without capabilities (the same uid inside as outside).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the final NUL
_CHUNK = 1 << 16
_PR_SET_PDEATHSIG = 1

HINT = ("DermFed keeps the SuperLink's and the SuperNode's ports in a private network namespace, so that no other "
        "account on this machine can reach them; it needs unprivileged user namespaces (Debian/Ubuntu: "
        "`sysctl kernel.unprivileged_userns_clone=1`; Ubuntu 23.10+: `sysctl "
        "kernel.apparmor_restrict_unprivileged_userns=0` or an AppArmor profile that allows `userns`; in a "
        "container: a seccomp profile that allows unshare(CLONE_NEWUSER))")


class NamespaceUnavailable(RuntimeError):
    """The kernel refuses a private network namespace to this account."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _loopback_up() -> None:
    """`ip link set lo up`, without iproute2: the SIOCSIFFLAGS ioctl on a struct ifreq."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(probe, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(probe, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


def enter_private_network() -> None:
    """Move this (single-threaded) process into a new user and network namespace with loopback up.

    The uid and gid map to themselves, so files keep their owners and children exec'd inside
    hold no capabilities; only this process, before it starts any child, may configure `lo`.
    """
    uid, gid = os.getuid(), os.getgid()
    if _libc().unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise NamespaceUnavailable(f"unshare(CLONE_NEWUSER|CLONE_NEWNET) failed: {errno.errorcode.get(code, code)} "
                                   f"({os.strerror(code)}). {HINT}")
    try:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
        _loopback_up()
    except OSError as exc:
        raise NamespaceUnavailable(f"a private network namespace was created but cannot be set up ({exc}). "
                                   f"{HINT}") from None


# -- relays ------------------------------------------------------------------------------------


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _bridge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream) -> None:  # type: ignore[no-untyped-def]
    try:
        up_reader, up_writer = await upstream()
    except OSError:
        writer.close()
        return
    await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
    for stream in (writer, up_writer):
        stream.close()


def unix_socket_path(path: Path) -> str:
    text = str(Path(path).resolve())
    if len(text.encode()) > UNIX_PATH_MAX:
        raise ValueError(f"the socket path {text} is longer than {UNIX_PATH_MAX} bytes, the kernel's limit; "
                         "use a federation or hospital folder with a shorter path")
    return text


async def _serve(expose: Sequence[tuple[str, int]], connect: Sequence[tuple[int, str]],
                 ready: threading.Event) -> None:
    servers = []
    for path, port in expose:  # outside Unix socket -> inside 127.0.0.1:port
        Path(path).unlink(missing_ok=True)
        servers.append(await asyncio.start_unix_server(
            lambda r, w, p=port: _bridge(r, w, lambda: asyncio.open_connection("127.0.0.1", p)), path=path))
        os.chmod(path, 0o600)
    for port, path in connect:  # inside 127.0.0.1:port -> outside Unix socket
        servers.append(await asyncio.start_server(
            lambda r, w, s=path: _bridge(r, w, lambda: asyncio.open_unix_connection(s)), "127.0.0.1", port))
    ready.set()
    await asyncio.gather(*(server.serve_forever() for server in servers))


def start_relays(expose: Sequence[tuple[str, int]], connect: Sequence[tuple[int, str]]) -> None:
    """Run the relays in a background thread; return once every socket listens."""
    ready = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(_serve(expose, connect, ready))
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            failure.append(exc)
            ready.set()

    threading.Thread(target=run, name="relays", daemon=True).start()
    ready.wait()
    if failure:
        raise failure[0]


# -- entry point -------------------------------------------------------------------------------


def spec_command(expose: Sequence[tuple[Path, int]] = (), connect: Sequence[tuple[int, Path]] = (),
                 command: Optional[Sequence[str]] = None, daemons: Sequence[dict[str, Any]] = ()) -> list[str]:
    """The command line that runs `command` (stdio inherited, its exit code returned) or supervises
    `daemons` ({"name", "command", "log"}) inside a private network with these relays."""
    spec = {"expose": [[unix_socket_path(p), int(port)] for p, port in expose],
            "connect": [[int(port), unix_socket_path(p)] for port, p in connect],
            "command": list(command) if command else None, "daemons": list(daemons)}
    return [sys.executable, "-m", "common.deployment.sandbox", json.dumps(spec)]


def probe() -> Optional[str]:
    """None when this account can create a private network with loopback up; else why not."""
    result = subprocess.run([sys.executable, "-m", "common.deployment.sandbox", "--probe"], capture_output=True,
                            text=True)
    return None if result.returncode == 0 else (result.stderr.strip() or f"exit code {result.returncode}")


def main(argv: Sequence[str]) -> int:
    os.umask(0o077)
    try:
        enter_private_network()
    except NamespaceUnavailable as exc:
        print(f"dermfed sandbox: {exc}", file=sys.stderr)
        return 3
    if argv[:1] == ["--probe"]:
        return 0
    _die_with_parent_again()
    spec = json.loads(argv[0])
    start_relays([tuple(e) for e in spec["expose"]], [tuple(c) for c in spec["connect"]])
    if spec.get("command"):
        return _run_forwarding_signals(spec["command"])
    from common.processes import Daemon, supervise

    daemons = [Daemon(d["name"], d["command"], Path(d["log"]) if d.get("log") else None) for d in spec["daemons"]]
    return supervise(daemons)


def _die_with_parent_again() -> None:
    """The supervisor outside armed PR_SET_PDEATHSIG before exec; arm it again after the namespace change."""
    _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _run_forwarding_signals(command: Sequence[str]) -> int:
    """Run one command; SIGINT/SIGTERM to this process go to it, and its exit code is ours."""
    child = subprocess.Popen(command, preexec_fn=_die_with_parent_again)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    while True:
        try:
            return child.wait()
        except InterruptedError:
            continue


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
