"""The types every room shares, and the one file write they all trust: a leaf (torch and the standard library only).

Plans and updates are plain data: they cross the Flower wire unchanged and are all a strategy and a
device tell each other. ``atomic_write`` is how every file of a run is written (checkpoints, metrics,
per-device state), so a crash at any point leaves the old content or the new, never a mix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from legend.lora.layout import AdapterLayout

State = dict[str, torch.Tensor]  # tensor name (PEFT's) -> tensor


@dataclass(frozen=True)
class ModelInfo:
    """What strategies and the cost model need to know about the architecture."""

    model_type: str
    num_blocks: int
    hidden_size: int
    target_modules: tuple[str, ...]
    blocks_prefix: str = ""  # e.g. "bert.encoder.layer": block i's tensors start with "<prefix>.<i>."

    def block_of(self, key: str) -> int | None:
        """The block a tensor belongs to (None outside the blocks: embeddings, head)."""
        if not key.startswith(self.blocks_prefix + "."):
            return None
        index = key[len(self.blocks_prefix) + 1 :].split(".", 1)[0]
        return int(index) if index.isdigit() else None


@dataclass(frozen=True)
class ClientPlan:
    """What one device is told: its layout, the tensors it starts from, its learning rate.

    weights: tensors the device loads over the global model; sent, unless ``wire`` says otherwise. With the
          tensors the device keeps itself (``DeviceSide.kept``: FedSA-LoRA's B) they cover the global state.
    wire: what is sent instead of ``weights`` when the device rebuilds them from a more compact
          message (FLoRA's stacked factors, from which it merges its base weights); bytes count this.
    """

    client: int
    layout: AdapterLayout
    weights: State
    lr: float
    wire: State | None = None


@dataclass(frozen=True)
class Update:
    """What one device sends back: the tensors it trained (cut to its layout) and how much data it used.

    kept: the trained tensors the device keeps as its own (``DeviceSide.kept``; its runtime stores them), and
    kept_start: what it started them from: both reported for the server's scoring only (FedSA-LoRA's mean B),
                never counted as sent.
    """

    client: int
    weights: State
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    kept: State = field(default_factory=dict)
    kept_start: State = field(default_factory=dict)


@dataclass(frozen=True)
class SecureSum:
    """All a server holds of a round under secure aggregation: sums over the devices whose updates arrived.

    totals / masses: per global tensor, the sum of weight x value and of weight over the coordinates each device
    trained (``strategies.aggregate.add_masked_terms``), padded to the global layout; the individual updates never
    reach the server. bytes_down / bytes_up / seconds: what the protocol's messages measured in the round (all stages).
    """

    totals: State
    masses: State
    bytes_down: int
    bytes_up: int
    seconds: float


def numel(state: State) -> int:
    """How many numbers the tensors hold."""
    return sum(tensor.numel() for tensor in state.values())


def atomic_write(path: Path, data: bytes | memoryview) -> None:
    """After a crash at any point, ``path`` holds either the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
