"""FedProx (Li et al., MLSys 2020, arXiv 1812.06127) with LoRA: FedIT plus a proximal term in each device's loss.

Each local step minimises loss + mu/2 ||w - w_global||^2 over the tensors the device trains (A, B
and the head), w_global being what it received this round: the term pulls a device on skewed data
back toward the global model, so its gradient is mu (w - w_global). The optimizer is the usual local
AdamW, as in Flower's FedProx. Aggregation, wire format and learning rate are FedIT's; with
``fedprox.mu`` = 0 it is FedIT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from legend.core import ClientPlan
from legend.models.shared import SharedModel
from legend.strategies.base import DeviceSide
from legend.strategies.fedit import FedIT
from legend.strategies.registry import register


def proximal_term(model: SharedModel, plan: ClientPlan, mu: float) -> torch.Tensor:
    """mu/2 sum_k ||w_k - w_global_k||^2 over the plan's trained tensors (w_global: the plan's, at its shapes)."""
    total = torch.zeros(())  # a 0-dim CPU tensor adds to a GPU one as a scalar
    for key in model.keys(plan.layout):
        now = model.params[key][tuple(slice(0, n) for n in plan.weights[key].shape)]
        start = plan.weights[key].to(now.device)  # a no-op on the CPU
        total = total + (now - start).pow(2).sum()
    return mu / 2 * total


@dataclass(frozen=True)
class FedProxDevice(DeviceSide):
    mu: float

    def extra_loss(self, model: SharedModel, plan: ClientPlan) -> torch.Tensor:
        return proximal_term(model, plan, self.mu)


@register
class FedProx(FedIT):
    name = "fedprox"

    def device_side(self) -> FedProxDevice:
        return FedProxDevice(self.config.fedprox.mu)
