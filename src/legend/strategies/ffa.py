"""FFA-LoRA (arXiv 2403.12313): A stays frozen at its random init, clients train and send only B.

A is drawn from the seed when the shared model is built, so every client and the server hold the
same A without sending it; with one A, B = sum_k p_k B_k gives exactly sum_k p_k B_k A. Up and down:
every B and the classification head.
"""

from __future__ import annotations

from legend.lora.layout import AdapterLayout
from legend.strategies.fedit import FedIT
from legend.strategies.registry import register


@register
class FFALoRA(FedIT):
    name = "ffa"

    def global_layout(self) -> AdapterLayout:
        return AdapterLayout.uniform_lora(self.info.num_blocks, self.config.lora.r, self.config.lora.top_blocks, train_factors=("lora_B",))
