"""The cost model: FLOPs, training memory and bytes of one device's round, from the model and its batches.

FLOPs count multiply-adds as 2. Per block and token, the base linear layers cost 2 x their weights;
attention's length term (Q K^T and A V) costs 4 x width per token pair; a LoRA adapter of rank r on a
layer with in + out features costs 2 r (in + out). Backward runs only from the output down to the lowest
block the device trains: below it nothing needs a gradient, so autograd never goes there. Within that
region, frozen weights cost one backward matmul (the input gradient), trained ones two (input and weight
gradients); the lowest trained block's query, key and value projections read an input that needs no
gradient, so autograd skips their input gradients too (checked against torch's FLOP counter in the tests).
The layers outside the blocks act once per output position: a classifier (and pooler) once per
sequence, trained; a causal LM's vocabulary projection once per response token (only those reach the loss),
frozen, so it costs its forward and its input gradient. Embedding look-ups, norms and activations are not
counted: calibration folds them into the device's sustained FLOP/s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from legend.errors import LegendError
from legend.lora.layout import BOTTLENECK, AdapterLayout
from legend.models.placement import QUANTIZED_BYTES
from legend.models.shared import SharedModel

FLOAT_BYTES = 4  # training runs in float32
# Linear layers that read the block's (normalised) input: at the lowest trained block their input gradient is never computed.
BLOCK_INPUT_PROJECTIONS = frozenset({"query", "key", "value", "q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "Wqkv"})
ADAMW_BYTES_PER_PARAM = 3 * FLOAT_BYTES  # gradient + two moments


@dataclass(frozen=True)
class ModelSpec:
    """The sizes the cost model needs, read from the model itself (every block has the same shape)."""

    num_blocks: int
    hidden: int
    heads: int
    ffn: int
    attention_width: int  # heads x head_dim of the queries
    block_linear_params: int  # sum of in x out over the base linear layers of one block
    input_projection_params: int  # the part of it in the projections that read the block's input (BLOCK_INPUT_PROJECTIONS)
    lora_features: int  # sum of in + out over the LoRA target layers of one block
    outside_linear_params: int  # linear layers outside the blocks (pooler and classifier, or the LM head), applied per output position
    output_features: int  # width of the output: classes, or the vocabulary
    frozen_output: bool  # the output layer never trains (a causal LM's LM head)
    total_params: int  # the pre-trained model and its head, without adapters
    head_params: int
    bias_params: int  # biases of the backbone (BitFit)
    block_weight_bytes: float = FLOAT_BYTES  # storage of one weight of the blocks' linear layers (model.quantize: 4-bit NF4 or 8-bit)

    @classmethod
    def of(cls, model: SharedModel) -> ModelSpec:
        config = model.module.config
        block = model.module.get_submodule(model.blocks_prefix)[0]
        linears = [
            (name, m) for name, m in block.named_modules() if isinstance(m, nn.Linear) and "lora_" not in name and BOTTLENECK not in name
        ]
        targets = {name.removesuffix(".base_layer").split(".")[-1] for name, _ in linears} & set(model.info.target_modules)
        outside = [
            m
            for name, m in model.module.named_modules()
            if isinstance(m, nn.Linear) and "lora_" not in name and not name.startswith(model.blocks_prefix + ".")
        ]
        heads = config.num_attention_heads
        output = model.module.get_output_embeddings() if model.blocks_only else None
        # a linear layer's weight count, whatever its storage (bitsandbytes packs two 4-bit weights in a byte)
        logical = {f"{name}.weight": m.in_features * m.out_features for name, m in model.module.named_modules() if isinstance(m, nn.Linear)}
        return cls(
            num_blocks=model.info.num_blocks,
            hidden=config.hidden_size,
            heads=heads,
            ffn=config.intermediate_size,
            attention_width=heads * (getattr(config, "head_dim", None) or config.hidden_size // heads),
            block_linear_params=sum(m.in_features * m.out_features for _, m in linears),
            input_projection_params=sum(
                m.in_features * m.out_features
                for name, m in linears
                if name.removesuffix(".base_layer").split(".")[-1] in BLOCK_INPUT_PROJECTIONS
            ),
            lora_features=sum(
                m.in_features + m.out_features for name, m in linears if name.removesuffix(".base_layer").split(".")[-1] in targets
            ),
            outside_linear_params=sum(m.in_features * m.out_features for m in outside),
            output_features=output.out_features if output is not None else config.num_labels,
            frozen_output=model.blocks_only,
            total_params=sum(logical.get(k, p.numel()) for k, p in model.params.items() if ".lora_" not in k and BOTTLENECK not in k),
            head_params=sum(p.numel() for k, p in model.params.items() if model.is_head(k)),
            bias_params=sum(
                p.numel() for k, p in model.params.items() if k.endswith(".bias") and not model.is_head(k) and ".lora_" not in k
            ),
            block_weight_bytes=QUANTIZED_BYTES.get(model.quantize, FLOAT_BYTES),
        )


@dataclass(frozen=True)
class Batches:
    """What a device trains on in one round, as padded batch shapes (B sequences of T tokens each, O output positions)."""

    sequences: int  # sum of B
    tokens: int  # sum of B x T
    token_pairs: int  # sum of B x T^2 (attention)
    peak_tokens: int  # largest B x T (activation memory)
    peak_token_pairs: int  # largest B x T^2
    outputs: int = 0  # sum of O: positions the output layer projects
    peak_outputs: int = 0  # largest O

    @classmethod
    def of(cls, shapes: Sequence[tuple[int, ...]]) -> Batches:
        """From (B, T) or (B, T, O) per batch; O defaults to B (a classifier reads one position per sequence)."""
        if len(shapes) == 0:
            return cls(0, 0, 0, 0, 0)
        b = np.array([s[0] for s in shapes], dtype=np.int64)
        t = np.array([s[1] for s in shapes], dtype=np.int64)
        o = np.array([s[2] if len(s) > 2 else s[0] for s in shapes], dtype=np.int64)
        return cls(
            int(b.sum()), int((b * t).sum()), int((b * t * t).sum()), int((b * t).max()), int((b * t * t).max()), int(o.sum()), int(o.max())
        )

    @classmethod
    def uniform(cls, steps: int, batch_size: int, length: int) -> Batches:
        return cls.of([(batch_size, length)] * steps)


def adapter_params(spec: ModelSpec, method: str, rank: int) -> int:
    """Parameters of one block's adapter: LoRA of rank r on every target, or a bottleneck of width r."""
    if method == "lora":
        return rank * spec.lora_features
    if method == "adapter":
        return rank * 2 * spec.hidden
    return 0


