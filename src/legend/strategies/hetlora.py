"""HetLoRA (Cho et al., arXiv 2401.06432): ranks by device capacity, rank self-pruning, sparsity-weighted aggregation.

The global rank is r_max = lora.r. A device first gets a rank from its estimated speed
(``ranks_by_capacity``: the estimates LEGEND uses), receives the leading r_k rows of A and columns of
B (nested truncation) and trains them with the local regulariser
lambda * sum ||B[:, floor(gamma r_k):]|| ||A[floor(gamma r_k):, :]||. It reports that tail norm; when
it shrank since the device's previous round, the device prunes its rank to floor(gamma r_k) (never
below hetlora.r_min). The server zero-pads every device to r_max and weights it per module by
w_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F; the head is the sample-weighted mean. Under fl.aggregator (median,
trimmed mean) each coordinate of the zero-padded A and B, and of the head, is instead the rule over all the round's
devices, unweighted (``robust_hetlora_factors``): a norm weight would let an attacker buy weight with a large update,
and the padding keeps HetLoRA's meaning (a row few devices hold shrinks, a row nobody holds any more is pruned to 0).
Up and down: the device's truncated A and B, and the head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from legend.core import ClientPlan, State, Update
from legend.devices.capacity import DeviceView, ranks_by_capacity
from legend.lora.layout import AdapterLayout, cut_to_layout, lora_modules
from legend.models.shared import SharedModel
from legend.strategies.aggregate import (
    Factors,
    average_updates,
    client_factors,
    hetlora_factors,
    robust_average,
    robust_hetlora_factors,
)
from legend.strategies.base import LORA_ONLY, ROBUST_AGGREGATION, DeviceSide
from legend.strategies.fedit import FedIT
from legend.strategies.registry import register

TAIL_NORM = "tail_norm"  # metric key of the device's tail norm in its update


def tail_norm(factors: Factors, rank: int, gamma: float) -> torch.Tensor:
    """HetLoRA's regulariser for one module of rank r: ||B[:, floor(gamma r):r]||_F x ||A[floor(gamma r):r, :]||_F."""
    a, b = factors
    keep = int(gamma * rank)
    return torch.linalg.matrix_norm(b[:, keep:rank]) * torch.linalg.matrix_norm(a[keep:rank])


def tail_norms(model: SharedModel, layout: AdapterLayout, gamma: float) -> torch.Tensor:
    """The regulariser summed over the device's adapted modules, at the device's rank in each block."""
    total = torch.zeros(())  # a 0-dim CPU tensor adds to a GPU one as a scalar
    for a_key, b_key in lora_modules(model.keys(layout)).values():
        rank = layout.rank_by_block[model.block_of(a_key)]
        total = total + tail_norm((model.params[a_key], model.params[b_key]), rank, gamma)
    return total


@dataclass(frozen=True)
class HetLoRADevice(DeviceSide):
    """The device adds lambda x its tail norms to the loss and reports them after training."""

    penalty: float  # lambda
    gamma: float

    def extra_loss(self, model: SharedModel, plan: ClientPlan) -> torch.Tensor:
        return self.penalty * tail_norms(model, plan.layout, self.gamma)

    def report(self, model: SharedModel, plan: ClientPlan) -> dict[str, float]:
        return {TAIL_NORM: float(tail_norms(model, plan.layout, self.gamma))}


@register
class HetLoRA(FedIT):
    name = "hetlora"
    # no coordinate means (it weights clients by their update's norm); a robust rule runs on the zero-padded factors
    supports = LORA_ONLY | {ROBUST_AGGREGATION}

    def __init__(self, config, info):
        super().__init__(config, info)
        self.ranks: dict[int, int] = {}  # client -> its current (possibly pruned) rank
        self.tail_norms: dict[int, float] = {}  # client -> the tail norm of its last report

    def plan(self, round_number: int, clients: list[int], global_state: State, devices: DeviceView) -> dict[int, ClientPlan]:
        new = [c for c in clients if c not in self.ranks]
        if new:  # a device's first rank comes from its capacity; later ones from self-pruning
            self.ranks.update(ranks_by_capacity(devices, new, self.config.hetlora_r_min, self.config.lora.r, self.config.lora.top_blocks))
        lr, plans = self.lr(round_number), {}
        for c in clients:
            layout = AdapterLayout.uniform_lora(self.info.num_blocks, self.ranks[c], self.config.lora.top_blocks)
            plans[c] = ClientPlan(c, layout, cut_to_layout(global_state, layout, self.info.block_of), lr)
        return plans

    def device_side(self) -> HetLoRADevice:
        return HetLoRADevice(self.config.hetlora.penalty, self.config.hetlora.gamma)

    def aggregate(self, round_number: int, global_state: State, updates: list[Update]) -> State:
        """Zero-padded factors weighted by their product's norm; or, under fl.aggregator, the robust rule on the same padding."""
        for update in updates:
            self._self_prune(update.client, update.metrics[TAIL_NORM])
        fl, rank, factors = self.config.fl, self.config.lora.r, {}
        for a_key, b_key in lora_modules(global_state).values():
            clients = client_factors(updates, a_key, b_key)
            if fl.aggregator == "mean":
                factors[a_key], factors[b_key] = hetlora_factors(clients, rank)
            else:
                factors[a_key], factors[b_key] = robust_hetlora_factors(clients, rank, fl.aggregator, fl.trim_fraction)
        keys = [k for k in updates[0].weights if k not in factors]  # the head: every device carries it whole
        if fl.aggregator == "mean":
            return {**global_state, **average_updates(updates, keys), **factors}
        head = {k: robust_average(global_state[k], [u.weights[k] for u in updates], fl.aggregator, fl.trim_fraction) for k in keys}
        return {**global_state, **head, **factors}

    def _self_prune(self, client: int, tail_norm: float) -> None:
        previous = self.tail_norms.get(client)
        if previous is not None and tail_norm < previous:
            self.ranks[client] = max(self.config.hetlora_r_min, int(self.config.hetlora.gamma * self.ranks[client]))
        self.tail_norms[client] = tail_norm

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": self.ranks, "tail_norms": self.tail_norms}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ranks, self.tail_norms = state["ranks"], state["tail_norms"]
