"""Server-side checks of a client's update before any of it reaches the global model.

An update is rejected, with one reason, when its tensors (those it sends, and those it keeps, such as
FedSA-LoRA's B) are not exactly what the device's plan gives it (keys, shapes, dtype), when any value
is NaN or infinite, or when it moved further from
what the device started from than ``fl.max_update_norm`` (L2 over all its tensors). The same check
serves every engine: it needs only the plan's expected tensors and the starting values.
"""

from __future__ import annotations

import torch

from legend.core import State, Update


def rejection(
    update: Update,
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
    start: State,
    max_norm: float,
    expected_kept: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
) -> str | None:
    """Why the update must not be aggregated, or None when it is sound.

    expected: key -> (shape, dtype) of every tensor the plan asks the device to send;
    start: the values the device started from, at those shapes (for the update's norm);
    expected_kept: the same for the tensors the device keeps (FedSA-LoRA's B): the embedded runtime stores
    them for its devices and the server scores with them, so one NaN there would spoil every later evaluation.
    """
    if reason := _mismatch(update.weights, expected) or _mismatch(update.kept, expected_kept or {}):
        return reason
    if max_norm > 0:
        sent = update.weights
        norm = torch.sqrt(sum(((sent[k].double() - start[k].double()) ** 2).sum() for k in expected)).item()
        if norm > max_norm:
            return f"update norm {norm:.4g} exceeds fl.max_update_norm {max_norm:g}"
    return None


def _mismatch(tensors: State, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> str | None:
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        return f"wrong keys: missing {missing[:3]}, unexpected {unexpected[:3]}"
    for key, (shape, dtype) in expected.items():
        tensor = tensors[key]
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            return f"wrong shape for {key}: got {tuple(getattr(tensor, 'shape', ()))}, expected {shape}"
        if tensor.dtype != dtype:
            return f"wrong dtype for {key}: got {tensor.dtype}, expected {dtype}"
        if not torch.isfinite(tensor).all():
            return f"NaN or Inf in {key}"
    return None
