"""What crosses the wire between server and device: tensors in the configured dtype, and their size."""

from __future__ import annotations

import torch

from legend.core import State

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def payload_bytes(state: State, wire_dtype: str) -> int:
    itemsize = torch.empty((), dtype=WIRE_DTYPES[wire_dtype]).element_size()
    return sum(t.numel() for t in state.values()) * itemsize


def through_wire(state: State, wire_dtype: str) -> State:
    """The tensors as the receiver sees them: rounded to the wire dtype, computed on in float32."""
    dtype = WIRE_DTYPES[wire_dtype]
    if dtype == torch.float32:
        return state
    return {key: t.to(dtype).to(torch.float32) for key, t in state.items()}
