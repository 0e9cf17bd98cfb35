"""Coverage guard: every coordinate the server updates in a round was trained by at least k of the round's devices.

Under secure aggregation the server learns, per coordinate, the sum over the devices that trained it, and it knows
from its own plans which those are: a coordinate only one device trained comes out as that device's value. The guard
(``flower.secure_min_coverage`` on a secure Flower run, ``fl.min_coverage`` anywhere) wraps any strategy's ``plan``
(wrap, don't fork) and cuts the plans so that never happens: per block, each device's LoRA rank is cut to the k-th
largest rank among the round's sampled devices (rank row j is trained by the devices whose rank exceeds j, so exactly the
rows fewer than k devices train go); a block of another method, or the head, that fewer than k devices train is trained
by none. What is cut is neither trained nor sent, and a strategy that averages coordinates keeps its old value; the
device still applies the block's global tensor, frozen, sent with the plan even where the strategy sends a device only
its own region (LEGEND's default download). A round samples at least k devices (``enough_clients``); each round records
whose plan was cut (``withheld``).

Devices that drop after the plan are not covered by this: the Flower side checks the survivors' coverage again before
SecAgg+ unmasks their sum (``flower/secure.py``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from legend.core import ClientPlan, State
from legend.lora.layout import AdapterLayout

if TYPE_CHECKING:
    from legend.config import Config
    from legend.devices.capacity import DeviceView
    from legend.strategies.base import Strategy

log = logging.getLogger(__name__)

SECURE_FEWEST = 2  # SecAgg+ needs two devices, and a sum over one device is its update


def min_coverage(config: Config) -> int:
    """k: fl.min_coverage, and on a secure Flower run at least flower.secure_min_coverage (k <= 1: no guard)."""
    flower = config.flower
    return max(config.fl.min_coverage, flower.secure_min_coverage if flower.secure_aggregation else 0)


def fewest_clients(config: Config) -> int:
    """A round trains at least this many devices, or none: k under the guard, two under secure aggregation."""
    return max(min_coverage(config), SECURE_FEWEST if config.flower.secure_aggregation else 1)


def enough_clients(clients: list[int], config: Config, round_number: int) -> list[int]:
    """The round's sampled clients, or none (the round is skipped) when fewer than ``fewest_clients`` could be sampled."""
    fewest = fewest_clients(config)
    if 0 < len(clients) < fewest:
        log.warning(
            "round %d: only %d client(s) available, and %s needs %d: the round is skipped",
            round_number,
            len(clients),
            "secure aggregation" if config.flower.secure_aggregation else f"fl.min_coverage={config.fl.min_coverage}",
            fewest,
        )
        return []
    return clients


def kth_largest(values: list[int], k: int) -> int:
    """The k-th largest of ``values`` (0 when there are fewer than k)."""
    return sorted(values, reverse=True)[k - 1] if len(values) >= k else 0


def covered_layouts(layouts: dict[int, AdapterLayout], k: int) -> dict[int, AdapterLayout]:
    """Each layout cut so that every LoRA rank row, other block and head it trains is trained by at least k of ``layouts``.

    bitfit and full layouts train the same tensors on every device: ``enough_clients`` covers them."""
    if k <= 1 or not layouts:
        return dict(layouts)
    blocks = max(len(layout.rank_by_block) for layout in layouts.values())
    ranks = [[layout.rank_by_block[b] for layout in layouts.values() if b < len(layout.rank_by_block)] for b in range(blocks)]
    cuts = [kth_largest(block_ranks, k) for block_ranks in ranks]
    head = sum(layout.train_head for layout in layouts.values()) >= k
    cut = {}
    for client, layout in layouts.items():
        if layout.method == "lora":  # a rank row is trained by the devices of larger rank: keep the rows k of them train
            ranks = tuple(min(rank, top) for rank, top in zip(layout.rank_by_block, cuts))
        else:  # a bottleneck adapter is trained whole: keep the blocks k devices train
            ranks = tuple(rank if top > 0 else 0 for rank, top in zip(layout.rank_by_block, cuts))
        cut[client] = replace(layout, rank_by_block=ranks, train_head=layout.train_head and head)
    return cut


def recut(plan: ClientPlan, layout: AdapterLayout, global_state: State, block_of) -> ClientPlan:
    """The plan of a device whose layout the guard cut: a block it still trains sent at its smaller rank, a block it no
    longer trains sent whole from the global state (the device applies it frozen). A compact plan (LEGEND's own region,
    ``wire`` a part of ``weights``) sends its tensors cut the same way, and each newly frozen block's too."""
    weights, frozen = {}, []
    for key, value in plan.weights.items():
        block = block_of(key)
        if block is None or layout.rank_by_block[block] == plan.layout.rank_by_block[block]:
            weights[key] = value
        elif layout.rank_by_block[block] == 0:
            weights[key] = global_state[key]
            frozen.append(key)
        else:
            weights[key] = value[tuple(slice(0, n) for n in layout.device_shape(key, block, global_state[key].shape))]
    wire = None if plan.wire is None else {key: weights[key] for key in [*plan.wire, *frozen]}
    return replace(plan, layout=layout, weights=weights, wire=wire)


class CoverageGuard:
    """A strategy whose plans are cut by ``covered_layouts``; everything else (aggregation, state, hooks) is its own."""

    def __init__(self, strategy: Strategy, k: int):
        self.strategy, self.k = strategy, k
        self.withheld: tuple[int, list[dict[str, Any]]] = (0, [])  # (round, what its plans lost)

    def __getattr__(self, name: str):
        if name == "strategy":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def plan(self, round_number: int, clients: list[int], global_state: State, devices: DeviceView) -> dict[int, ClientPlan]:
        plans = self.strategy.plan(round_number, clients, global_state, devices)
        layouts = covered_layouts({client: plan.layout for client, plan in plans.items()}, self.k)
        rows, cut = [], dict(plans)
        for client, plan in plans.items():
            if layouts[client] != plan.layout:
                planned, trained = plan.layout, layouts[client]
                rows.append(
                    {
                        "client": client,
                        "planned_rank_by_block": list(planned.rank_by_block),
                        "planned_head": planned.train_head,
                        "rank_by_block": list(trained.rank_by_block),
                        "head": trained.train_head,
                    }
                )
                cut[client] = recut(plan, layouts[client], global_state, self.strategy.info.block_of)
        self.withheld = (round_number, rows)
        return cut


def guarded(strategy: Strategy, config: Config) -> Strategy:
    """The strategy under the coverage guard where the config asks for one (``min_coverage`` > 1), else itself. Only a
    strategy that averages coordinates keeps an untrained coordinate's old value: ``legend/compat.py`` refuses the others."""
    k = min_coverage(config)
    return CoverageGuard(strategy, k) if k > 1 else strategy


def thinly_covered(layouts: dict[int, AdapterLayout], k: int) -> list[int]:
    """The devices among ``layouts`` that train some coordinate fewer than k of them train (``covered_layouts`` would cut them)."""
    cut = covered_layouts(layouts, k)
    return sorted(client for client, layout in layouts.items() if cut[client] != layout)


def withheld(strategy: Strategy, round_number: int) -> list[dict[str, Any]]:
    """What the guard cut from this round's plans: per device, its planned ranks and head and what it trained instead."""
    planned, rows = getattr(strategy, "withheld", (0, []))
    return rows if planned == round_number else []
