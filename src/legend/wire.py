"""What crosses the wire between server and device: tensors in the configured dtype, and their size (``wire_bytes``)."""

from __future__ import annotations

import torch

from legend.core import State

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def wire_bytes(numel: int, wire_dtype: str) -> int:
    """Bytes of ``numel`` numbers on the wire in ``fl.wire_dtype``: every byte count of a run (the engine's of plans and
    updates, the planners' estimates) is this, of ``core.numel`` of the tensors or of the numbers a layout would send."""
    return int(numel) * WIRE_DTYPES[wire_dtype].itemsize


def through_wire(state: State, wire_dtype: str) -> State:
    """The tensors as the receiver sees them: rounded to the wire dtype, computed on in float32."""
    dtype = WIRE_DTYPES[wire_dtype]
    if dtype == torch.float32:
        return state
    return {key: t.to(dtype).to(torch.float32) for key, t in state.items()}
