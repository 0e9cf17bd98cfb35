"""LEGEND (arXiv 2412.20004): per device, a LoRA depth counted from the output and a rank distribution over those blocks.

The global ranks R_0..R_{N-1} are zero below the deepest LoRA block and non-decreasing toward the output;
every device's ranks are leading slices of them, so aggregation stays aligned per block and per rank row.
Planners (``legend.planner``): 'depth' gives each device the deepest top-block region whose estimated time fits
T* = the slowest device's depth-1 time x (1 + slack), at the global ranks; 'joint' configures depth and ranks
together: each device greedily adds the (block, rank rows) increment of highest worth per second of its estimated
round, and the round's deadline is the one that buys the most estimated progress per second ('ranks' keeps the global
depth, 'global' plans nothing). The server averages each coordinate over the devices that trained it.
docs/legend.md has the problem, the algorithm and every design choice with its knob.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass
from typing import Any

import numpy as np
import torch

from legend.core import ClientPlan, State, Update
from legend.devices.capacity import Capacity, DeviceView, estimate_round, lora_numel
from legend.devices.clock import RoundTime
from legend.devices.cost import applied_ranks
from legend.errors import LegendError
from legend.lora.layout import AdapterLayout, cut_to_layout
from legend.strategies.aggregate import masked_average, robust_updates, sample_step_weights, sample_weights
from legend.strategies.base import COORDINATE_MEANS, LORA_ONLY, Strategy
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


def global_ranks_of(config, num_blocks: int) -> tuple[int, ...]:
    """legend.rank_by_block as given, or the ramp of legend.ranks over the global depth."""
    cfg = config.legend
    if cfg.rank_by_block:
        ranks = tuple(cfg.rank_by_block)
        if len(ranks) != num_blocks or min(ranks) < 0 or max(ranks) == 0:
            raise LegendError(
                f"legend.rank_by_block {list(ranks)} must give one rank >= 0 for each of the model's {num_blocks} blocks, "
                "input first, not all 0: e.g. " + str([0] * (num_blocks - 2) + [8, 16])
            )
        return ranks
    top = config.lora.top_blocks
    if cfg.max_depth and top and cfg.max_depth != top:
        raise LegendError(f"legend.max_depth ({cfg.max_depth}) and lora.top_blocks ({top}) both set LEGEND's global depth: set one of them")
    depth = min(cfg.max_depth or top or math.ceil(2 * num_blocks / 3), num_blocks)  # 0: MiniLM's 6 blocks -> 4
    return rank_distribution(num_blocks, depth, cfg.r_min, cfg.r_max, cfg.ranks)


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


def estimate_layout(view: DeviceView, client: int, layout: AdapterLayout, global_layout: AdapterLayout, whole: bool = True) -> RoundTime:
    """Down: every global adapter the device applies (its region at its own ranks) and the head, or with ``whole`` False
    its region and the head only (legend.download = "region"); up: its region and the head."""
    applied = applied_ranks(layout, global_layout)
    down = wire_bytes(lora_numel(view.spec, applied if whole else layout.rank_by_block), view.wire_dtype)
    up = wire_bytes(lora_numel(view.spec, layout.rank_by_block), view.wire_dtype)
    return estimate_round(view, client, layout, applied, down, up)


def configure_depth(
    view: DeviceView, clients: list[int], global_ranks: tuple[int, ...], slack: float, rank_cap: bool, whole: bool = True
) -> dict[int, Assignment]:
    """Greedy depth (and rank cap) per device within T* = slowest depth-1 time x (1 + slack) and its memory."""
    global_layout = AdapterLayout("lora", global_ranks)
    caps = sorted({r for r in global_ranks if r > 0}, reverse=True)
    caps = caps if rank_cap else caps[:1]

    def assign(client: int, depth: int, cap: int) -> Assignment:
        layout = device_layout(global_ranks, depth, cap)
        return Assignment(depth, cap, layout, estimate_layout(view, client, layout, global_layout, whole))

    target = (1 + slack) * max(assign(c, 1, caps[0]).estimate.total_s for c in clients)
    plan = {}
    for client in clients:
        memory = view.capacity[client].memory_gb * 1e9
        candidates = (assign(client, d, cap) for d in range(global_layout.depth, 0, -1) for cap in caps)  # deepest first, then largest cap
        fitting = (a for a in candidates if a.estimate.total_s <= target and a.estimate.memory_bytes <= memory)
        plan[client] = next(fitting, assign(client, 1, caps[-1]))  # nothing fits its memory: the smallest plan, refused by the engine
    return plan


@dataclass(frozen=True)
class Worth:
    """The joint planner's model of what a layout is worth to a round: sum over blocks of
    gamma^(N-1-l) (1 - exp(-r_l / rho)). A block nearer the output is worth more (gamma <= 1), and each block's
    worth saturates in its rank (rho): the coupled depth-and-rank study in docs/legend.md is where they come from."""

    depth_decay: float
    rank_scale: float

    def of(self, ranks: tuple[int, ...]) -> float:
        top = len(ranks) - 1
        return sum(self.depth_decay ** (top - block) * (1.0 - math.exp(-rank / self.rank_scale)) for block, rank in enumerate(ranks))


def greedy_path(
    view: DeviceView, client: int, global_ranks: tuple[int, ...], worth: Worth, fixed_depth: bool = False, whole: bool = True
) -> list[Assignment]:
    """One device's layouts from the smallest (the top block at rank 1; with ``fixed_depth`` every global block at rank 1)
    upward, each step the increment of highest worth per estimated second that fits its memory: one more rank row in a
    block of its region (ranks stay non-decreasing toward the output and within the global ones), or one more block below
    it at any rank up to the block above's. The path ends when nothing more fits or every rank is global."""
    global_layout = AdapterLayout("lora", global_ranks)
    memory = view.capacity[client].memory_gb * 1e9
    n = len(global_ranks)
    start = tuple(min(1, r) for r in global_ranks) if fixed_depth else (0,) * (n - 1) + (1,)

    def assign(ranks: tuple[int, ...]) -> Assignment:
        layout = AdapterLayout("lora", ranks)
        return Assignment(layout.depth, max(ranks), layout, estimate_layout(view, client, layout, global_layout, whole))

    path = [assign(start)]
    while True:
        ranks = path[-1].layout.rank_by_block
        lowest = n - path[-1].depth
        steps = [
            ranks[:b] + (ranks[b] + 1,) + ranks[b + 1 :]
            for b in range(lowest, n)
            if ranks[b] < global_ranks[b] and (b == n - 1 or ranks[b] < ranks[b + 1])
        ]
        if not fixed_depth and lowest > 0 and global_ranks[lowest - 1] > 0:
            below = lowest - 1
            steps += [ranks[:below] + (r,) + ranks[below + 1 :] for r in range(1, min(global_ranks[below], ranks[lowest]) + 1)]
        here, here_worth = path[-1].estimate.total_s, worth.of(ranks)
        best, best_rate = None, -math.inf
        for candidate in map(assign, steps):
            if candidate.estimate.memory_bytes > memory:
                continue
            gain, cost = worth.of(candidate.layout.rank_by_block) - here_worth, candidate.estimate.total_s - here
            rate = math.inf if cost <= 0 else gain / cost
            if rate > best_rate:
                best, best_rate = candidate, rate
        if best is None:
            return path
        path.append(best)


