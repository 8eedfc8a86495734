"""Daemons started together and stopped together (a coordinator's SuperLink and proxy, a hospital's
SuperNode, SuperExec and proxy).

Each child gets its own process group, so that stopping it also stops what it started. When
any child exits, or this process receives SIGINT/SIGTERM, every child is stopped: no half of a
deployment keeps running unnoticed. Children also get PR_SET_PDEATHSIG (Linux), so they receive
SIGTERM if this supervisor is killed outright.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

RUN_MARKER = "DERMFED_RUN_TOKEN"  # environment variable every process of one run inherits

STOP_GRACE_S = 15.0
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass


@dataclass
class Daemon:
    name: str
    command: list[str]
    log: Optional[Path] = None
    process: Optional[subprocess.Popen] = None

    def start(self, env: Optional[dict[str, str]] = None) -> "Daemon":
        sink = open(self.log, "ab") if self.log else None  # noqa: SIM115 - the child owns it from here
        try:
            self.process = subprocess.Popen(self.command, env=env, stdout=sink, stderr=subprocess.STDOUT if sink else None,
                                            preexec_fn=die_with_parent)
        finally:
            if sink:
                sink.close()
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal_group(self, sig: int) -> None:
        if self.running():
            try:
                os.killpg(self.process.pid, sig)  # type: ignore[union-attr]
            except ProcessLookupError:
                pass


def stop_all(daemons: Sequence[Daemon], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM every group, then SIGKILL what is still alive after `grace` seconds."""
    for daemon in daemons:
        daemon.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for daemon in daemons:
        if daemon.process is None:
            continue
        try:
            daemon.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            daemon.signal_group(signal.SIGKILL)
            daemon.process.wait()


def supervise(daemons: Sequence[Daemon], env: Optional[dict[str, str]] = None, poll: float = 0.5) -> int:
    """Start the daemons; return when one exits or a stop signal arrives, after stopping all of them.

    Returns the exit code of the daemon that stopped first (0 after SIGINT/SIGTERM).
    """
    stopping: list[int] = []

    def on_signal(signum, _frame):  # type: ignore[no-untyped-def]
        stopping.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        for daemon in daemons:
            daemon.start(env)
            print(f"started {daemon.name} (pid {daemon.process.pid})", flush=True)  # type: ignore[union-attr]
        while not stopping:
            ended = [d for d in daemons if not d.running()]
            if ended:
                code = ended[0].process.returncode or 1  # type: ignore[union-attr]
                where = f"; see {ended[0].log}" if ended[0].log else ""
                print(f"{ended[0].name} exited with code {ended[0].process.returncode}{where}; stopping the others",  # type: ignore[union-attr]
                      file=sys.stderr, flush=True)
                break
            time.sleep(poll)
    finally:
        stop_all(daemons)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


def marked_processes(token: str, directories: Sequence[str] = ()) -> list[int]:
    """PIDs of this user's processes that belong to a run (Linux /proc): their environment carries
    RUN_MARKER=token, or they hold a file open below one of the run's `directories`.

    A run's processes inherit the marker from the first one started with it, whatever becomes
    of their parents (Ray's daemons start new sessions; a killed parent leaves them to init).
    Processes that rename themselves (Ray's `ray::...` workers call setproctitle, which
    overwrites what /proc shows of their environment) are found by their open log files.
    """
    marker = f"{RUN_MARKER}={token}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as stream:
                if marker in stream.read().split(b"\0"):
                    found.append(int(entry.name))
                    continue
            if directories and _holds_file_below(entry.name, directories):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return found


def _holds_file_below(pid: str, directories: Sequence[str]) -> bool:
    for fd in os.scandir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(fd.path)
        except OSError:
            continue
        if any(target.startswith(directory) for directory in directories):
            return True
    return False


def stop_marked(token: str, directories: Sequence[str] = (), grace: float = 5.0) -> list[int]:
    """SIGTERM every process of the run, then SIGKILL what is left after `grace` seconds; returns the PIDs found."""
    pids = marked_processes(token, directories)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    for pid in marked_processes(token, directories):
        _signal(pid, signal.SIGKILL)
    return pids


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead, awaiting its parent
    except OSError:
        return False
