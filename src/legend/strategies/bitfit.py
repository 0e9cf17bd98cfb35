"""FedBF / BitFit (Ben Zaken et al. 2022, federated as in FeDeRA's comparison): only the biases are trained.

Every bias of the backbone and the classification head is trained, sent both ways and averaged (FedAvg).
"""

from __future__ import annotations

from legend.lora.layout import AdapterLayout
from legend.strategies.base import COORDINATE_MEANS
from legend.strategies.fedit import FedIT
from legend.strategies.registry import register


@register
class BitFit(FedIT):
    name = "bitfit"
    supports = COORDINATE_MEANS  # it trains no LoRA

    def global_layout(self) -> AdapterLayout:
        return AdapterLayout("bitfit")
