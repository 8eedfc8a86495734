"""Extensions defined outside the package: modules named in `DERMFED_PLUGINS` (comma-separated).

A registry imports them after its built-in entries, so an entry registered by such a module (a
test's toy strategy, a hospital's own module) is known in every process of a run: the
SuperExec's ServerApp and each simulated hospital inherit the environment of `dermfed
simulate`. The variable belongs to the environment of the process, never to the run config:
the coordinator, who controls the run config, cannot make a site import code.
"""

from __future__ import annotations

import importlib
import os

ENV_VAR = "DERMFED_PLUGINS"


class PluginError(ImportError):
    """A module named in DERMFED_PLUGINS cannot be imported."""


def plugin_modules() -> list[str]:
    return [name.strip() for name in os.environ.get(ENV_VAR, "").split(",") if name.strip()]


def import_plugins() -> None:
    for name in plugin_modules():
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise PluginError(f"{ENV_VAR} names {name!r}, which cannot be imported ({exc}); "
                              "put its folder on PYTHONPATH or remove it from the variable") from exc
