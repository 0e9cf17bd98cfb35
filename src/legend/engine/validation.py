"""Server-side checks of a client's update before any of it reaches the global model.

An update is rejected, with one reason, when its tensors are not exactly what the device's plan asks
it to send (keys, shapes, dtype), when any value is NaN or infinite, or when it moved further from
what the device started from than ``fl.max_update_norm`` (L2 over all its tensors). The same check
serves every engine: it needs only the plan's expected tensors and the starting values.
"""

from __future__ import annotations

import torch

from legend.models.shared import State
from legend.strategies.base import Update


def rejection(update: Update, expected: dict[str, tuple[tuple[int, ...], torch.dtype]], start: State, max_norm: float) -> str | None:
    """Why the update must not be aggregated, or None when it is sound.

    expected: key -> (shape, dtype) of every tensor the plan asks the device to send;
    start: the values the device started from, at those shapes (for the update's norm).
    """
    sent = update.weights
    missing, unexpected = sorted(set(expected) - set(sent)), sorted(set(sent) - set(expected))
    if missing or unexpected:
        return f"wrong keys: missing {missing[:3]}, unexpected {unexpected[:3]}"
    for key, (shape, dtype) in expected.items():
        tensor = sent[key]
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            return f"wrong shape for {key}: got {tuple(getattr(tensor, 'shape', ()))}, expected {shape}"
        if tensor.dtype != dtype:
            return f"wrong dtype for {key}: got {tensor.dtype}, expected {dtype}"
        if not torch.isfinite(tensor).all():
            return f"NaN or Inf in {key}"
    if max_norm > 0:
        norm = torch.sqrt(sum(((sent[k].double() - start[k].double()) ** 2).sum() for k in expected)).item()
        if norm > max_norm:
            return f"update norm {norm:.4g} exceeds fl.max_update_norm {max_norm:g}"
    return None