def within(path: list[Assignment], deadline: float) -> Assignment:
    """The furthest point of a device's path reached before any step overruns the deadline (at least its first)."""
    reached = path[0]
    for point in path[1:]:
        if point.estimate.total_s > deadline:
            break
        reached = point
    return reached


def configure_joint(
    view: DeviceView, clients: list[int], global_ranks: tuple[int, ...], worth: Worth, fixed_depth: bool = False, whole: bool = True
) -> dict[int, Assignment]:
    """Depth and ranks per device, and the round's deadline T*: among the times the devices' paths reach, the one that
    maximises the round's estimated progress per second, (sum_k n_k worth_k(T) / sum_k n_k) / T, where n_k is the
    number of sequences the device trains this round; T* is never below the slowest device's smallest layout (every device trains)."""
    paths = {c: greedy_path(view, c, global_ranks, worth, fixed_depth, whole) for c in clients}
    samples = {c: max(view.workload[c].sequences, 1) for c in clients}
    floor = max(path[0].estimate.total_s for path in paths.values())
    deadlines = sorted({p.estimate.total_s for path in paths.values() for p in path if p.estimate.total_s >= floor})

    def progress_per_second(deadline: float) -> float:
        reached = {c: within(path, deadline) for c, path in paths.items()}
        mean = sum(samples[c] * worth.of(a.layout.rank_by_block) for c, a in reached.items()) / sum(samples.values())
        return mean / deadline

    deadline = max(deadlines, key=progress_per_second)  # ties: the earliest (max keeps the first)
    return {c: within(path, deadline) for c, path in paths.items()}


