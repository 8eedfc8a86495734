"""FedMedian: the element-wise median of the sites' weights (robust to a few outlying sites); no client hook."""

from common.strategies.base import Strategy, register

FEDMEDIAN = register(Strategy(name="fedmedian", flower_class="FedMedian"))
