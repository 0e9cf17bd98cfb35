"""Several clients' local training in one forward and backward pass on the shared model (``engine.parallel_clients``).

Multi-LoRA training, as multi-LoRA training and serving systems do it: the frozen base model runs once over the
rows of K clients stacked into one batch, and inside every LoRA-adapted layer (and the head) each client's rows
go through that client's own tensors. The clients' tensors are disjoint and a row's loss depends only on its own
client's, so the gradient of the sum of the K clients' mean losses is, for each client, the gradient of its own
loss: each keeps its own AdamW, clipping, learning rate, batches and number of steps, and the updates equal
training the clients one after another up to float rounding (other matrix shapes, padding to the group's longest
row). Dropout masks are drawn once per group, so with dropout they differ from one-by-one training's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from legend.config import TrainConfig
from legend.core import State, Update
from legend.data.batching import EncodedSplit
from legend.engine.client import (
    ClientView,
    ClientWork,
    LocalOptimizer,
    finished,
    forward_passes,
    start_training,
    step_loss,
    with_logit_offsets,
)
from legend.engine.prefix_cache import PrefixView
from legend.errors import LegendError
from legend.lora.layout import LORA_FACTOR, lora_modules
from legend.models.placement import peak_memory_mb
from legend.models.shared import SharedModel, fill_leading
from legend.objectives import Objective
from legend.strategies.base import DeviceSide


def per_client_keys(model: SharedModel) -> list[str]:
    """Tensors each client of a group holds its own copy of: LoRA factors and the head (those its plan leaves out,
    FFA-LoRA's frozen A, from the shared model). Every other tensor of the plans is the same global one for all of
    them and stays in the shared model."""
    return [key for key in model.params if LORA_FACTOR.search(key) or model.is_head(key)]


class StackedClients:
    """Inside ``active``: every LoRA layer and head layer computes each client's rows with that client's tensors."""

    def __init__(self, model: SharedModel, tensors: Sequence[dict[str, torch.Tensor]]):
        self.model, self.tensors = model, tensors
        self.sizes: list[tuple[int, int]] = []  # (client index, rows) of the current step, in batch order
        keys = tensors[0].keys()
        self.factor_keys = lora_modules(keys)  # adapted module -> (its A, its B)
        self.lora = {name: model.module.get_submodule(name) for name in self.factor_keys}
        self.heads = sorted({key.rpartition(".")[0] for key in keys if model.is_head(key)})
        for name in self.heads:
            if not isinstance(model.module.get_submodule(name), nn.Linear):
                raise LegendError(
                    f"engine.parallel_clients: the head layer '{name}' is not a linear layer, so its clients cannot share a pass; "
                    "set engine.parallel_clients = 1"
                )

    def _split(self, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        if x.shape[0] != sum(rows for _, rows in self.sizes):
            raise LegendError(
                f"engine.parallel_clients: a layer saw {x.shape[0]} rows where the group has {sum(r for _, r in self.sizes)} "
                "(this model mixes its batch rows); set engine.parallel_clients = 1"
            )
        return list(zip([k for k, _ in self.sizes], x.split([rows for _, rows in self.sizes]), strict=True))

    def _lora_hook(self, name: str):
        layer = self.lora[name]
        a_key, b_key = self.factor_keys[name]
        scaling, dropout = layer.scaling["default"], layer.lora_dropout["default"]

        def add_each_clients_adapter(module, args, output):
            deltas = [
                F.linear(F.linear(dropout(x), self.tensors[k][a_key]), self.tensors[k][b_key]) * scaling for k, x in self._split(args[0])
            ]
            return output + torch.cat(deltas)

        return add_each_clients_adapter

    def _head_hook(self, name: str):
        weight, bias = f"{name}.weight", f"{name}.bias"

        def each_clients_head(module, args, output):
            return torch.cat(
                [F.linear(x, self.tensors[k][weight], self.tensors[k].get(bias, module.bias)) for k, x in self._split(args[0])]
            )

        return each_clients_head

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        handles = [layer.register_forward_hook(self._lora_hook(name)) for name, layer in self.lora.items()]
        handles += [self.model.module.get_submodule(name).register_forward_hook(self._head_hook(name)) for name in self.heads]
        for layer in self.lora.values():
            layer._disable_adapters = True  # PEFT's own (global) adapter stays out of the group's pass
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for layer in self.lora.values():
                layer._disable_adapters = False


def _own_tensors(model: SharedModel, state: State, keys: list[str], trained: set[str]) -> dict[str, torch.Tensor]:
    """A client's copy of ``keys`` at the shared model's full shapes (filled as ``SharedModel.load`` fills them),
    trainable where its layout trains."""
    tensors = {}
    for key in keys:
        param = model.params[key]
        tensor = torch.empty_like(param)
        with torch.no_grad():
            fill_leading(tensor, state.get(key, param.detach()))
        tensors[key] = tensor.requires_grad_(key in trained)
    return tensors


def train_together(
    model: SharedModel,
    objective: Objective,
    work: Sequence[ClientWork],
    data: EncodedSplit,
    cfg: TrainConfig,
    seed: int,
    prefix: PrefixView | None = None,
    device: DeviceSide | None = None,
) -> list[Update]:
    """``train_client`` for several clients at once: each client's update, in the order of ``work``."""
    device = device or DeviceSide()
    states = [{**w.plan.weights, **w.own} for w in work]
    stacked = per_client_keys(model)
    shared = {key: value for key, value in states[0].items() if key not in stacked}
    for state in states[1:]:
        if any(not torch.equal(state[key], value) for key, value in shared.items() if key in state):
            raise ValueError("clients trained together must share every tensor but their LoRA factors and head")
    model.load(shared)
    model.freeze()  # nothing of the shared model trains in a group: the clients' own tensors do
    tensors = [_own_tensors(model, state, stacked, set(model.keys(w.plan.layout))) for w, state in zip(work, states, strict=True)]
    optimizers = [
        LocalOptimizer({k: t for k, t in own.items() if t.requires_grad}, w.plan.lr, cfg, model)
        for own, w in zip(tensors, work, strict=True)
    ]
    views = [ClientView(model, own) for own in tensors]
    group = StackedClients(model, tensors)
    start_training(model, seed)  # dropout: one draw for the group
    losses: list[list[float]] = [[] for _ in work]
    started, forward_backward_s = time.perf_counter(), 0.0
    with group.active():
        for step in range(max(len(w.batches) for w in work)):
            active = [k for k, w in enumerate(work) if step < len(w.batches)]
            group.sizes = [(k, len(work[k].batches[step])) for k in active]
            rows = np.concatenate([work[k].batches[step] for k in active])
            offsets = None if work[0].logit_offsets is None else torch.cat([work[k].logit_offsets.expand(n, -1) for k, n in group.sizes])
            step_started = time.perf_counter()
            with forward_passes(model, rows, prefix):
                sums, counts = objective.row_losses(model.module, model.on_device(with_logit_offsets(data.batch(rows), offsets)))
            total, sizes = 0, [rows for _, rows in group.sizes]
            for k, row_sums, row_counts in zip(active, sums.split(sizes), counts.split(sizes), strict=True):
                loss = row_sums.sum() / row_counts.sum()  # the client's own mean, as one-by-one training computes it
                total = total + step_loss(loss, losses[k], device, views[k], work[k].plan, optimizers[k])  # each at its own loss scale
            total.backward()
            forward_backward_s += time.perf_counter() - step_started
            for k in active:
                optimizers[k].step()
    wall_s, peak_mb = time.perf_counter() - started, peak_memory_mb(model.device)
    share_s, fb_share_s = wall_s / len(work), forward_backward_s / len(work)
    return [finished(model, w, losses[k], share_s, fb_share_s, peak_mb, device, views[k]) for k, w in enumerate(work)]
