"""Measure this machine against the cost model: seconds per block forward and backward, and whole steps.

The sustained FLOP/s of the ``host`` profile is fitted on the per-block timings alone (forward and
backward of every block, timed with module hooks, at several batch shapes). The whole training steps at
several depths of trainable blocks (and full fine-tuning) are then predicted from that one number and
the cost model's FLOP counts, and compared with their measured times: that tests the model's structure
(backward only down to the lowest trained block; the embeddings, head and optimizer left out).

On a GPU (``device``) every mark waits for the GPU's queued work (``torch.cuda.synchronize``), so the times are
the GPU's, and the profile it saves is a CUDA host profile; ``precision`` is engine.precision's (a bfloat16
profile for bfloat16 runs).

A decoder is timed as it trains on instructions (``causal_lm``): the loss covers the last
``ANSWER_TOKENS`` positions of each sequence, so the LM head projects only those (data.format = "instruct").
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from dataclasses import dataclass

import torch

from legend.config import Config
from legend.data.instructions import IGNORE
from legend.devices.cost import Batches, ModelSpec, adapter_params, block_backward_flops, block_forward_flops, training_flops
from legend.lora.layout import AdapterLayout
from legend.models.placement import resolve_device, resolve_precision
from legend.models.shared import SharedModel
from legend.objectives import Objective, objective_for

BLOCK_SHAPES = ((8, 64), (16, 64), (32, 32), (32, 64), (32, 128))  # (sequences, tokens) per batch
STEP_SHAPE = (32, 64)
REPEATS = 3
STEP_REPEATS = 7
ANSWER_TOKENS = 4  # response tokens per sequence when a causal LM is timed


@dataclass(frozen=True)
class Timing:
    name: str
    measured_s: float
    flops: float

    def predicted_s(self, flops_per_s: float) -> float:
        return self.flops / flops_per_s


class BlockTimer:
    """Wall time of each block's forward and backward, from module hooks (no per-architecture code)."""

    def __init__(self, blocks: torch.nn.ModuleList):
        self.marks: dict[tuple[str, int], float] = {}
        self.handles = []
        for i, block in enumerate(blocks):
            self.handles += [
                block.register_forward_pre_hook(lambda m, a, i=i: self._mark("forward start", i)),
                block.register_forward_hook(lambda m, a, o, i=i: self._mark("forward end", i)),
                block.register_full_backward_pre_hook(lambda m, g, i=i: self._mark("backward start", i)),
            ]
        self.num_blocks = len(blocks)
        self.cuda = next(blocks.parameters()).is_cuda  # marks wait for the GPU

    def _mark(self, event: str, block: int) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.marks[(event, block)] = time.perf_counter()

    def forward_s(self) -> list[float]:
        return [self.marks[("forward end", i)] - self.marks[("forward start", i)] for i in range(self.num_blocks)]

    def backward_s(self, backward_end: float) -> list[float]:
        """Block i's backward runs from its own start to the start of block i-1's (block 0: to the end)."""
        starts = [self.marks[("backward start", i)] for i in range(self.num_blocks)]
        return [(starts[i - 1] if i > 0 else backward_end) - starts[i] for i in range(self.num_blocks)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _batch(model: SharedModel, sequences: int, tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """Random ordinary tokens (no specials); class labels, or (a causal LM) the last ANSWER_TOKENS tokens as the response."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.module.config.vocab_size
    ids = torch.randint(vocab // 4, vocab - 1, (sequences, tokens), generator=gen)
    if model.blocks_only:
        labels = torch.full_like(ids, IGNORE)
        labels[:, -ANSWER_TOKENS:] = ids[:, -ANSWER_TOKENS:]
    else:
        labels = torch.randint(0, 2, (sequences,), generator=gen)
    return model.on_device({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})


def _shape(model: SharedModel, sequences: int, tokens: int) -> Batches:
    """One batch as the cost model sees it: a causal LM's head projects only the response positions."""
    return Batches.of([(sequences, tokens, sequences * ANSWER_TOKENS if model.blocks_only else sequences)])


def _train_step(model: SharedModel, objective: Objective, params, optimizer, batch) -> float:
    """One local step as the engine runs it; returns the time backward ended."""
    with model.autocast():
        loss = objective.loss(model.module, batch)
    loss.backward()
    _wait_for(model)
    backward_end = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return backward_end


def measure_blocks(model: SharedModel, objective: Objective, spec: ModelSpec, rank: int) -> list[Timing]:
    """Median seconds per block forward and backward (LoRA of ``rank`` on every block), per batch shape."""
    layout = AdapterLayout.uniform_lora(spec.num_blocks, rank)
    params = list(model.set_trainable(layout).values())
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    timer = BlockTimer(model.module.get_submodule(model.blocks_prefix))
    timings = []
    warnings.filterwarnings("ignore", "Full backward hook is firing")  # block 0: its inputs need no gradient, as intended
    try:
        for sequences, tokens in BLOCK_SHAPES:
            batch = _batch(model, sequences, tokens, seed=sequences * tokens)
            shape = _shape(model, sequences, tokens)
            forward, backward = [], []
            for repeat in range(REPEATS + 1):
                end = _train_step(model, objective, params, optimizer, batch)
                if repeat:  # the first is a warm-up
                    forward += timer.forward_s()
                    backward += timer.backward_s(end)
            adapter = adapter_params(spec, "lora", rank)
            timings.append(
                Timing(f"block forward  {sequences}x{tokens}", statistics.median(forward), block_forward_flops(spec, shape, adapter))
            )
            timings.append(
                Timing(
                    f"block backward {sequences}x{tokens}", statistics.median(backward), block_backward_flops(spec, shape, adapter, False)
                )
            )
    finally:
        timer.remove()
    return timings


def step_layouts(spec: ModelSpec, rank: int) -> dict[str, AdapterLayout]:
    top = lambda d: AdapterLayout("lora", (0,) * (spec.num_blocks - d) + (rank,) * d)  # noqa: E731
    return {
        "lora top 1 block": top(1),
        "lora top 2 blocks": top(2),
        f"lora all {spec.num_blocks} blocks": top(spec.num_blocks),
        "full fine-tuning": AdapterLayout("full"),
    }


def measure_steps(model: SharedModel, objective: Objective, spec: ModelSpec, rank: int) -> list[Timing]:
    """Median seconds of a whole local step (forward, backward, clipping, AdamW) per layout.

    The layouts take turns, step by step, so that a slow spell of a shared machine hits them all alike.
    """
    sequences, tokens = STEP_SHAPE
    batch = _batch(model, sequences, tokens, seed=1)
    initial = {k: p.detach().clone() for k, p in model.params.items()}
    layouts = step_layouts(spec, rank)
    optimizers = {name: torch.optim.AdamW([model.params[k] for k in model.keys(layout)], lr=1e-6) for name, layout in layouts.items()}
    seconds: dict[str, list[float]] = {name: [] for name in layouts}
    for repeat in range(STEP_REPEATS + 1):
        for name, layout in layouts.items():
            params = list(model.set_trainable(layout).values())
            started = time.perf_counter()
            _train_step(model, objective, params, optimizers[name], batch)
            _wait_for(model)
            if repeat:  # the first round is a warm-up
                seconds[name].append(time.perf_counter() - started)
    model.load(initial)
    shape = _shape(model, sequences, tokens)
    applied = (rank,) * spec.num_blocks  # the shared model applies every block's adapter in the forward pass
    return [
        Timing(
            f"step {name} {sequences}x{tokens}",
            statistics.median(seconds[name]),
            training_flops(spec, layout, shape, applied if layout.method == "lora" else None),
        )
        for name, layout in layouts.items()
    ]


def _wait_for(model: SharedModel) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def calibrate(
    model_name: str = "minilm-l6", rank: int = 8, threads: int = 0, causal_lm: bool = False, device: str = "cpu", precision: str = "float32"
) -> dict:
    """Block timings, the fitted sustained FLOP/s, and whole-step predictions against measurements (``causal_lm``: the
    model as a causal LM trained on instruction responses; ``device``, ``precision``: as engine.device and engine.precision)."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    place = resolve_device(device, "--device")
    compute = resolve_precision(precision, place)
    model = SharedModel.build(model_name, num_labels=2, causal_lm=causal_lm, compute_dtype=compute)
    config = Config(data={"format": "instruct" if causal_lm else "classification", "task": "instructions" if causal_lm else "sst2"})
    objective = objective_for(config, () if causal_lm else ("0", "1"), model.tokenizer)
    spec_layout = AdapterLayout.uniform_lora(model.info.num_blocks, rank)
    model.add_adapters(spec_layout, lora_alpha=2.0 * rank, lora_dropout=0.0)
    model.to(place)
    model.module.train()
    spec = ModelSpec.of(model)
    blocks = measure_blocks(model, objective, spec, rank)
    flops_per_s = sum(t.flops for t in blocks) / sum(t.measured_s for t in blocks)
    steps = measure_steps(model, objective, spec, rank)

    def rows(timings):
        return [
            {
                "name": t.name,
                "measured_s": t.measured_s,
                "predicted_s": t.predicted_s(flops_per_s),
                "ratio": t.predicted_s(flops_per_s) / t.measured_s,
                "gflop": t.flops / 1e9,
            }
            for t in timings
        ]

    lora_steps = [t for t in steps if "lora" in t.name]
    return {
        "model": model_name,
        "objective": "instruct" if causal_lm else "classification",
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(place) if place.type == "cuda" else "cpu",
        "device_memory_gb": torch.cuda.get_device_properties(place).total_memory / 1e9 if place.type == "cuda" else None,
        "precision": str(compute).removeprefix("torch."),
        "flops_per_s": flops_per_s,
        "blocks": rows(blocks),
        "steps": rows(steps),
        "order_right": sorted(lora_steps, key=lambda t: t.measured_s) == sorted(lora_steps, key=lambda t: t.flops),
    }
