"""The Strategy interface every algorithm implements: its server side, and its device side (``DeviceSide``).

A strategy plans each sampled device's adapter layout and starting tensors (``plan``) and turns what
comes back into the new global state (``aggregate``); on the device, local training calls its hooks
(an extra loss term, the tensors the device keeps, the metrics it reports). Engines (embedded, Flower)
only move plans and updates (``legend.core``); no strategy knows which engine runs it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from legend.config import Config
from legend.core import ClientPlan, ModelInfo, State, Update
from legend.devices.capacity import DeviceView
from legend.lora.layout import AdapterLayout
from legend.models.shared import SharedModel
from legend.strategies.aggregate import from_masked_sums

# What a strategy may declare it supports (``Strategy.supports``), read by the rules in ``legend/compat.py``.
QUANTIZED_BASE = "quantized_base"  # model.quantize: LoRA over base weights it never trains, initialises from or merges into
ROBUST_AGGREGATION = "robust_aggregation"  # fl.aggregator median / trimmed_mean: each coordinate combined on its own
SECURE_SUMS = "secure_sums"  # flower.secure_aggregation: the new state follows from sums of the updates (``aggregate_sums``)
DP = "dp"  # privacy.clip_norm: client-level DP calibrates its noise to a weighted mean of coordinates
PARALLEL_GROUPS = "parallel_groups"  # engine.parallel_clients: its clients' LoRA adapters train side by side in one pass
COORDINATE_MEANS = frozenset({ROBUST_AGGREGATION, SECURE_SUMS, DP})  # what aggregating by per-coordinate weighted means allows
LORA_ONLY = frozenset({QUANTIZED_BASE, PARALLEL_GROUPS})  # what trains LoRA over untouched base weights allows


class DeviceSide:
    """What local training asks of a strategy on the device; the default asks nothing (plain local training).

    A strategy whose devices do more (an extra loss term, a metric to report) returns its own from
    ``Strategy.device_side``. The hooks see the shared model with the plan loaded and its layout trainable.
    """

    def extra_loss(self, model: SharedModel, plan: ClientPlan) -> torch.Tensor | None:
        """A term added to each local step's loss (None: none)."""
        return None

    def report(self, model: SharedModel, plan: ClientPlan) -> dict[str, float]:
        """Metrics the device adds to its update after training."""
        return {}

    def kept(self, keys: Iterable[str]) -> set[str]:
        """Which of the tensors it trains (``keys``) a device keeps as its own between rounds: never sent, its runtime
        stores them (a device seen for the first time starts them from the initial global state)."""
        return set()


class Strategy(ABC):
    """Base class: subclasses set ``name`` and implement the layout, the plans and the aggregation."""

    name: ClassVar[str]
    default_lr: ClassVar[float] = 3e-3  # LoRA's few parameters take a larger step than full fine-tuning
    supports: ClassVar[frozenset[str]] = frozenset()  # the capabilities above that it has: none unless declared

    def __init__(self, config: Config, info: ModelInfo):
        self.config = config
        self.info = info

    def lr(self, round_number: int) -> float:
        """The clients' learning rate this round: train.lr (or the strategy's default), warmed up over train.warmup_rounds,
        then under train.lr_schedule."""
        train = self.config.train
        base = train.lr or self.default_lr
        if round_number <= train.warmup_rounds:
            return base * round_number / (train.warmup_rounds + 1)
        if train.lr_schedule == "constant":
            return base
        progress = (round_number - 1 - train.warmup_rounds) / max(self.config.fl.rounds - 1 - train.warmup_rounds, 1)
        return base * (train.lr_min_ratio + (1 - train.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    @property
    def lora_alpha(self) -> float | tuple[float, ...]:
        """LoRA alpha of every block (or one per block); block l's adapter is scaled by alpha_l / r_l."""
        return self.config.lora.alpha

    @property
    def lora_init(self) -> str:
        """How the shared model initialises the LoRA adapters (``lora.init``; FeDeRA always uses its SVD)."""
        return self.config.lora.init

    @abstractmethod
    def global_layout(self) -> AdapterLayout:
        """Every tensor any device may train: the layout the shared model is built with."""

    def initial_state(self, model: SharedModel) -> State:
        """The global state before round 1: the model's freshly initialised trainable tensors."""
        return model.read(self.global_layout())

    @abstractmethod
    def plan(self, round_number: int, clients: list[int], global_state: State, devices: DeviceView) -> dict[int, ClientPlan]:
        """One plan per sampled client; ``devices`` holds the capacity estimates and this round's workloads."""

    @abstractmethod
    def aggregate(self, round_number: int, global_state: State, updates: list[Update]) -> State:
        """The new global state; never mutates its arguments."""

    def aggregate_sums(self, round_number: int, global_state: State, totals: State, masses: State) -> State:
        """The new global state from sums alone (secure aggregation): per coordinate, the sum over the round's devices of
        weight x value (``totals``) and of weight where the device trained it (``masses``), as ``add_masked_terms`` builds
        them. Equal to ``aggregate`` with fl.aggregator='mean' for a strategy that supports SECURE_SUMS; no other can."""
        if SECURE_SUMS not in self.supports:
            raise RuntimeError(f"{self.name} does not aggregate by coordinate means, so it cannot aggregate from sums")
        return {**global_state, **{key: from_masked_sums(global_state[key], totals[key], masses[key]) for key in totals}}

    def device_side(self) -> DeviceSide:
        """The hooks local training calls on every device (built from the config, so a Flower node builds the same)."""
        return DeviceSide()

    def state_dict(self) -> dict[str, Any]:
        """Strategy-private state that must survive a checkpoint (e.g. per-client ranks, running sums)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