def block_forward_flops(spec: ModelSpec, batches: Batches, adapter: int) -> float:
    return 2 * batches.tokens * (spec.block_linear_params + adapter) + 4 * batches.token_pairs * spec.attention_width


def block_backward_flops(spec: ModelSpec, batches: Batches, adapter: int, full: bool, lowest: bool = False) -> float:
    """Input gradients in the block (but for the input projections of the lowest trained block when its input needs
    none); weight gradients for what is trained (the adapter, or all)."""
    input_gradients = spec.block_linear_params - (spec.input_projection_params if lowest else 0)
    base = 2 * batches.tokens * (input_gradients + (spec.block_linear_params if full else 0))
    return base + 8 * batches.token_pairs * spec.attention_width + 4 * batches.tokens * adapter


def lowest_trained_block(spec: ModelSpec, layout: AdapterLayout) -> int:
    """Where backward stops: full fine-tuning and BitFit train every block, adapters only the top ``depth``."""
    return 0 if layout.method in ("full", "bitfit") else spec.num_blocks - layout.depth


def input_needs_gradient(layout: AdapterLayout) -> bool:
    """Whether the lowest trained block's input needs a gradient: only when something below it trains (the
    embeddings in full fine-tuning, their biases in BitFit)."""
    return layout.method in ("full", "bitfit")


def held_blocks(spec: ModelSpec, layout: AdapterLayout) -> list[int]:
    """The blocks the device's model holds and runs: every block but the layout's skipped ones."""
    skipped = set(layout.skipped_blocks)
    return [i for i in range(spec.num_blocks) if i not in skipped]


@dataclass(frozen=True)
class KeptPrefix:
    """A round's work below the global LoRA region on a device that keeps its activations there (``devices/activations.py``)."""

    edge: int  # the lowest block of the global LoRA region: the blocks below it run only on ``computed``
    computed: Batches  # the rows not in storage (first seen, or no room left), run through the blocks below the edge
    read_bytes: int  # the stored states of the other rows, read from storage
    stored_bytes: int  # what the device's storage holds after the round


