"""What a device does with its plan (local training) and how the server scores the global model."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from legend.config import TrainConfig
from legend.core import ClientPlan, State, Update
from legend.data.batching import EncodedSplit
from legend.engine.prefix_cache import PrefixView
from legend.models.placement import peak_memory_mb, reset_peak_memory
from legend.models.shared import SharedModel
from legend.objectives import LOGIT_OFFSETS, Objective
from legend.strategies.base import DeviceSide

FORWARD_BACKWARD_S = "forward_backward_s"  # metric: seconds of local training spent in forward and backward passes (the rest is overhead)
PEAK_MEMORY_MB = "peak_memory_mb"  # metric: the device's peak memory in local training (placement.peak_memory_mb)


def derived_seed(*parts: int) -> int:
    """A seed for one (seed, round, client) draw: resuming at any round reproduces the same draws."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def local_step_count(num_samples: int, cfg: TrainConfig) -> int:
    if cfg.local_epochs > 0:
        return cfg.local_epochs * math.ceil(num_samples / cfg.batch_size)
    return cfg.local_steps


def training_batches(data: EncodedSplit, indices: np.ndarray, steps: int, cfg: TrainConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """``steps`` batches drawn epoch by epoch from a shuffled stream of the client's rows.

    With group_by_length, each window of 50 batches is sorted by length before it is cut, and the
    batches are then shuffled: the same examples per window, far less padding.
    """
    size = cfg.batch_size
    epochs = max(1, math.ceil(steps * size / len(indices)))
    stream = np.concatenate([rng.permutation(indices) for _ in range(epochs)])[: steps * size]
    if cfg.group_by_length:
        lengths = data.lengths
        window = 50 * size
        stream = np.concatenate([w[np.argsort(lengths[w], kind="stable")] for w in np.split(stream, range(window, len(stream), window))])
    batches = [stream[i : i + size] for i in range(0, len(stream), size)]
    if cfg.group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def client_batches(data: EncodedSplit, indices: np.ndarray, cfg: TrainConfig, seed: int) -> list[np.ndarray]:
    """The batches (row indices) a client trains on this round, drawn from its (seed, round, client) seed."""
    return training_batches(data, indices, local_step_count(len(indices), cfg), cfg, np.random.default_rng(seed))


PIECE_OVERHEAD_TOKENS = 32  # one more forward and backward pass costs about as much as this many more tokens (MiniLM-L6 on one
# CPU thread, benchmarks/batching.py, 2026-12-07: 18.7 ms a pass plus 0.51 ms a token)


def length_pieces(lengths: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
    """One batch as the pieces its step computes apart, each padded only to its own longest row: the rows sorted by length
    and cut where the padded tokens saved outweigh another pass (an exact search over the cuts); ``[rows]`` where no cut pays.
    Their gradients summed are the whole batch's, so the step is the same and only the padding changes."""
    order = rows[np.argsort(lengths[rows], kind="stable")]
    longest = lengths[order]
    cost = np.zeros(len(order) + 1)  # cost[end]: the cheapest pieces of the ``end`` shortest rows
    start_of = np.zeros(len(order) + 1, dtype=np.int64)  # where the last of those pieces starts
    for end in range(1, len(order) + 1):
        starts = np.arange(end)
        costs = cost[:end] + (end - starts) * longest[end - 1] + PIECE_OVERHEAD_TOKENS
        start_of[end] = int(np.argmin(costs))
        cost[end] = costs[start_of[end]]
    bounds, end = [], len(order)
    while end > 0:
        bounds.append((start_of[end], end))
        end = start_of[end]
    if len(bounds) == 1:
        return [rows]
    return [order[start:end] for start, end in reversed(bounds)]


def step_pieces(data: EncodedSplit, rows: np.ndarray, cfg: TrainConfig) -> list[np.ndarray]:
    """What one training step computes at once: the whole batch, or under train.split_by_length its pieces."""
    return length_pieces(data.lengths, rows) if cfg.split_by_length else [rows]


def passes(data: EncodedSplit, batches: list[np.ndarray], cfg: TrainConfig) -> list[np.ndarray]:
    """The rows of each forward and backward pass of local training, in order: each batch, or each of its pieces."""
    return [piece for rows in batches for piece in step_pieces(data, rows, cfg)]


def batch_shapes(data: EncodedSplit, batches: list[np.ndarray]) -> list[tuple[int, int, int]]:
    """(sequences, padded length, positions the output layer projects) of each pass: what the device's compute and memory depend on."""
    return [(len(rows), int(data.lengths[rows].max()), data.outputs(rows)) for rows in batches]


class LocalOptimizer:
    """One device's optimizer step: AdamW, gradient clipping, and under float16 loss scaling (a GradScaler: float16's
    narrow range would flush small gradients to zero; a step whose gradients overflow is skipped and the scale halved)."""

    def __init__(self, params: dict[str, torch.Tensor], lr: float, cfg: TrainConfig, model: SharedModel):
        self.params, self.max_grad_norm = list(params.values()), cfg.max_grad_norm
        groups = [
            {"params": [tensor for key, tensor in params.items() if not model.is_head(key)], "lr": lr},
            {"params": [tensor for key, tensor in params.items() if model.is_head(key)], "lr": lr * cfg.head_lr_ratio},
        ]
        self.optimizer = torch.optim.AdamW([group for group in groups if group["params"]], lr=lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(model.device.type, enabled=model.compute_dtype == torch.float16)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on."""
        return self.scaler.scale(loss)

    def step(self) -> None:
        if self.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def forward_passes(model: SharedModel, rows: np.ndarray, prefix: PrefixView | None = None, skipped: tuple[int, ...] = ()) -> Iterator[None]:
    """Inside: the model's forward passes on these rows run at its compute dtype, from the frozen-prefix cache when given one,
    without the ``skipped`` blocks (a device's layout's, in local training only: the global model is scored whole)."""
    with contextlib.ExitStack() as stack:
        if prefix is not None:
            stack.enter_context(model.starting_at(prefix.boundary, prefix.hidden(rows)))
        stack.enter_context(model.skipping(skipped))
        stack.enter_context(model.autocast())
        yield


def with_logit_offsets(batch: dict[str, torch.Tensor], offsets: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The batch with ``offsets`` ((classes,) for every row, or (rows, classes)) under ``LOGIT_OFFSETS``; unchanged for None."""
    if offsets is not None:
        batch[LOGIT_OFFSETS] = offsets.expand(len(batch["input_ids"]), -1)
    return batch


@dataclass(frozen=True)
class ClientWork:
    """One client's local training: its plan, its batches (row indices), its data size, its own kept tensors
    (``DeviceSide.kept``, as its runtime stored them), and what it adds to its logits (``Objective.logit_offsets``
    of its labels; None: nothing)."""

    plan: ClientPlan
    batches: Sequence[np.ndarray] | Iterator[np.ndarray]  # a list, or (a simulated crash) an iterator that raises
    num_samples: int
    own: State
    logit_offsets: torch.Tensor | None = None


@dataclass
class LocalTraining:
    """What local training needs of a run, and nothing more (``Runtime.train`` takes it): the shared model, the
    objective, the training split and each client's rows of it, the local settings, the frozen-prefix cache's view
    of the training split (None: off), the strategy's device-side hooks, and the number of classes (a label-flipping
    attacker's). Built once per round: each client's batches are drawn once (``batches``), for the round's device
    view and for its training alike."""

    model: SharedModel
    objective: Objective
    data: EncodedSplit
    partitions: list[np.ndarray]
    cfg: TrainConfig
    device: DeviceSide
    prefix: PrefixView | None = None
    num_classes: int = 0
    _drawn: dict[tuple[int, int], list[np.ndarray]] = field(default_factory=dict, repr=False)

    def batches(self, client: int, seed: int) -> list[np.ndarray]:
        """The batches the client trains on with this (seed, round, client) seed."""
        if (client, seed) not in self._drawn:
            self._drawn[client, seed] = client_batches(self.data, self.partitions[client], self.cfg, seed)
        return self._drawn[client, seed]

    def work(self, plan: ClientPlan, seed: int, own: State, data: EncodedSplit | None = None) -> ClientWork:
        """The client's part of local training; ``data``: the same rows with other labels (an attacker's flipped ones)."""
        indices = self.partitions[plan.client]
        offsets = self.objective.logit_offsets(data or self.data, indices)
        return ClientWork(plan, self.batches(plan.client, seed), len(indices), own, offsets)


def start_training(model: SharedModel, seed: int) -> None:
    """Before the first local step: dropout drawn from the seed, the model in training mode, the peak memory reset."""
    torch.manual_seed(seed)
    model.module.train()
    reset_peak_memory(model.device)


def step_loss(
    loss: torch.Tensor, losses: list[float], device: DeviceSide, model: SharedModel, plan: ClientPlan, optimizer: LocalOptimizer
) -> torch.Tensor:
    """One client's loss of one step as backward takes it: recorded, plus the strategy's extra term, at its loss scale."""
    losses.append(loss.item())
    if (extra := device.extra_loss(model, plan)) is not None:
        loss = loss + extra
    return optimizer.scaled(loss)


def finished(
    model: SharedModel,
    work: ClientWork,
    losses: list[float],
    wall_s: float,
    forward_backward_s: float,
    peak_mb: float,
    device: DeviceSide,
    view: ClientView | None = None,
) -> Update:
    """The client's update once its steps are done: its trained tensors (in the shared model, or in ``view``, its
    part of a group), those it keeps apart from those it sends, and its metrics with the strategy's report."""
    plan = work.plan
    metrics = {
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
        "train_wall_s": wall_s,
        FORWARD_BACKWARD_S: forward_backward_s,
        "steps": len(losses),
        PEAK_MEMORY_MB: peak_mb,
    }
    with torch.no_grad():
        metrics.update(device.report(model if view is None else view, plan))
    trained = model.read(plan.layout, None if view is None else view.params)
    sent = {key: value for key, value in trained.items() if key not in work.own}
    kept = {key: value for key, value in trained.items() if key in work.own}
    return Update(plan.client, sent, work.num_samples, metrics, kept, work.own)


class ClientView:
    """The shared model as one client of a group sees it: ``params`` holds that client's own tensors (what a
    strategy's DeviceSide hooks read); everything else is the shared model's."""

    def __init__(self, model: SharedModel, own: dict[str, torch.Tensor]):
        self._model = model
        self.params = {**model.params, **own}

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def train_client(
    model: SharedModel,
    objective: Objective,
    work: ClientWork,
    data: EncodedSplit,
    cfg: TrainConfig,
    seed: int,
    prefix: PrefixView | None = None,
    device: DeviceSide | None = None,
) -> Update:
    """Local AdamW on the objective's loss over the client's batches, starting from the plan's tensors and the device's
    own (together the whole global state). ``device``: the strategy's device-side hooks (an extra loss term, metrics
    to report); none by default. Several clients at once: ``parallel.train_together``, the same steps."""
    device, plan = device or DeviceSide(), work.plan
    model.load({**plan.weights, **work.own})
    optimizer = LocalOptimizer(model.set_trainable(plan.layout), plan.lr, cfg, model)
    start_training(model, seed)
    losses, forward_backward_s = [], 0.0
    started = time.perf_counter()
    for rows in work.batches:
        step_started = time.perf_counter()
        pieces = step_pieces(data, rows, cfg)
        earlier = 0.0  # the loss of the pieces already backpropagated (each a share of the mean over the whole batch)
        for i, piece in enumerate(pieces):
            with forward_passes(model, piece, prefix, plan.layout.skipped_blocks):
                batch = model.on_device(with_logit_offsets(data.batch(piece), work.logit_offsets))
                loss = (
                    objective.loss(model.module, batch)
                    if len(pieces) == 1
                    else objective.row_losses(model.module, batch)[0].sum() / data.outputs(rows)
                )
            if i + 1 < len(pieces):
                optimizer.scaled(loss).backward()
                earlier = earlier + loss.detach()
        step_loss(loss + earlier, losses, device, model, plan, optimizer).backward()
        forward_backward_s += time.perf_counter() - step_started
        optimizer.step()
    return finished(model, work, losses, time.perf_counter() - started, forward_backward_s, peak_memory_mb(model.device), device)


class Evaluation(NamedTuple):
    accuracy: float | None
    loss: float | None  # mean cross-entropy: per sequence (classification) or per response token (instruct)
    forward_s: float  # seconds in the forward passes (and generation)


@torch.no_grad()
def evaluate(
    model: SharedModel, objective: Objective, state: State, data: EncodedSplit, buckets: list[np.ndarray], prefix: PrefixView | None = None
) -> Evaluation:
    """The model with ``state`` loaded, scored by the objective over ``data``."""
    model.load(state)
    model.module.eval()
    correct, loss_sum, loss_count = 0, 0.0, 0
    started = time.perf_counter()
    for rows in buckets:
        with forward_passes(model, rows, prefix):
            scored = objective.score(model.module, model.on_device(data.batch(rows)))
        if scored.correct is None:
            with model.autocast():
                scored = scored._replace(correct=objective.exact_matches(model.module, data, rows))
        correct += scored.correct
        loss_sum += scored.loss_sum
        loss_count += scored.loss_count
    return Evaluation(correct / len(data), loss_sum / max(loss_count, 1), time.perf_counter() - started)
