"""FedIT / FedLoRA (arXiv 2305.05644): every client trains LoRA A and B; the server averages each.

A = sum_k p_k A_k and B = sum_k p_k B_k, which is not the average of the products B_k A_k.
The classification head is trained and averaged the same way.
"""

from __future__ import annotations

from legend.core import ClientPlan, State, Update
from legend.devices.capacity import DeviceView
from legend.lora.layout import AdapterLayout
from legend.strategies.aggregate import average_updates, robust_updates
from legend.strategies.base import COORDINATE_MEANS, LORA_ONLY, Strategy
from legend.strategies.registry import register


@register
class FedIT(Strategy):
    name = "fedit"
    supports = COORDINATE_MEANS | LORA_ONLY

    def global_layout(self) -> AdapterLayout:
        return AdapterLayout.uniform_lora(self.info.num_blocks, self.config.lora.r, self.config.lora.top_blocks)

    def plan(self, round_number: int, clients: list[int], global_state: State, devices: DeviceView) -> dict[int, ClientPlan]:
        layout, lr = self.global_layout(), self.lr(round_number)
        return {client: ClientPlan(client, layout, global_state, lr) for client in clients}

    def aggregate(self, round_number: int, global_state: State, updates: list[Update]) -> State:
        fl = self.config.fl
        if fl.aggregator != "mean":
            return {**global_state, **robust_updates(global_state, updates, fl.aggregator, fl.trim_fraction)}
        return {**global_state, **average_updates(updates)}