@register
class Legend(Strategy):
    name = "legend"
    supports = COORDINATE_MEANS | LORA_ONLY

    def __init__(self, config, info):
        super().__init__(config, info)
        self.global_ranks = global_ranks_of(config, info.num_blocks)
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
        layouts = {c: a.layout for c, a in self.configure(view, clients).items()}
        lr = self.lr(round_number)
        return {c: self.client_plan(c, layout, global_state, lr) for c, layout in layouts.items()}

    def client_plan(self, client: int, layout: AdapterLayout, global_state: State, lr: float) -> ClientPlan:
        """legend.download = "all": the whole global state goes down (the device applies every global adapter below its region,
        frozen), its region cut to its ranks. "region": only its region and the head go down (``wire``); the adapters below are
        zero on the device, so it trains on the pre-trained blocks there."""
        weights = cut_to_layout(global_state, layout, self.info.block_of)
        if self.config.legend.download == "all":
            return ClientPlan(client, layout, weights, lr)
        below = {k for k in weights if (b := self.info.block_of(k)) is not None and layout.rank_by_block[b] == 0}
        return ClientPlan(
            client,
            layout,
            {k: torch.zeros_like(v) if k in below else v for k, v in weights.items()},
            lr,
            wire={k: v for k, v in weights.items() if k not in below},
        )

    def configure(self, view: DeviceView, clients: list[int]) -> dict[int, Assignment]:
        """Each sampled device's layout by legend.planner."""
        cfg = self.config.legend
        whole = cfg.download == "all"
        if cfg.planner == "depth":
            return configure_depth(view, clients, self.global_ranks, cfg.slack, cfg.rank_cap, whole)
        if cfg.planner == "global":
            layout = self.global_layout()
            return {c: Assignment(layout.depth, max(self.global_ranks), layout, estimate_layout(view, c, layout, layout)) for c in clients}
        return configure_joint(view, clients, self.global_ranks, Worth(cfg.depth_decay, cfg.rank_scale), cfg.planner == "ranks", whole)

    def aggregate(self, round_number: int, global_state: State, updates: list[Update]) -> State:
        """Each coordinate: the sample-weighted mean (or fl.aggregator's robust rule) over the devices that trained it;
        the rest keeps its value."""
        fl = self.config.fl
        if fl.aggregator != "mean":
            return {**global_state, **robust_updates(global_state, updates, fl.aggregator, fl.trim_fraction)}
        weights = sample_weights(updates) if self.config.legend.weights == "samples" else sample_step_weights(updates)
        new = dict(global_state)
        for key in {k for u in updates for k in u.weights}:
            covering = [(u.weights[key], w) for u, w in zip(updates, weights, strict=True) if key in u.weights]
            new[key] = masked_average(global_state[key], [t for t, _ in covering], [w for _, w in covering])
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"snapshot": {c: astuple(e) for c, e in self.snapshot.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshot = {int(c): Capacity(*values) for c, values in state["snapshot"].items()}
