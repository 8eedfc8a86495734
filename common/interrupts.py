"""Ctrl-C and SIGTERM as an exception, so that every `finally` block cleans up on the way out.

Python turns SIGINT into KeyboardInterrupt but lets SIGTERM kill the process at once, with no
message and nothing cleaned up (a half-built cache, a run's processes). `raise_on_stop_signals`
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


def raise_on_stop_signals() -> None:
    """From now on, the first SIGINT or SIGTERM raises `Interrupted` in the main thread."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_once)


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """`raise_on_stop_signals` for a block (a library call such as `run_simulation` used without the CLI)."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    raise_on_stop_signals()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