def training_flops(
    spec: ModelSpec, layout: AdapterLayout, batches: Batches, applied_ranks: Sequence[int] | None = None, kept: KeptPrefix | None = None
) -> float:
    """Forward through every block (with the adapters applied, trained or frozen), backward down to the lowest trained block.

    applied_ranks: the ranks of the adapters in the forward pass (default: the layout's own); a LEGEND
    device also applies the frozen global adapters below its own region.
    kept: on a device that keeps its activations, the blocks below ``kept.edge`` run only on the rows it has not stored.
    The layout's skipped blocks cost nothing: the device's model leaves them out.
    """
    ranks = layout.rank_by_block or (0,) * spec.num_blocks
    applied = applied_ranks or ranks
    full = layout.method == "full"
    edge = kept.edge if kept else 0
    held = held_blocks(spec, layout)
    flops = sum(
        block_forward_flops(spec, kept.computed if i < edge else batches, adapter_params(spec, layout.method, applied[i])) for i in held
    )
    lowest = lowest_trained_block(spec, layout)
    flops += sum(
        block_backward_flops(
            spec, batches, adapter_params(spec, layout.method, ranks[i]), full, lowest=i == lowest and not input_needs_gradient(layout)
        )
        for i in held
        if i >= lowest
    )
    passes = (
        2 if spec.frozen_output else 3
    )  # forward and input gradient (the head passes the gradient down), and a trained head's weight gradient
    return flops + passes * 2 * batches.outputs * spec.outside_linear_params


def trainable_params(spec: ModelSpec, layout: AdapterLayout) -> int:
    if layout.method == "full":
        return spec.total_params
    head = spec.head_params if layout.train_head else 0
    if layout.method == "bitfit":
        return spec.bias_params + head
    factors = len(layout.train_factors) / 2 if layout.method == "lora" else 1  # FFA-LoRA trains B only: half
    return int(sum(adapter_params(spec, layout.method, r) for r in layout.rank_by_block) * factors) + head


def training_memory_bytes(spec: ModelSpec, layout: AdapterLayout, batches: Batches) -> int:
    """Weights (the blocks' linear weights at ``block_weight_bytes``) + activations kept for backward in the trained blocks
    + the output logits and their gradient + gradients and AdamW state.

    Activations per token and trained block: 8 h + 2 ffn floats plus heads x T for the attention
    probabilities (Korthikanti et al. 2022, arXiv 2205.05198, without dropout masks). A skipped block's linear weights are
    not held and it keeps no activations (its biases and norms, under 1% of it, stay counted).
    """
    held = held_blocks(spec, layout)
    depth = sum(1 for i in held if i >= lowest_trained_block(spec, layout))
    per_block = FLOAT_BYTES * (batches.peak_tokens * (8 * spec.hidden + 2 * spec.ffn) + batches.peak_token_pairs * spec.heads)
    logits = FLOAT_BYTES * 2 * batches.peak_outputs * spec.output_features
    quantizable = spec.num_blocks * spec.block_linear_params
    weights = FLOAT_BYTES * (spec.total_params - quantizable) + spec.block_weight_bytes * (len(held) * spec.block_linear_params)
    return weights + depth * per_block + logits + ADAMW_BYTES_PER_PARAM * trainable_params(spec, layout)


def layout_numel(model: SharedModel, layout: AdapterLayout, exclude=()) -> int:
    """How many numbers the tensors a layout trains hold (less ``exclude``: tensors kept on the device); ``wire_bytes`` of it
    is what they cost on the wire."""
    return sum(int(np.prod(shape)) for key, shape in model.device_shapes(layout).items() if key not in exclude)


def applied_ranks(layout: AdapterLayout, global_layout: AdapterLayout) -> tuple[int, ...]:
    """Adapter ranks in a device's forward pass: its own where it trains, the frozen global ones elsewhere."""
    if layout.method != global_layout.method or not layout.rank_by_block:
        return layout.rank_by_block
    return tuple(own or glob for own, glob in zip(layout.rank_by_block, global_layout.rank_by_block, strict=True))


def kept_memory_bytes(spec: ModelSpec, batches: Batches) -> int:
    """Memory for reading kept activations: the largest batch's states at float16 as read, and at float32 as the edge block's input."""
    return batches.peak_tokens * spec.hidden * (2 + FLOAT_BYTES)


def require_fits(spec: ModelSpec, layout: AdapterLayout, batches: Batches, memory_gb: float, who: str, extra: int = 0) -> int:
    """The memory (bytes) a plan needs (with ``extra`` bytes beyond training's); a plan that would not fit the device is refused,
    saying what it needs and how to shrink it."""
    needed = training_memory_bytes(spec, layout, batches) + extra
    if needed > memory_gb * 1e9:
        raise LegendError(
            f"{who} cannot train this plan: it needs {needed / 1e9:.2f} GB of memory and the device has {memory_gb:.2f} GB; "
            "lower train.batch_size or data.max_length, train fewer blocks, or use devices with more memory (devices.fleet)"
        )
    return needed
