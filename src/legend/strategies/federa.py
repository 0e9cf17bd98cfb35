"""FeDeRA (Yan et al., arXiv 2404.18848): FedIT whose adapters start from the SVD of the pre-trained weights.

Each adapted layer's A and B are its top-r principal components (``lora/init.py``) and the frozen
weight keeps only the residual, so training starts from the same function as the pre-trained model
but along the weight's principal directions. Clients and the server derive the identical adapter and
residual from the same weights (exact SVD, fixed signs); aggregation is FedIT's: A = sum p_k A_k,
B = sum p_k B_k. Up and down: every A, B and the head. Any other LoRA strategy gets the same
initialisation with ``lora.init = "federa"``.
"""

from __future__ import annotations

from legend.strategies.base import COORDINATE_MEANS, PARALLEL_GROUPS
from legend.strategies.fedit import FedIT
from legend.strategies.registry import register


@register
class FeDeRA(FedIT):
    name = "federa"
    supports = COORDINATE_MEANS | {PARALLEL_GROUPS}  # its LoRA starts from the SVD of the base weights: no quantized base

    @property
    def lora_init(self) -> str:
        return "federa"
