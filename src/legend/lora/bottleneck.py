"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2021) for FedAP, added after each block.

The `adapters` package would be the maintained choice, but its releases pin transformers 4.x. This is
the sequential bottleneck of Pfeiffer's configuration: h + up(relu(down(h))), with `up` zero so the
model starts as the pre-trained one. It sits on the block's output (a forward hook), which needs no
per-architecture code; Pfeiffer places it before the block's last LayerNorm instead.
"""

from __future__ import annotations

import torch
from torch import nn

from legend.lora.layout import BOTTLENECK, AdapterLayout


class Bottleneck(nn.Module):
    def __init__(self, hidden_size: int, size: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, size)
        self.up = nn.Linear(size, hidden_size)
        nn.init.zeros_(self.up.weight)  # identity at the start: training begins from the pre-trained model
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (batch, tokens, hidden)
        return hidden + self.up(torch.relu(self.down(hidden)))


def _apply_to_block_output(block: nn.Module, args, output):
    """Blocks return the hidden states, or a tuple that starts with them (older transformers, decoders with caches)."""
    if isinstance(output, tuple):
        return (block.get_submodule(BOTTLENECK)(output[0]), *output[1:])
    return block.get_submodule(BOTTLENECK)(output)


def inject_bottlenecks(blocks: nn.ModuleList, hidden_size: int, layout: AdapterLayout) -> None:
    """Add an adapter of width ``layout.rank_by_block[i]`` to every block i whose width is > 0, in place."""
    for block, size in zip(blocks, layout.rank_by_block, strict=True):
        if size > 0:
            block.add_module(BOTTLENECK, Bottleneck(hidden_size, size))
            block.register_forward_hook(_apply_to_block_output)
