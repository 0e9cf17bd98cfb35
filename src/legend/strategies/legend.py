"""LEGEND (arXiv 2412.20004): LoRA depth per device from its capacity, ranks that grow toward the output.

The global rank vector r_0..r_{N-1} is zero below the deepest LoRA block and non-decreasing toward
the output. A device of depth d trains blocks N-d..N-1 at those ranks (optionally capped, nested
truncation) and applies the current global adapters below its region, frozen. Each round the sampled
devices are configured greedily: T* = the slowest one's estimated depth-1 time x (1 + slack); each
takes the deepest depth (then the largest rank cap) whose estimated time fits T* and whose memory
fits. The server averages each coordinate over the devices that trained it. docs/legend.md has every
design choice and its knob.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass
from typing import Any

import numpy as np

from legend.core import ClientPlan, State, Update
from legend.devices.capacity import Capacity, DeviceView, estimate_round, lora_numel
from legend.devices.clock import RoundTime
from legend.devices.cost import applied_ranks
from legend.errors import LegendError
from legend.lora.layout import AdapterLayout, cut_to_layout
from legend.strategies.aggregate import masked_average, robust_updates, sample_weights
from legend.strategies.base import Strategy
from legend.strategies.registry import register
from legend.wire import wire_bytes


def rank_distribution(num_blocks: int, depth: int, r_min: int, r_max: int, shape: str) -> tuple[int, ...]:
    """Global ranks per block: zero below the ``depth`` top blocks, then a ramp from r_min up to r_max."""
    steps = np.linspace(0.0, 1.0, depth) if depth > 1 else np.ones(1)
    if shape == "uniform":
        ramp = np.full(depth, float(r_max))
    elif shape == "linear":
        ramp = r_min + steps * (r_max - r_min)
    else:  # geometric
        ramp = r_min * (r_max / r_min) ** steps
    return (0,) * (num_blocks - depth) + tuple(int(round(r)) for r in ramp)


def device_layout(global_ranks: tuple[int, ...], depth: int, cap: int) -> AdapterLayout:
    """The top ``depth`` blocks at the global ranks, each capped at ``cap``."""
    first = len(global_ranks) - depth
    return AdapterLayout("lora", tuple(min(r, cap) if i >= first else 0 for i, r in enumerate(global_ranks)))


@dataclass(frozen=True)
class Assignment:
    """One device's configuration for a round and what the planner expects it to cost."""

    depth: int
    cap: int
    layout: AdapterLayout
    estimate: RoundTime


def estimate_layout(view: DeviceView, client: int, layout: AdapterLayout, global_layout: AdapterLayout) -> RoundTime:
    """Down: every global adapter the device applies (its region at its own ranks) and the head; up: its region and the head."""
    applied = applied_ranks(layout, global_layout)
    down = wire_bytes(lora_numel(view.spec, applied), view.wire_dtype)
    up = wire_bytes(lora_numel(view.spec, layout.rank_by_block), view.wire_dtype)
    return estimate_round(view, client, layout, applied, down, up)


def configure(view: DeviceView, clients: list[int], global_ranks: tuple[int, ...], slack: float, rank_cap: bool) -> dict[int, Assignment]:
    """Greedy depth (and rank cap) per device within T* = slowest depth-1 time x (1 + slack) and its memory."""
    global_layout = AdapterLayout("lora", global_ranks)
    caps = sorted({r for r in global_ranks if r > 0}, reverse=True)
    caps = caps if rank_cap else caps[:1]

    def assign(client: int, depth: int, cap: int) -> Assignment:
        layout = device_layout(global_ranks, depth, cap)
        return Assignment(depth, cap, layout, estimate_layout(view, client, layout, global_layout))

    target = (1 + slack) * max(assign(c, 1, caps[0]).estimate.total_s for c in clients)
    plan = {}
    for client in clients:
        memory = view.capacity[client].memory_gb * 1e9
        candidates = (assign(client, d, cap) for d in range(global_layout.depth, 0, -1) for cap in caps)  # deepest first, then largest cap
        fitting = (a for a in candidates if a.estimate.total_s <= target and a.estimate.memory_bytes <= memory)
        plan[client] = next(fitting, assign(client, 1, caps[-1]))  # nothing fits its memory: the smallest plan, refused by the engine
    return plan


@register
class Legend(Strategy):
    name = "legend"
    averages_coordinates = True

    def __init__(self, config, info):
        super().__init__(config, info)
        cfg = config.legend
        top = config.lora.top_blocks
        if cfg.max_depth and top and cfg.max_depth != top:
            raise LegendError(f"legend.max_depth ({cfg.max_depth}) and lora.top_blocks ({top}) both set LEGEND's global depth: set one of them")
        depth = min(cfg.max_depth or top or math.ceil(2 * info.num_blocks / 3), info.num_blocks)  # 0: MiniLM's 6 blocks -> 4
        self.global_ranks = rank_distribution(info.num_blocks, depth, cfg.r_min, cfg.r_max, cfg.ranks)
        self.snapshot: dict[int, Capacity] = {}  # the estimates of the last re-plan

    def global_layout(self) -> AdapterLayout:
        return AdapterLayout("lora", self.global_ranks)

    @property
    def lora_alpha(self) -> float | tuple[float, ...]:
        """'uniform' scaling: alpha_l = s r_l with s = lora.alpha / lora.r, so every block's adapter is scaled as FedIT's."""
        lora = self.config.lora
        return tuple(lora.alpha / lora.r * r for r in self.global_ranks) if self.config.legend.scaling == "uniform" else lora.alpha

    def plan(self, round_number: int, clients: list[int], global_state: State, devices: DeviceView) -> dict[int, ClientPlan]:
        cfg = self.config.legend
        if (round_number - 1) % cfg.replan_every == 0 or not self.snapshot:
            self.snapshot = dict(devices.capacity)
        view = DeviceView(devices.spec, self.snapshot, devices.workload, devices.wire_dtype)
        assignments = configure(view, clients, self.global_ranks, cfg.slack, cfg.rank_cap)
        lr = self.lr(round_number)
        # the whole global state goes down (the device applies every global adapter), its region cut to its ranks
        return {c: ClientPlan(c, a.layout, cut_to_layout(global_state, a.layout, self.info.block_of), lr) for c, a in assignments.items()}

    def aggregate(self, round_number: int, global_state: State, updates: list[Update]) -> State:
        """Each coordinate: the sample-weighted mean (or fl.aggregator's robust rule) over the devices that trained it; the rest keeps its value."""
        fl = self.config.fl
        if fl.aggregator != "mean":
            return {**global_state, **robust_updates(global_state, updates, fl.aggregator, fl.trim_fraction)}
        weights = sample_weights(updates)
        new = dict(global_state)
        for key in {k for u in updates for k in u.weights}:
            covering = [(u.weights[key], w) for u, w in zip(updates, weights, strict=True) if key in u.weights]
            new[key] = masked_average(global_state[key], [t for t, _ in covering], [w for _, w in covering])
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"snapshot": {c: astuple(e) for c, e in self.snapshot.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshot = {int(c): Capacity(*values) for c, values in state["snapshot"].items()}
