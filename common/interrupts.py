"""Ctrl-C and SIGTERM as an exception, so that every `finally` block cleans up on the way out.

Python turns SIGINT into KeyboardInterrupt but lets SIGTERM kill the process at once, with no
message and nothing cleaned up (a half-built cache, a run's processes). `stop_signals_raise`
makes both raise `Interrupted` in the main thread, wherever it is (imports, data preparation,
training, the end of a run). Only the first signal raises: later ones are ignored while the
cleanup the first one started runs to its end (SIGKILL still ends everything at once).

Standard library only: the CLI installs this before it imports anything heavy.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: list[int] = []


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached this process."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def _raise_once(signum: int, _frame: object) -> None:
    if _received:  # already stopping: let that cleanup finish
        return
    _received.append(signum)
    raise Interrupted(signum)


_depth: list[int] = [0]


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within this block (nested blocks share it), the first SIGINT or SIGTERM raises `Interrupted` in the main
    thread; the previous handlers come back at its end (the CLI's `main` called in a test, `run_simulation`)."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_once)
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if _depth[0] == 0:
            _received.clear()
