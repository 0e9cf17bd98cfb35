"""Strategies are registered by name once; a duplicate name is a programming error."""

from __future__ import annotations

from legend.errors import LegendError

STRATEGIES: dict[str, type] = {}


def register(cls):
    if cls.name in STRATEGIES:
        raise ValueError(f"strategy '{cls.name}' is registered twice")
    STRATEGIES[cls.name] = cls
    return cls


def strategy_class(name: str) -> type:
    if name not in STRATEGIES:
        raise LegendError(f"strategy.name '{name}' is unknown: use one of {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]
