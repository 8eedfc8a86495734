"""Aggregation strategies: one module per strategy, each registering its server side and client hook.

Adding a strategy is one module that calls `register(Strategy(...))` (see `fedprox.py` for one
with a client hook) plus its test. The built-in entries are imported here; a strategy defined
outside this package is known to every process of a run when its module is named in the
`DERMFED_PLUGINS` environment variable (`common.plugins`).
"""

from common.strategies.base import (STRATEGIES, ClientHook, Strategy, UnknownStrategy, bind_by_identity, client_hooks,
                                    register, strategy_named, strategy_names)
from common.strategies import fedavg, fedprox, fedadam, fedmedian  # noqa: F401,E402,I001  (built-ins register themselves, in this order)
from common.plugins import import_plugins  # noqa: E402

import_plugins()

__all__ = ["STRATEGIES", "ClientHook", "Strategy", "UnknownStrategy", "bind_by_identity", "client_hooks", "register",
           "strategy_named", "strategy_names"]
