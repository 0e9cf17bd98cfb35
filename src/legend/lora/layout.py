"""Adapter layouts: which blocks a device trains, with which rank, and which tensors.

A layout is plain data. The shared model carries the strategy's *global* layout (every block any
device may train, at its largest rank); each device's layout is a subset of it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from peft import LoraConfig, inject_adapter_in_model

LORA_FACTOR = re.compile(r"\.(lora_A|lora_B)\.")
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_A\.(?P<rest>.+)$")
BOTTLENECK = "bottleneck"  # attribute name of the adapter module inside each block


def lora_modules(keys) -> dict[str, tuple[str, str]]:
    """Adapted module -> (key of its A, key of its B), for every lora_A key among ``keys`` (PEFT's names)."""
    return {m["module"]: (key, f"{m['module']}.lora_B.{m['rest']}") for key in keys if (m := LORA_KEY.match(key))}


def base_weight_key(module: str) -> str:
    """PEFT keeps the frozen weight W of an adapted linear layer as ``<module>.base_layer.weight``."""
    return f"{module}.base_layer.weight"


@dataclass(frozen=True)
class AdapterLayout:
    """What one device (or the global model) trains.

    method: "lora" adds low-rank adapters to the target modules of blocks with rank > 0;
            "adapter" adds a bottleneck adapter after each block with rank > 0 (FedAP);
            "bitfit" trains every bias of the backbone (FedBF);
            "full" trains every weight of the model.
    rank_by_block: per block, index 0 nearest the input, 0 = no adapter there: the LoRA rank, or the
            bottleneck width for "adapter".
    train_factors: the LoRA factors that receive gradients (FFA-LoRA trains only "lora_B").
    train_head: whether the classification head is trained (and sent).
    skipped_blocks: blocks the device's model leaves out while it trains (FedRA's shallower local model): each passes
            its input on unchanged and costs nothing, forward or backward. Evaluation never skips.
    """

    method: Literal["lora", "adapter", "bitfit", "full"]
    rank_by_block: tuple[int, ...] = ()
    train_factors: tuple[str, ...] = ("lora_A", "lora_B")
    train_head: bool = True
    skipped_blocks: tuple[int, ...] = ()

    @classmethod
    def uniform_lora(cls, num_blocks: int, rank: int, top: int = 0, **kwargs) -> AdapterLayout:
        """Rank ``rank`` on the top ``top`` blocks (0: every block), none below (``lora.top_blocks``)."""
        below = num_blocks - top if 0 < top < num_blocks else 0
        return cls("lora", (0,) * below + (rank,) * (num_blocks - below), **kwargs)

    @property
    def depth(self) -> int:
        """Blocks with an adapter, counted from the output."""
        trained = [i for i, r in enumerate(self.rank_by_block) if r > 0]
        return len(self.rank_by_block) - min(trained) if trained else 0

    def trains(self, key: str, block: int | None, is_head: bool) -> bool:
        if self.method == "full":
            return True
        if is_head:
            return self.train_head
        if self.method == "bitfit":
            return key.endswith(".bias")
        if self.method == "adapter":
            return f".{BOTTLENECK}." in key and block is not None and self.rank_by_block[block] > 0
        factor = LORA_FACTOR.search(key)
        return bool(factor) and factor.group(1) in self.train_factors and block is not None and self.rank_by_block[block] > 0

    def device_shape(self, key: str, block: int | None, full_shape: torch.Size) -> tuple[int, ...]:
        """Shape of a tensor on a device: LoRA factors are cut to the device's rank (nested truncation)."""
        factor = LORA_FACTOR.search(key)
        if self.method != "lora" or factor is None or block is None:
            return tuple(full_shape)
        rank = self.rank_by_block[block]
        out_features, in_features = full_shape
        return (rank, in_features) if factor.group(1) == "lora_A" else (out_features, rank)


def cut_to_layout(state: dict[str, torch.Tensor], layout: AdapterLayout, block_of) -> dict[str, torch.Tensor]:
    """The state as a device of this layout receives it: LoRA factors of the blocks it trains cut to its
    ranks (the leading rows of A and columns of B); every other tensor whole."""
    out = {}
    for key, value in state.items():
        block = block_of(key)
        trained = block is not None and layout.rank_by_block[block] > 0
        shape = layout.device_shape(key, block, value.shape) if trained else value.shape
        out[key] = value[tuple(slice(0, n) for n in shape)]
    return out


def lora_config(ranks: dict[str, int], alphas: dict[str, float], dropout: float, **extra) -> LoraConfig:
    """One PEFT LoraConfig for adapters of different ranks: every module named in full, so ``rank_pattern`` and
    ``alpha_pattern`` map each one to its own rank and alpha exactly (LEGEND's ramp, blocks without adapters)."""
    top = max(ranks, key=ranks.get)
    return LoraConfig(
        r=ranks[top],
        lora_alpha=alphas[top],
        lora_dropout=dropout,
        target_modules=sorted(ranks),
        rank_pattern={re.escape(name): rank for name, rank in ranks.items()},
        alpha_pattern={re.escape(name): alpha for name, alpha in alphas.items()},
        **extra,
    )


def inject_lora(
    model: torch.nn.Module,
    module_names_by_block: dict[int, list[str]],
    layout: AdapterLayout,
    alpha: float | Sequence[float],
    dropout: float,
) -> None:
    """Add PEFT LoRA layers in place: one rank per block, given by ``layout.rank_by_block``, and one alpha
    for every block or one per block (the scaling of block l is alpha_l / r_l)."""
    alphas = tuple(alpha) if isinstance(alpha, Sequence) else (alpha,) * len(layout.rank_by_block)
    block_of = {name: block for block, names in module_names_by_block.items() for name in names if layout.rank_by_block[block] > 0}
    if not block_of:
        return
    ranks = {name: layout.rank_by_block[block] for name, block in block_of.items()}
    inject_adapter_in_model(lora_config(ranks, {name: alphas[block] for name, block in block_of.items()}, dropout), model)
