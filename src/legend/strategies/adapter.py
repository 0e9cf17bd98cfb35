"""FedAP: bottleneck adapters (Houlsby et al. 2019; Pfeiffer's one-per-block form) after every block.

Each adapter is h + up(relu(down(h))) of width adapter.size (lora/bottleneck.py); the adapters and the
classification head are trained, sent both ways and averaged (FedAvg).
"""

from __future__ import annotations

from legend.lora.layout import AdapterLayout
from legend.strategies.base import COORDINATE_MEANS
from legend.strategies.fedit import FedIT
from legend.strategies.registry import register


@register
class FedAP(FedIT):
    name = "adapter"
    supports = COORDINATE_MEANS  # it trains no LoRA

    def global_layout(self) -> AdapterLayout:
        return AdapterLayout("adapter", (self.config.adapter.size,) * self.info.num_blocks)
