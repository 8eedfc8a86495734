"""FedAvg: the weighted mean of the sites' weights (weights: each site's `num-examples`); no client hook."""

from common.strategies.base import Strategy, register

FEDAVG = register(Strategy(name="fedavg", flower_class="FedAvg"))
