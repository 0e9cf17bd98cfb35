"""FedEx-LoRA (arXiv 2410.09432): average A and B as FedIT, and fold the error into the frozen weights.

R = sum_k p_k B_k A_k - B A (A, B the sample-weighted means) is added to each adapted layer's frozen
weight, W <- W + s R (nn.Linear's W is out x in: no transpose), so the global model is exactly the
average of the clients' models. The target layers' W thereby join the global state. Down: A, B, the
head and those W (a sampled client may have missed any number of residuals, so it gets the current W,
not one round's R). Up: A, B and the head.
"""

from __future__ import annotations

from legend.core import State, Update
from legend.lora.layout import base_weight_key, lora_modules
from legend.models.shared import SharedModel
from legend.strategies.aggregate import average_updates, client_factors, fedex_residual, sample_weights
from legend.strategies.base import PARALLEL_GROUPS
from legend.strategies.fedit import FedIT
from legend.strategies.registry import register


@register
class FedExLoRA(FedIT):
    name = "fedex"
    supports = frozenset({PARALLEL_GROUPS})  # it folds a residual into W (no quantized base), a product of factors, not a mean

    def initial_state(self, model: SharedModel) -> State:
        state = super().initial_state(model)
        return {**state, **model.base_weights(lora_modules(state))}

    def aggregate(self, round_number: int, global_state: State, updates: list[Update]) -> State:
        scaling, weights = self.config.lora.alpha / self.config.lora.r, sample_weights(updates)
        merged = {}
        for module, (a_key, b_key) in lora_modules(global_state).items():
            w_key = base_weight_key(module)
            merged[w_key] = global_state[w_key] + scaling * fedex_residual(client_factors(updates, a_key, b_key), weights)
        return {**global_state, **average_updates(updates), **merged}
