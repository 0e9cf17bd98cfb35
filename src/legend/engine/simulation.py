"""The embedded engine: many simulated devices in one process, sharing one base model.

The round loop reads top to bottom: sample clients, ask the strategy for plans, train each client
in turn on the shared model, aggregate, evaluate, checkpoint.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from legend.config import Config
from legend.data import EncodedSplit, encode, length_buckets, load_task, partition_indices, subsample
from legend.engine.checkpoint import load_checkpoint, save_checkpoint
from legend.engine.client import derived_seed, evaluate, train_client
from legend.models.shared import SharedModel, State
from legend.report.metrics import summarize, write_metrics, write_summary
from legend.strategies import Strategy, Update, strategy_class
from legend.wire import payload_bytes, through_wire


@dataclass
class Experiment:
    """Everything built once per run: data, the shared model, the strategy, the client split."""

    config: Config
    model: SharedModel
    strategy: Strategy
    train: EncodedSplit
    test: EncodedSplit
    test_buckets: list[np.ndarray]
    partitions: list[np.ndarray]
    label_names: tuple[str, ...]


def build_experiment(config: Config) -> Experiment:
    torch.set_num_threads(config.engine.threads or os.cpu_count() or 1)
    strategy_cls = strategy_class(config.strategy.name)  # fail on a bad name before loading anything
    task = subsample(load_task(config.data), config.data, config.seed)
    train_table, test_table = task.train, task.test
    model = SharedModel.build(config.model.name, len(task.label_names), tuple(config.lora.target_modules), config.seed, config.model.dropout)
    strategy = strategy_cls(config, model.info)
    model.add_adapters(strategy.global_layout(), config.lora.alpha, config.lora.dropout, config.seed)
    test = encode(test_table, model.tokenizer, config.data.max_length)
    return Experiment(
        config=config,
        model=model,
        strategy=strategy,
        train=encode(train_table, model.tokenizer, config.data.max_length),
        test=test,
        test_buckets=length_buckets(test, config.eval.batch_size),
        partitions=partition_indices(train_table, config.fl.num_clients, config.data, config.seed),
        label_names=task.label_names,
    )


def sample_clients(seed: int, round_number: int, num_clients: int, per_round: int) -> list[int]:
    rng = np.random.default_rng([seed, round_number])
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def run_experiment(config: Config, out_dir: Path, resume: bool = False,
                   on_round: Callable[[dict[str, Any]], None] | None = None,
                   experiment: Experiment | None = None) -> dict[str, Any]:
    """Run (or resume) the configured experiment; writes metrics.jsonl, checkpoint.pt and summary.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    exp = experiment or build_experiment(config)
    fingerprint = config.model_dump()
    if resume:
        saved = load_checkpoint(out_dir, fingerprint)
        global_state, rows = saved["global_state"], saved["metrics"]
        exp.strategy.load_state_dict(saved["strategy_state"])
    else:
        started = time.perf_counter()
        global_state = exp.strategy.initial_state(exp.model)
        accuracy, loss = evaluate(exp.model, global_state, exp.test, exp.test_buckets)
        rows = [_row(0, [], accuracy, loss, [], 0, 0, time.perf_counter() - started)]
        _persist(out_dir, fingerprint, global_state, exp.strategy, rows)
    if on_round:
        for row in rows:
            on_round(row)
    for round_number in range(rows[-1]["round"] + 1, config.fl.rounds + 1):
        global_state, row = run_round(exp, round_number, global_state)
        rows.append(row)
        _persist(out_dir, fingerprint, global_state, exp.strategy, rows)
        if on_round:
            on_round(row)
    summary = summarize(config.strategy.name, rows, config.eval.target_accuracy)
    write_summary(out_dir, summary)
    return summary


def run_round(exp: Experiment, round_number: int, global_state: State) -> tuple[State, dict[str, Any]]:
    config, started = exp.config, time.perf_counter()
    clients = sample_clients(config.seed, round_number, config.fl.num_clients, config.fl.clients_per_round)
    plans = exp.strategy.plan(round_number, clients, global_state)
    updates: list[Update] = []
    bytes_down = bytes_up = 0
    for client in clients:
        plan = plans[client]
        bytes_down += payload_bytes(plan.weights if plan.wire is None else plan.wire, config.fl.wire_dtype)
        plan = replace(plan, weights=through_wire(plan.weights, config.fl.wire_dtype))
        update = train_client(exp.model, plan, global_state, exp.train, exp.partitions[client], config.train,
                              derived_seed(config.seed, round_number, client))
        bytes_up += payload_bytes(update.weights, config.fl.wire_dtype)
        updates.append(replace(update, weights=through_wire(update.weights, config.fl.wire_dtype)))
    global_state = exp.strategy.aggregate(round_number, global_state, updates)
    accuracy = loss = None
    if round_number % config.eval.every == 0 or round_number == config.fl.rounds:
        accuracy, loss = evaluate(exp.model, global_state, exp.test, exp.test_buckets)
    row = _row(round_number, clients, accuracy, loss, updates, bytes_up, bytes_down, time.perf_counter() - started)
    return global_state, row


def _row(round_number, clients, accuracy, loss, updates, bytes_up, bytes_down, wall_s) -> dict[str, Any]:
    losses = [u.metrics["train_loss"] for u in updates]
    return {
        "round": round_number,
        "clients": clients,
        "accuracy": accuracy,
        "loss": loss,
        "train_loss": float(np.mean(losses)) if losses else None,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "wall_s": round(wall_s, 4),
    }


def _persist(out_dir: Path, fingerprint: dict, global_state: State, strategy: Strategy, rows: list[dict]) -> None:
    """The checkpoint is the source of truth; metrics.jsonl is rewritten from it."""
    save_checkpoint(out_dir, {"config": fingerprint, "global_state": global_state, "strategy_state": strategy.state_dict(), "metrics": rows})
    write_metrics(out_dir, rows)
