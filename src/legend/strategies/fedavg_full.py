"""FedAvg full fine-tuning (McMahan et al. 2017): every weight is trained and averaged."""

from __future__ import annotations

from legend.lora.layout import AdapterLayout
from legend.strategies.base import COORDINATE_MEANS
from legend.strategies.fedit import FedIT
from legend.strategies.registry import register


@register
class FedAvgFull(FedIT):
    name = "fedavg-full"
    supports = COORDINATE_MEANS  # it trains no LoRA
    default_lr = 5e-5  # full fine-tuning diverges at LoRA's learning rate

    def global_layout(self) -> AdapterLayout:
        return AdapterLayout("full")
