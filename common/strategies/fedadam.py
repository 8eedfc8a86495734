"""FedAdam: the mean update applied by an Adam optimizer at the server; no client hook.

Flower's FedAdam keeps its moments (`m_t`, `v_t`) on the strategy; the server's checkpoint saves
them so that a resumed run continues them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common.strategies.base import Strategy, register

if TYPE_CHECKING:
    from common.config import DermFedConfig


def _server_kwargs(config: "DermFedConfig") -> dict[str, Any]:
    fed = config.federation
    return dict(eta=fed.server_lr, eta_l=config.train.lr, beta_1=fed.server_beta_1, beta_2=fed.server_beta_2,
                tau=fed.server_tau)


FEDADAM = register(Strategy(name="fedadam", flower_class="FedAdam",
                            config_keys=("server_lr", "server_beta_1", "server_beta_2", "server_tau"),
                            server_kwargs=_server_kwargs))
