"""One console line per log event in the processes Flower starts (the ServerApp's, the ClientApps' Ray actors).

Opacus calls `logging.basicConfig` when it is imported (`opacus.utils.module_utils`), which gives the root logger
a stderr handler of its own. In a process of ours that handler is harmless (`dermfed` configures logging first,
so Opacus's call does nothing); in a process Flower started, where nothing configured the root logger, it
repeated every record of Flower's logger (which prints its own, and propagates) with a timestamp, DEBUG
included: every Flower line twice. The Flower adapters call `one_line_per_event` once their imports are done.
Without a root handler, warnings and errors of other loggers (a site's "could not answer", with its traceback)
still reach stderr, through Python's last-resort handler.
"""

from __future__ import annotations

import logging

OPACUS_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"  # opacus/utils/module_utils.py's basicConfig


def _is_opacus_handler(handler: logging.Handler) -> bool:
    formatter = handler.formatter
    return (type(handler) is logging.StreamHandler and formatter is not None
            and getattr(formatter, "_fmt", None) == OPACUS_FORMAT)


def one_line_per_event() -> int:
    """Remove the root handler Opacus's import installed; returns how many were removed."""
    root = logging.getLogger()
    found = [handler for handler in root.handlers if _is_opacus_handler(handler)]
    for handler in found:
        root.removeHandler(handler)
    return len(found)
