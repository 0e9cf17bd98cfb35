"""The embedded engine: many simulated devices in one process, sharing one base model.

A run is built once (``build_experiment``: data, the shared model, the strategy, the client split) once the
compatibility rules (``legend/compat.py``) pass; then the loop runs the rounds (``engine/round.py``) and after each
writes the checkpoint and metrics.jsonl, so a run resumes at its last finished round.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from legend import compat
from legend.config import Config
from legend.core import State, atomic_write
from legend.data.batching import EncodedSplit, length_buckets
from legend.data.partition import partition_indices
from legend.data.tasks import load_task, subsample
from legend.devices.accounting import Accounting
from legend.devices.activations import KeptActivations
from legend.devices.capacity import CapacityEstimator
from legend.devices.cost import ModelSpec
from legend.devices.fleet import Fleet, build_fleet
from legend.engine.checkpoint import CHECKPOINT, device_state, load_checkpoint, save_checkpoint
from legend.engine.client import LocalTraining
from legend.engine.prefix_cache import MIN_TRAINING_REUSE, PrefixCache, PrefixView, training_reuse
from legend.engine.privacy import epsilon
from legend.engine.round import evaluate_global, run_round
from legend.engine.runtime import InProcess, Runtime
from legend.lora.layout import AdapterLayout
from legend.models.placement import peak_memory_mb, resolve_device, resolve_precision
from legend.models.shared import SharedModel
from legend.objectives import Objective, objective_for
from legend.records import METRICS_FILE, SUMMARY_FILE, RoundRecord, summarize, target_held
from legend.strategies import Strategy, strategy_class
from legend.strategies.coverage import guarded


@dataclass
class Experiment:
    """Everything built once per run: data, the shared model, the strategy, the client split."""

    config: Config
    model: SharedModel
    objective: Objective
    strategy: Strategy
    train: EncodedSplit
    test: EncodedSplit
    test_buckets: list[np.ndarray]
    partitions: list[np.ndarray]
    label_names: tuple[str, ...]
    fleet: Fleet
    spec: ModelSpec
    capacity: CapacityEstimator
    prefix: PrefixCache | None = None
    validation: EncodedSplit | None = None  # held out of the training data (data.val_size)
    validation_buckets: list[np.ndarray] | None = None
    kept: KeptActivations | None = None  # what each device keeps of its activations (devices.activation_cache)
    accounting: Accounting | None = None  # each device's bytes and time in a round (devices/accounting.py)

    def local(self) -> LocalTraining:
        """What local training needs of this run, for one round (``Runtime.train``)."""
        return LocalTraining(
            self.model,
            self.objective,
            self.train,
            self.partitions,
            self.config.train,
            self.strategy.device_side(),
            self.prefix_view("train"),
            len(self.label_names),
        )

    def kept_keys(self, layout: AdapterLayout) -> set[str]:
        """The tensors of this layout that a device keeps as its own (FedSA-LoRA's B): never sent, stored by its runtime."""
        return self.strategy.device_side().kept(self.model.keys(layout))

    def prefix_view(self, split: str) -> PrefixView | None:
        """The frozen-prefix cache for batches of "train", "test" or "validation" (None where it is off, or may not serve training)."""
        if self.prefix is None or (split == "train" and not self.prefix.trains):
            return None
        data = {"train": self.train, "test": self.test, "validation": self.validation}[split]
        return self.prefix.view(split, data, fixed_batches=split != "train")  # evaluation reads the same buckets every time


def build_model(config: Config, label_names: tuple[str, ...]) -> tuple[SharedModel, Objective, Strategy]:
    """The shared model with the strategy's global layout injected and initialised from the seed, the objective of
    data.format, and the strategy: what every run (and every export of one) starts from."""
    device = resolve_device(config.engine.device)  # before loading anything: a missing GPU is one line
    model = SharedModel.build(
        config.model.name,
        len(label_names),
        tuple(config.lora.target_modules),
        config.seed,
        config.model.dropout,
        resolve_precision(config.engine.precision, device),
        causal_lm=config.data.format == "instruct",
        quantize=config.model.quantize,
        device=device,
    )
    objective = objective_for(config, label_names, model.tokenizer)
    strategy = guarded(strategy_class(config.strategy.name)(config, model.info), config)  # the coverage guard, where asked
    compat.check_layout(config, strategy, model.info.num_blocks)
    model.add_adapters(strategy.global_layout(), strategy.lora_alpha, config.lora.dropout, config.seed, strategy.lora_init)
    compat.check_adapters(strategy, model)
    return model.to(device), objective, strategy


def build_experiment(config: Config) -> Experiment:
    torch.set_num_threads(config.engine.threads or os.cpu_count() or 1)
    strategy_cls = strategy_class(config.strategy.name)  # fail on a bad name before loading anything
    resolve_device(config.engine.device)  # and on a missing GPU
    compat.check(config, strategy_cls)
    fleet = build_fleet(config.devices, config.fl.num_clients, config.seed)
    task = subsample(load_task(config.data), config.data, config.seed)
    train_table, test_table = task.train, task.test
    model, objective, strategy = build_model(config, task.label_names)
    test = objective.encode(test_table, config.data.max_length)
    validation = None if task.validation is None else objective.encode(task.validation, config.data.max_length)
    train = objective.encode(train_table, config.data.max_length)
    boundary = model.frozen_prefix(list(strategy.initial_state(model)))
    engine = config.engine
    prefix = None
    if boundary > 0 and engine.cache_mb > 0:  # and for training: no dropout in the skipped blocks, and enough reuse to repay it
        trains = config.model.dropout == 0.0 and training_reuse(config, len(train)) >= MIN_TRAINING_REUSE
        prefix = PrefixCache(
            model,
            boundary,
            engine.cache_mb,
            engine.cache_dtype,
            engine.cache_spill_dir,
            trains,
            engine.cache_device_mb if model.device.type == "cuda" else 0.0,
        )
    spec, kept = ModelSpec.of(model), KeptActivations(model.info.hidden_size, train.lengths) if config.devices.activation_cache else None
    return Experiment(
        config=config,
        model=model,
        objective=objective,
        strategy=strategy,
        train=train,
        test=test,
        test_buckets=length_buckets(test, config.eval.batch_size),
        partitions=partition_indices(train_table, config.fl.num_clients, config.data, config.seed),
        label_names=task.label_names,
        fleet=fleet,
        spec=spec,
        capacity=CapacityEstimator(fleet, config.devices.estimate_noise, config.devices.estimate_ema, config.seed),
        prefix=prefix,
        validation=validation,
        validation_buckets=None if validation is None else length_buckets(validation, config.eval.batch_size),
        kept=kept,
        accounting=Accounting(spec, fleet, strategy.global_layout, config.fl.wire_dtype, config.seed, kept),
    )


def run_experiment(
    config: Config,
    out_dir: Path,
    resume: bool = False,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    experiment: Experiment | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Run (or resume) the configured experiment; writes metrics.jsonl, checkpoint.pt and summary.json.

    ``runtime`` is where the devices train: in this process unless given (Flower passes its own)."""
    if runtime is None:
        compat.check_embedded(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    exp = experiment or build_experiment(config)
    runtime = runtime or InProcess(config.faults, config.engine.client_state_mb, config.engine.parallel_clients)
    fingerprint = config.model_dump()
    if resume:
        saved = load_checkpoint(out_dir, fingerprint)
        global_state, rows = saved["global_state"], saved["metrics"]
        exp.strategy.load_state_dict(saved["strategy_state"])
        exp.capacity.load_state_dict(saved["capacity"])
        if exp.kept is not None:
            exp.kept.load_state_dict(saved["kept"])
        runtime.start(out_dir, {}, device_state(saved))
    else:
        started = time.perf_counter()
        global_state = exp.strategy.initial_state(exp.model)
        runtime.start(out_dir, {key: global_state[key] for key in exp.kept_keys(exp.strategy.global_layout())}, None)
        scored, held_out = evaluate_global(exp, global_state)
        rows = [
            RoundRecord(
                0,
                accuracy=scored.accuracy,
                loss=scored.loss,
                val_accuracy=held_out.accuracy,
                val_loss=held_out.loss,
                wall_s=round(time.perf_counter() - started, 4),
                forward_backward_s=round(scored.forward_s + held_out.forward_s, 4),
                peak_memory_mb=peak_memory_mb(exp.model.device),
            ).row()
        ]
        _persist(out_dir, fingerprint, global_state, exp, runtime, rows)
    if on_round:
        for row in rows:
            on_round(row)
    for round_number in range(rows[-1]["round"] + 1, config.fl.rounds + 1):
        if config.eval.stop_at_target and target_held(rows, config.eval.target_accuracy):
            break
        global_state, row = run_round(exp, runtime, round_number, global_state, rows[-1]["virtual_time_s"])
        rows.append(row)
        _persist(out_dir, fingerprint, global_state, exp, runtime, rows)
        if on_round:
            on_round(row)
    summary = summarize(config.strategy.name, rows, config.eval.target_accuracy)
    if config.privacy.clip_norm > 0:
        rate = config.fl.clients_per_round / config.fl.num_clients
        spent = epsilon(config.privacy.noise_multiplier, rate, summary["rounds"], config.privacy.delta)
        summary.update(
            dp_epsilon=spent if math.isfinite(spent) else None, dp_delta=config.privacy.delta
        )  # null: clipping without noise, no guarantee
    write_summary(out_dir, summary)
    return summary


def run_resumable(config: Config, out_dir: Path, on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Start the run, or resume it from its checkpoint (a finished run only re-reads its summary's rows).

    The checkpoint refuses another config, so a reused directory never mixes two experiments."""
    return run_experiment(config, out_dir, resume=(out_dir / CHECKPOINT).is_file(), on_round=on_round)


def _persist(out_dir: Path, fingerprint: dict, global_state: State, exp: Experiment, runtime: Runtime, rows: list[dict]) -> None:
    """The checkpoint is the source of truth; metrics.jsonl is rewritten from it."""
    save_checkpoint(
        out_dir,
        {
            "config": fingerprint,
            "global_state": global_state,
            "strategy_state": exp.strategy.state_dict(),
            "capacity": exp.capacity.state_dict(),
            "devices": runtime.state_dict(),
            "metrics": rows,
            "kept": exp.kept.state_dict() if exp.kept is not None else {},
        },
    )
    runtime.checkpointed()
    write_metrics(out_dir, rows)


def write_metrics(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write(out_dir / METRICS_FILE, "".join(json.dumps(row) + "\n" for row in rows).encode())


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write(out_dir / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())
