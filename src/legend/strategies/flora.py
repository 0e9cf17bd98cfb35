"""FLoRA (arXiv 2409.05976): stack the clients' adapters, merge them into the base weights, start afresh.

A = concat_k(p_k A_k) on rows and B = concat_k(B_k) on columns give B A = sum_k p_k B_k A_k exactly
(one shared scaling s); the server merges W <- W + s B A into each adapted layer and every client
starts the next round from the same fresh adapter (the seeded A, B = 0, known to all: not sent).

Down (FLoRA's wire format): the head and the stacked A, B of every round since the client last took
part, whose rank grows with the clients per round; the client merges them into its own W. When those
stacks hold as many numbers as the dense W of the adapted layers, it gets W instead (a client that
missed many rounds, or one seen for the first time late). In the simulation the device loads the
server's W, which equals what it would merge. Up: A, B and the head.
"""

from __future__ import annotations

from typing import Any

import torch

from legend.core import ClientPlan, State, Update
from legend.devices.capacity import DeviceView
from legend.errors import LegendError
from legend.lora.layout import base_weight_key, lora_modules
from legend.models.shared import SharedModel
from legend.strategies.aggregate import average_updates, client_factors, sample_weights, stack_factors
from legend.strategies.base import PARALLEL_GROUPS
from legend.strategies.fedit import FedIT
from legend.strategies.registry import register


@register
class FLoRA(FedIT):
    name = "flora"
    supports = frozenset({PARALLEL_GROUPS})  # it merges LoRA into W (no quantized base) and stacks factors instead of averaging them

    def __init__(self, config, info):
        super().__init__(config, info)
        if config.lora.init != "default":  # merging s B A and restarting from A0, B0 would add FeDeRA's principal part again every round
            raise LegendError(
                "lora.init 'federa' does not combine with flora, which merges the whole adapter every round: use lora.init='default'"
            )
        self.synced: dict[int, int] = {}  # client -> the last round whose merge its W holds (0: the pre-trained W)
        self.stacks: dict[int, State] = {}  # round -> its stacked factors, kept while cheaper to send than W

    def initial_state(self, model: SharedModel) -> State:
        state = super().initial_state(model)
        return {**state, **model.base_weights(lora_modules(state))}

    def plan(self, round_number: int, clients: list[int], global_state: State, devices: DeviceView) -> dict[int, ClientPlan]:
        layout, lr = self.global_layout(), self.lr(round_number)
        plans = {c: ClientPlan(c, layout, global_state, lr, wire=self._message(c, round_number, global_state)) for c in clients}
        self.synced.update({c: round_number - 1 for c in clients})
        return plans

    def _message(self, client: int, round_number: int, global_state: State) -> State:
        """The head, plus the stacks the client has not merged yet, or the dense W when that is smaller."""
        modules = lora_modules(global_state)
        adapted = {key for pair in modules.values() for key in pair} | {base_weight_key(m) for m in modules}
        message = {key: value for key, value in global_state.items() if key not in adapted}
        pending = range(self.synced.get(client, 0) + 1, round_number)
        if not pending:
            return message  # nothing merged since the pre-trained W
        if all(r in self.stacks for r in pending):
            stacked = {
                key: torch.cat([self.stacks[r][key] for r in pending], dim=0 if ".lora_A." in key else 1) for key in self.stacks[pending[0]]
            }
            return {**message, **stacked}
        return {**message, **{base_weight_key(m): global_state[base_weight_key(m)] for m in modules}}

    def aggregate(self, round_number: int, global_state: State, updates: list[Update]) -> State:
        scaling, weights = self.config.lora.alpha / self.config.lora.r, sample_weights(updates)
        stacked, merged = {}, {}
        for module, (a_key, b_key) in lora_modules(global_state).items():
            a, b = stack_factors(client_factors(updates, a_key, b_key), weights)  # (K r, in), (out, K r)
            stacked[a_key], stacked[b_key] = a, b
            merged[base_weight_key(module)] = global_state[base_weight_key(module)] + scaling * (b @ a)
        self._keep_stack(round_number, stacked, sum(w.numel() for w in merged.values()))
        head = {key: value for key, value in average_updates(updates).items() if key not in stacked}
        return {**global_state, **head, **merged}  # the adapters stay at their fresh initial values

    def _keep_stack(self, round_number: int, stacked: State, dense_numel: int) -> None:
        """Keep the latest rounds whose stacks together are still smaller than W; older ones would never be sent."""
        self.stacks[round_number] = stacked
        size = 0
        for r in sorted(self.stacks, reverse=True):
            size += sum(t.numel() for t in self.stacks[r].values())
            if size >= dense_numel:
                del self.stacks[r]

    def state_dict(self) -> dict[str, Any]:
        return {"synced": self.synced, "stacks": self.stacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.synced, self.stacks = state["synced"], state["stacks"]
