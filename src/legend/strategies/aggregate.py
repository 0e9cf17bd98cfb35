"""Aggregation math shared by the strategies: pure functions on tensors, no model, no engine."""

from __future__ import annotations

import torch

from legend.models.shared import State
from legend.strategies.base import Update


def sample_weights(updates: list[Update]) -> list[float]:
    """p_k = n_k / sum_j n_j over the clients that reported this round."""
    total = sum(u.num_samples for u in updates)
    return [u.num_samples / total for u in updates]


def weighted_average(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for tensor, weight in zip(tensors, weights, strict=True):
        out.add_(tensor.float(), alpha=weight)
    return out


def average_updates(updates: list[Update]) -> State:
    """FedAvg: every tensor is the sample-weighted mean of the clients' tensors of that name."""
    weights = sample_weights(updates)
    return {key: weighted_average([u.weights[key] for u in updates], weights) for key in updates[0].weights}
