"""FlexLoRA (Bai et al., arXiv 2402.11505): ranks by device capacity; the server redistributes the full-size update by SVD.

Each round a device of rank r_k (``ranks_by_capacity``: the estimates LEGEND uses) gets the leading
r_k components of the global adapter, trains them and sends them back. The server forms the
full-size update dW = sum_k p_k s B_k A_k per module, takes its SVD dW = U S V^T and keeps the top
r_max = lora.r components as the new global adapter: B = U_r S_r / s, A = V_r^T. A device of rank r_k
then receives exactly the best rank-r_k approximation of dW (the leading components). One scaling
s = lora.alpha / lora.r for every rank (nested truncation, docs/design.md). The evaluated global
model is the rank-r_max approximation of dW (design choice: dW itself may have rank up to
sum_k r_k). The head is the sample-weighted mean. Under fl.aggregator (median, trimmed mean) dW is instead the rule
per coordinate over the devices' products s B_k A_k, unweighted, and the head the rule per coordinate: the factors of
two devices are no coordinates to compare (B A is unchanged by any invertible change of basis between them), their products are.
Up and down: the device's A, B and the head.
"""

from __future__ import annotations

import torch

from legend.core import ClientPlan, State, Update
from legend.devices.capacity import DeviceView, ranks_by_capacity
from legend.lora.layout import AdapterLayout, cut_to_layout, lora_modules
from legend.strategies.aggregate import average_updates, client_factors, lora_delta, robust_average, sample_weights, svd_factors
from legend.strategies.base import LORA_ONLY, ROBUST_AGGREGATION
from legend.strategies.fedit import FedIT
from legend.strategies.registry import register


@register
class FlexLoRA(FedIT):
    name = "flexlora"
    # no coordinate means: the global factors come from an SVD of the mean product (a robust rule runs on the products)
    supports = LORA_ONLY | {ROBUST_AGGREGATION}

    def plan(self, round_number: int, clients: list[int], global_state: State, devices: DeviceView) -> dict[int, ClientPlan]:
        ranks, lr = (
            ranks_by_capacity(devices, clients, self.config.hetlora_r_min, self.config.lora.r, self.config.lora.top_blocks),
            self.lr(round_number),
        )
        plans = {}
        for c in clients:
            layout = AdapterLayout.uniform_lora(self.info.num_blocks, ranks[c], self.config.lora.top_blocks)
            plans[c] = ClientPlan(c, layout, cut_to_layout(global_state, layout, self.info.block_of), lr)
        return plans

    def aggregate(self, round_number: int, global_state: State, updates: list[Update]) -> State:
        """The SVD of the devices' mean product; under fl.aggregator, of the robust rule's product per coordinate."""
        scaling, weights, fl = self.config.lora.alpha / self.config.lora.r, sample_weights(updates), self.config.fl
        factors = {}
        for a_key, b_key in lora_modules(global_state).values():
            if fl.aggregator == "mean":
                delta = scaling * lora_delta(client_factors(updates, a_key, b_key), weights)  # (out, in)
            else:  # every device's product is full size: the rule runs over all of them, coordinate by coordinate
                products = [scaling * (b @ a) for a, b in client_factors(updates, a_key, b_key)]
                delta = robust_average(torch.zeros_like(products[0]), products, fl.aggregator, fl.trim_fraction)
            factors[a_key], factors[b_key] = svd_factors(delta, self.config.lora.r, scaling)
        head_keys = [k for k in updates[0].weights if k not in factors]
        if fl.aggregator == "mean":
            head = average_updates(updates, head_keys)
        else:
            head = {k: robust_average(global_state[k], [u.weights[k] for u in updates], fl.aggregator, fl.trim_fraction) for k in head_keys}
        return {**global_state, **head, **factors}
