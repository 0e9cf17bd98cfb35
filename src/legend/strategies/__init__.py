"""One file per federated algorithm, all behind the Strategy interface in base.py."""

from legend.strategies import (  # noqa: F401  (registers them)
    adapter,
    bitfit,
    fedavg_full,
    federa,
    fedex,
    fedit,
    fedprox,
    fedra,
    fedsa,
    ffa,
    flexlora,
    flora,
    hetlora,
    legend,
)
from legend.strategies.base import Strategy
from legend.strategies.registry import STRATEGIES, strategy_class

__all__ = ["STRATEGIES", "Strategy", "strategy_class"]
