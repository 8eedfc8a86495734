"""Real processes of a running `dermfed simulate`: start one, find its process tree, wait for its rounds,
resume it. No fixed sleep decides anything: every wait polls a condition under a generous ceiling."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def process_tree(roots) -> set[int]:
    """The processes `roots` and every process below them, read from /proc (the parent of each live process)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                parent = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = set(), list(roots)
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack += children.get(pid, [])
    return found


def descendants(root: int) -> set[int]:
    """Every process below `root` (not `root` itself)."""
    return process_tree([root]) - {root}


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    try:
        return f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return f"{pid}: (gone)"


def start_simulation(run: Path, workdir: Path, *overrides: str) -> subprocess.Popen:
    """A simulation whose hospital 2 hangs in round 2: the signal surely arrives mid-run, all processes up."""
    command = [str(BIN / "dermfed"), "simulate", "--config", "smoke", "--out", str(run), "--fault-injection", "1:hang:2",
               f"data.root={workdir / 'data'}", f"data.cache_dir={workdir / 'cache'}", "federation.round_timeout=600",
               *overrides]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


CEILING_S = 900.0  # generous: a condition that has not come true by then never will, even on a loaded machine


def wait_until(condition, process: subprocess.Popen, what: str, timeout: float = CEILING_S) -> None:
    """Poll `condition` while `process` lives; no fixed sleep decides anything."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"exited with {process.returncode} before {what}: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(0.2)


def rounds_in_history(run: Path) -> list[int]:
    try:
        return [entry["round"] for entry in json.loads((run / "history.json").read_text())]
    except (OSError, ValueError):
        return []


def wait_for_round(run: Path, process: subprocess.Popen, round_number: int = 1) -> None:
    wait_until(lambda: round_number in rounds_in_history(run), process, f"round {round_number} completed")


def resume_simulation(run: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen([str(BIN / "dermfed"), "simulate", "--resume", str(run), *overrides], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def refused_resume(capsys, run: Path, *overrides: str) -> tuple[int, str]:
    """A resume that must be refused before it starts anything: run in this process (no start-up cost)."""
    from server.cli import main

    capsys.readouterr()
    code = main(["simulate", "--resume", str(run), *overrides])
    return code, capsys.readouterr().err


