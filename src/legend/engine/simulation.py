"""The embedded engine: many simulated devices in one process, sharing one base model.

The round loop reads top to bottom: sample clients, ask the strategy for plans, train each client
in turn on the shared model, reject unsound updates, aggregate, evaluate, checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from legend.config import Config
from legend.core import ClientPlan, State, Update, atomic_write, numel
from legend.data.batching import EncodedSplit, length_buckets
from legend.data.partition import partition_indices
from legend.data.tasks import load_task, subsample
from legend.devices.activations import KeptActivations
from legend.devices.capacity import (
    BYTES_DOWN,
    BYTES_UP,
    COMPUTE_S,
    DOWNLOAD_S,
    FLOPS,
    UPLOAD_S,
    CapacityEstimator,
    DeviceView,
    estimate_round,
)
from legend.devices.clock import RoundTime, device_time, synchronous_round
from legend.devices.cost import (Batches, ModelSpec, applied_ranks, kept_memory_bytes, layout_numel, lowest_trained_block, require_fits,
                                 training_flops)
from legend.devices.fleet import Fleet, build_fleet
from legend.engine.attacks import MALICIOUS
from legend.engine.checkpoint import CHECKPOINT, device_state, load_checkpoint, save_checkpoint
from legend.engine.client import FORWARD_BACKWARD_S, PEAK_MEMORY_MB, Evaluation, batch_shapes, client_batches, derived_seed, evaluate
from legend.engine.prefix_cache import MIN_TRAINING_REUSE, PrefixCache, PrefixView, training_reuse
from legend.engine.privacy import add_noise, clip_update, epsilon
from legend.engine.runtime import ROUND_TRIP_S, SENT_NUMEL, InProcess, Job, Runtime
from legend.engine.validation import rejection
from legend.errors import LegendError
from legend.models.placement import peak_memory_mb, resolve_device, resolve_precision
from legend.models.shared import SharedModel
from legend.objectives import Objective, objective_for
from legend.records import METRICS_FILE, SUMMARY_FILE, RoundRecord, summarize
from legend.strategies import STRATEGIES, Strategy, strategy_class
from legend.strategies.coverage import enough_clients, guarded, withheld
from legend.wire import through_wire, wire_bytes

log = logging.getLogger(__name__)


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
    model = SharedModel.build(config.model.name, len(label_names), tuple(config.lora.target_modules), config.seed, config.model.dropout,
                              resolve_precision(config.engine.precision, device), causal_lm=config.data.format == "instruct",
                              quantize=config.model.quantize, device=device)
    objective = objective_for(config, label_names, model.tokenizer)
    strategy = guarded(strategy_class(config.strategy.name)(config, model.info), config)  # the coverage guard, where asked
    _check_quantized(config, strategy)
    _check_top_blocks(config, strategy, model.info.num_blocks)
    model.add_adapters(strategy.global_layout(), strategy.lora_alpha, config.lora.dropout, config.seed, strategy.lora_init)
    if not model.keys(strategy.global_layout()):
        raise LegendError(f"{strategy.name} trains no tensor of this {model.info.model_type} model (bitfit: it has no biases): use a LoRA strategy")
    if config.engine.parallel_clients > 1 and strategy.global_layout().method != "lora":
        raise LegendError(f"engine.parallel_clients = {config.engine.parallel_clients} trains clients' LoRA adapters side by side, and {strategy.name} "
                          f"trains {strategy.global_layout().method}: set engine.parallel_clients = 1")
    return model.to(device), objective, strategy


def _check_quantized(config: Config, strategy: Strategy) -> None:
    """QLoRA trains LoRA over frozen quantized weights: nothing may train, initialise from or merge into them."""
    if config.model.quantize == "none":
        return
    method = strategy.global_layout().method
    if method != "lora" or strategy.lora_init != "default" or strategy.changes_base_weights:
        what = f"trains {method}" if method != "lora" else ("initialises LoRA from the weights' SVD" if strategy.lora_init != "default" else "merges LoRA into the base weights")
        raise LegendError(f"model.quantize '{config.model.quantize}' keeps the base weights frozen in bitsandbytes' form, and {strategy.name} {what}: "
                          "use fedit, legend, hetlora, flexlora, ffa, fedsa or fedprox, or model.quantize='none'")


def _check_top_blocks(config: Config, strategy: Strategy, num_blocks: int) -> None:
    top = config.lora.top_blocks
    if top > num_blocks:
        raise LegendError(f"lora.top_blocks ({top}) exceeds the model's {num_blocks} blocks: use at most {num_blocks} (0 = every block)")
    method = strategy.global_layout().method
    if top and method != "lora":
        raise LegendError(f"lora.top_blocks restricts LoRA layouts and {strategy.name} trains {method}: leave lora.top_blocks at 0")


def _check_secure_aggregation(config: Config, averages_coordinates: bool, supported: str) -> None:
    """Secure aggregation hands the server a sum: only what a sum determines can be computed from it."""
    if not averages_coordinates:
        raise LegendError(f"flower.secure_aggregation gives the server only a sum of updates, and {config.strategy.name} does not aggregate by "
                          f"coordinate means: use one of {supported}, or flower.secure_aggregation=false")
    for key, value, why in (("fl.aggregator", config.fl.aggregator != "mean", "a median or trimmed mean needs each update's values"),
                            ("fl.max_update_norm", config.fl.max_update_norm > 0, "the server cannot measure one update's norm"),
                            ("privacy.clip_norm", config.privacy.clip_norm > 0, "server-side clipping needs each update")):
        if value:
            raise LegendError(f"flower.secure_aggregation hides each update from the server, and {key} needs it ({why}): "
                              f"set {key} to its default or flower.secure_aggregation=false")


def build_experiment(config: Config) -> Experiment:
    torch.set_num_threads(config.engine.threads or os.cpu_count() or 1)
    strategy_cls = strategy_class(config.strategy.name)  # fail on a bad name before loading anything
    resolve_device(config.engine.device)  # and on a missing GPU
    supported = ", ".join(sorted(name for name, cls in STRATEGIES.items() if cls.averages_coordinates))
    if config.privacy.clip_norm > 0 and not strategy_cls.averages_coordinates:
        raise LegendError(f"privacy: {config.strategy.name} does not aggregate by averaging, which client-level DP needs: use one of {supported}")
    if config.fl.aggregator != "mean" and not strategy_cls.averages_coordinates:
        raise LegendError(f"fl.aggregator '{config.fl.aggregator}' combines coordinates, and {config.strategy.name} does not aggregate by "
                          f"coordinate means: use one of {supported}, or fl.aggregator='mean'")
    if config.data.format == "instruct" and config.faults.malicious > 0 and config.faults.attack == "label_flip":
        raise LegendError("faults.attack 'label_flip' flips class ids, and data.format='instruct' trains on answer text: use faults.attack='sign_flip' or 'scale'")
    if config.fl.aggregator != "mean" and config.privacy.clip_norm > 0:
        raise LegendError("privacy: client-level DP calibrates its noise to the weighted mean: use fl.aggregator='mean' with privacy.clip_norm")
    if config.flower.secure_aggregation:
        _check_secure_aggregation(config, strategy_cls.averages_coordinates, supported)
    if config.devices.activation_cache and config.model.dropout != 0.0:
        raise LegendError("devices.activation_cache: with dropout in the model the frozen blocks' output differs on every pass, so a device "
                          "cannot keep it: set model.dropout=0 or devices.activation_cache=false")
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
        prefix = PrefixCache(model, boundary, engine.cache_mb, engine.cache_dtype, engine.cache_spill_dir, trains,
                             engine.cache_device_mb if model.device.type == "cuda" else 0.0)
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
        spec=ModelSpec.of(model),
        capacity=CapacityEstimator(fleet, config.devices.estimate_noise, config.devices.estimate_ema, config.seed),
        prefix=prefix,
        validation=validation,
        validation_buckets=None if validation is None else length_buckets(validation, config.eval.batch_size),
        kept=KeptActivations(model.info.hidden_size, train.lengths) if config.devices.activation_cache else None,
    )


def sample_clients(seed: int, round_number: int, available: list[int], per_round: int) -> list[int]:
    """``per_round`` clients drawn uniformly from those whose device is available (all of them if fewer)."""
    rng = np.random.default_rng([seed, round_number])
    return sorted(int(c) for c in rng.choice(available, size=min(per_round, len(available)), replace=False))


def run_experiment(config: Config, out_dir: Path, resume: bool = False,
                   on_round: Callable[[dict[str, Any]], None] | None = None,
                   experiment: Experiment | None = None, runtime: Runtime | None = None) -> dict[str, Any]:
    """Run (or resume) the configured experiment; writes metrics.jsonl, checkpoint.pt and summary.json.

    ``runtime`` is where the devices train: in this process unless given (Flower passes its own)."""
    if runtime is None and config.flower.secure_aggregation:
        raise LegendError("flower.secure_aggregation runs on a Flower deployment (legend deploy local|app): set flower.secure_aggregation=false for an embedded run")
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
        runtime.start(out_dir, {key: global_state[key] for key in kept_keys(exp, exp.strategy.global_layout())}, None)
        scored, held_out = evaluate_global(exp, global_state)
        rows = [RoundRecord(0, accuracy=scored.accuracy, loss=scored.loss, val_accuracy=held_out.accuracy, val_loss=held_out.loss,
                            wall_s=round(time.perf_counter() - started, 4), forward_backward_s=round(scored.forward_s + held_out.forward_s, 4),
                            peak_memory_mb=peak_memory_mb(exp.model.device)).row()]
        _persist(out_dir, fingerprint, global_state, exp, runtime, rows)
    if on_round:
        for row in rows:
            on_round(row)
    for round_number in range(rows[-1]["round"] + 1, config.fl.rounds + 1):
        global_state, row = run_round(exp, runtime, round_number, global_state, rows[-1]["virtual_time_s"])
        rows.append(row)
        _persist(out_dir, fingerprint, global_state, exp, runtime, rows)
        if on_round:
            on_round(row)
    summary = summarize(config.strategy.name, rows, config.eval.target_accuracy)
    if config.privacy.clip_norm > 0:
        rate = config.fl.clients_per_round / config.fl.num_clients
        spent = epsilon(config.privacy.noise_multiplier, rate, summary["rounds"], config.privacy.delta)
        summary.update(dp_epsilon=spent if math.isfinite(spent) else None, dp_delta=config.privacy.delta)  # null: clipping without noise, no guarantee
    write_summary(out_dir, summary)
    return summary


def run_resumable(config: Config, out_dir: Path, on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Start the run, or resume it from its checkpoint (a finished run only re-reads its summary's rows).

    The checkpoint refuses another config, so a reused directory never mixes two experiments."""
    return run_experiment(config, out_dir, resume=(out_dir / CHECKPOINT).is_file(), on_round=on_round)


def run_round(exp: Experiment, runtime: Runtime, round_number: int, global_state: State, clock_s: float) -> tuple[State, dict[str, Any]]:
    """One synchronous round; ``clock_s`` is the virtual time at its start."""
    config, started = exp.config, time.perf_counter()
    online = exp.fleet.available(round_number, config.seed)
    available = runtime.reachable(online)
    clients = sample_clients(config.seed, round_number, available, config.fl.clients_per_round)
    clients = enough_clients(clients, config, round_number)  # none when fewer than secure aggregation or the coverage guard needs
    batches, view = device_view(exp, round_number, clients)
    plans = exp.strategy.plan(round_number, clients, global_state, view) if clients else {}
    memory = {c: _check_plan(exp, plans[c], global_state, view.workload[c]) for c in clients}
    jobs = [Job(round_number, replace(plans[c], weights=through_wire(plans[c].weights, config.fl.wire_dtype)), derived_seed(config.seed, round_number, c))
            for c in clients]
    returned = runtime.train(exp, jobs)
    summed = runtime.summed()  # secure aggregation: the server holds only the sum of the updates
    lost = {c: outcome for c, outcome in returned.items() if isinstance(outcome, str)}
    for client, reason in lost.items():
        log.warning("round %d: client %d lost: %s", round_number, client, reason)
    results = [_received(exp, round_number, plans[c], view.workload[c], batches[c], outcome) for c, outcome in returned.items() if c not in lost]
    times = [t for _, t in results]
    round_s, dropped = synchronous_round(times, config.devices.deadline_s)
    arrived = [u for u, _ in results if u.client not in dropped]
    expected = {u.client: _expected(exp, plans[u.client], global_state) for u in arrived}
    rejected = {}
    for update in arrived if summed is None else []:  # under secure aggregation each device checks its own (flower/secure.py)
        want = expected[update.client]
        if reason := rejection(update, want.sent, want.start, config.fl.max_update_norm, want.kept):
            rejected[update.client] = reason
            log.warning("round %d: update of client %d rejected: %s", round_number, update.client, reason)
    valid = [u for u in arrived if u.client not in rejected]
    for update in valid:
        exp.capacity.observe(update.client, update.metrics)
    privacy = config.privacy
    if privacy.clip_norm > 0:
        valid = [clip_update(u, expected[u.client].start, privacy.clip_norm) for u in valid]
    skipped = len(valid) < config.fl.min_clients
    if not skipped:
        if summed is None:
            global_state = exp.strategy.aggregate(round_number, global_state, valid)
        else:
            global_state = exp.strategy.aggregate_sums(round_number, global_state, summed.totals, summed.masses)
        runtime.keep(valid)
        if privacy.noise_multiplier > 0:
            noise = torch.Generator().manual_seed(derived_seed(config.seed, round_number, 23))
            global_state = add_noise(global_state, valid, privacy.noise_multiplier, privacy.clip_norm, noise)
    accuracy = loss = val_accuracy = val_loss = None
    forward_backward_s = sum(u.metrics.get(FORWARD_BACKWARD_S, 0.0) for u, _ in results)
    if round_number % config.eval.every == 0 or round_number == config.fl.rounds:
        scored, held_out = evaluate_global(exp, global_state)
        accuracy, loss, val_accuracy, val_loss = scored.accuracy, scored.loss, held_out.accuracy, held_out.loss
        forward_backward_s += scored.forward_s + held_out.forward_s
    losses = [u.metrics["train_loss"] for u in valid]
    record = RoundRecord(
        round=round_number,
        clients=sorted([t.client for t in times] + list(lost)),
        accuracy=accuracy,
        loss=loss,
        val_accuracy=val_accuracy,
        val_loss=val_loss,
        train_loss=float(np.mean(losses)) if losses else None,
        bytes_up=sum(t.bytes_up for t in times if t.client not in dropped),  # every update that arrived (rejected ones were sent too)
        bytes_down=sum(sent_bytes(plans[c], config.fl.wire_dtype) for c in clients),  # every device that was sent a plan
        round_time_s=round(round_s, 4),
        virtual_time_s=round(clock_s + round_s, 4),
        dropped=sorted(dropped),
        devices=[{**t.as_row(t.client in dropped), "rank_by_block": list(plans[t.client].layout.rank_by_block),
                  "memory_gb": round(memory[t.client] / 1e9, 4), **_storage(exp, t.client)} for t in times],
        rejected=[{"client": client, "reason": reason} for client, reason in rejected.items()],
        lost=[{"client": client, "reason": reason} for client, reason in sorted(lost.items())],
        unreachable=sorted(set(online) - set(available)),
        malicious=sorted(u.client for u, _ in results if u.metrics.get(MALICIOUS)),
        skipped=skipped,
        withheld=withheld(exp.strategy, round_number),
        secure_aggregation=None if summed is None else {"bytes_down": summed.bytes_down, "bytes_up": summed.bytes_up, "seconds": round(summed.seconds, 4)},
        wall_s=round(time.perf_counter() - started, 4),
        forward_backward_s=round(forward_backward_s, 4),
        peak_memory_mb=max([peak_memory_mb(exp.model.device)] + [u.metrics.get(PEAK_MEMORY_MB, 0.0) for u, _ in results]),  # here, and each node's
    )
    return global_state, record.row()


def _storage(exp: Experiment, client: int) -> dict[str, Any]:
    """What a device that keeps its activations holds: how many blocks they skip, and their storage (MB)."""
    if exp.kept is None:
        return {}
    edge, _, used = exp.kept.held.get(client, (0, set(), 0))
    return {"kept_blocks": edge, "storage_mb": round(used / 1e6, 4)}


def evaluate_global(exp: Experiment, state: State) -> tuple[Evaluation, Evaluation]:
    """The global model scored on the test split and on the validation split (all None without data.val_size)."""
    test = evaluate(exp.model, exp.objective, state, exp.test, exp.test_buckets, exp.prefix_view("test"))
    if exp.validation is None:
        return test, Evaluation(None, None, 0.0)
    return test, evaluate(exp.model, exp.objective, state, exp.validation, exp.validation_buckets, exp.prefix_view("validation"))


def kept_keys(exp: Experiment, layout) -> set[str]:
    """The tensors of this layout that a device keeps as its own (FedSA-LoRA's B): never sent, stored by its runtime."""
    return exp.strategy.device_side().kept(exp.model.keys(layout))


def _check_plan(exp: Experiment, plan: ClientPlan, global_state: State, work: Batches) -> int:
    """The memory the plan needs on its device (bytes). A plan must fit that memory, and carry every global tensor
    the device does not keep itself or skip (its layout's skipped blocks never run): a device loads its plan and its own
    tensors, nothing else."""
    device = exp.fleet.device_of(plan.client)
    extra = kept_memory_bytes(exp.spec, work) if keeps_activations(exp, plan.client) else 0
    needed = require_fits(exp.spec, plan.layout, work, device.profile.memory_gb, f"client {plan.client} ({device.kind})", extra)
    skipped = {key for key in global_state if exp.model.block_of(key) in plan.layout.skipped_blocks}
    missing = global_state.keys() - plan.weights.keys() - kept_keys(exp, plan.layout) - skipped
    if missing:
        raise RuntimeError(f"{exp.strategy.name}: the plan of client {plan.client} leaves out global tensors {sorted(missing)[:3]}")
    return needed


Shapes = dict[str, tuple[tuple[int, ...], torch.dtype]]  # tensor -> (shape, dtype)


class Expected(NamedTuple):
    """What a plan asks its device to send back, the values it started those from, and what it keeps."""

    sent: Shapes
    start: State
    kept: Shapes


def _expected(exp: Experiment, plan: ClientPlan, global_state: State) -> Expected:
    received = {**global_state, **plan.weights}
    shapes = exp.model.device_shapes(plan.layout)
    kept = kept_keys(exp, plan.layout)
    sent = {key: shape for key, shape in shapes.items() if key not in kept}
    return Expected(sent={key: (shape, exp.model.params[key].dtype) for key, shape in sent.items()},
                    start={key: received[key][tuple(slice(0, n) for n in shape)] for key, shape in sent.items()},
                    kept={key: (shapes[key], exp.model.params[key].dtype) for key in kept})


def activation_edge(exp: Experiment) -> int:
    """The lowest block of the global LoRA region: a device that keeps its activations keeps those entering it."""
    return lowest_trained_block(exp.spec, exp.strategy.global_layout())


def keeps_activations(exp: Experiment, client: int) -> bool:
    """Whether the client's device keeps activations: the cache is on, there are blocks below the edge, and it has storage for them."""
    return exp.kept is not None and activation_edge(exp) > 0 and exp.fleet.device_of(client).profile.storage_gb > 0


def device_view(exp: Experiment, round_number: int, clients: list[int]) -> tuple[dict[int, list[np.ndarray]], DeviceView]:
    """Each client's batches this round (drawn from (seed, round, client), whatever its plan) and what the strategy may know."""
    config = exp.config
    batches = {c: client_batches(exp.train, exp.partitions[c], config.train, derived_seed(config.seed, round_number, c)) for c in clients}
    workload = {c: Batches.of(batch_shapes(exp.train, b)) for c, b in batches.items()}
    return batches, DeviceView(exp.spec, exp.capacity.estimates(), workload, config.fl.wire_dtype)


def preview_plans(exp: Experiment) -> list[dict[str, Any]]:
    """The strategy's round-1 plans for every client as if all were sampled, each with its estimated cost (``legend plan``)."""
    clients = list(range(exp.config.fl.num_clients))
    batches, view = device_view(exp, 1, clients)
    plans = exp.strategy.plan(1, clients, exp.strategy.initial_state(exp.model), view)
    global_layout, wire = exp.strategy.global_layout(), exp.config.fl.wire_dtype
    rows = []
    for client, plan in plans.items():
        applied = applied_ranks(plan.layout, global_layout)
        down = sent_bytes(plan, wire)
        up = wire_bytes(layout_numel(exp.model, plan.layout, exclude=kept_keys(exp, plan.layout)), wire)
        estimate = estimate_round(view, client, plan.layout, applied, down, up)
        row = {"client": client, "device": view.capacity[client].kind, "depth": plan.layout.depth, "rank_by_block": list(plan.layout.rank_by_block),
               "compute_s": estimate.compute_s, "communication_s": estimate.download_s + estimate.upload_s, "round_s": estimate.total_s,
               "memory_gb": estimate.memory_bytes / 1e9, "bytes_down": down, "bytes_up": up, "kept_blocks": 0, "storage_mb": 0.0}
        if keeps_activations(exp, client):
            row.update(_kept_preview(exp, client, plan, view, batches[client], applied, estimate))
        rows.append(row)
    return rows


def _kept_preview(exp: Experiment, client: int, plan: ClientPlan, view: DeviceView, batches: list[np.ndarray], applied, estimate: RoundTime) -> dict:
    """A device that keeps its activations, once it has stored its examples (in their partition order, while room is left): the
    blocks it skips, its storage, the memory of reading them, and its compute time in such a later round."""
    edge, profile = activation_edge(exp), exp.fleet.device_of(client).profile
    ledger = KeptActivations(exp.kept.hidden, exp.kept.lengths)
    ledger.round(client, [exp.partitions[client]], edge, profile.storage_gb)
    later = ledger.round(client, batches, edge, profile.storage_gb)
    flops = training_flops(exp.spec, plan.layout, view.workload[client], applied, later)
    read_s = later.read_bytes / (profile.storage_mb_s * 1e6)
    return {"kept_blocks": edge, "storage_mb": later.stored_bytes / 1e6,
            "memory_gb": (estimate.memory_bytes + kept_memory_bytes(exp.spec, view.workload[client])) / 1e9,
            "later_compute_s": flops / view.capacity[client].flops_per_s + read_s}


def sent_bytes(plan: ClientPlan, wire_dtype: str) -> int:
    """Bytes of the plan on the wire (its compact form where it has one)."""
    return wire_bytes(numel(plan.weights if plan.wire is None else plan.wire), wire_dtype)


def _received(exp: Experiment, round_number: int, plan: ClientPlan, work: Batches, batches: list[np.ndarray], update: Update) -> tuple[Update, RoundTime]:
    """The update as the server receives it, with the device's report of its round in its metrics, and its times.

    Virtual clock: times from the device's profile and this round's link draw. Measured clock (Flower
    nodes with flower.clock = "measured"): the node's own compute time, and the rest of the round
    trip the server saw, split between download and upload by their bytes. A device that keeps its activations
    (devices.activation_cache) runs the blocks below the global LoRA region only on the rows it has not stored, and reads the rest."""
    config, client = exp.config, plan.client
    wire = config.fl.wire_dtype
    device = exp.fleet.device_of(client)
    bytes_down, bytes_up = sent_bytes(plan, wire), wire_bytes(int(update.metrics.get(SENT_NUMEL, numel(update.weights))), wire)
    kept = exp.kept.round(client, batches, activation_edge(exp), device.profile.storage_gb) if keeps_activations(exp, client) else None
    flops = training_flops(exp.spec, plan.layout, work, applied_ranks(plan.layout, exp.strategy.global_layout()), kept)
    if config.flower.clock == "measured" and ROUND_TRIP_S in update.metrics:
        compute_s = update.metrics["train_wall_s"]
        transfer_s = max(update.metrics[ROUND_TRIP_S] - compute_s, 0.0)
        share_down = bytes_down / max(bytes_down + bytes_up, 1)
        times = RoundTime(client, device.kind, transfer_s * share_down, compute_s, transfer_s * (1 - share_down), bytes_down, bytes_up)
    else:
        compute_s = flops / device.profile.flops  # the FLOPs alone: the capacity estimate is a FLOP rate, whatever the device reads
        read_s = kept.read_bytes / (device.profile.storage_mb_s * 1e6) if kept else 0.0
        times = device_time(client, device.kind, flops, device.profile.flops, bytes_down, bytes_up, exp.fleet.link(client, round_number, config.seed), read_s)
    report = {FLOPS: flops, COMPUTE_S: compute_s, BYTES_DOWN: times.bytes_down, DOWNLOAD_S: times.download_s,
              BYTES_UP: times.bytes_up, UPLOAD_S: times.upload_s}
    return replace(update, weights=through_wire(update.weights, wire), metrics={**update.metrics, **report}), times


def _persist(out_dir: Path, fingerprint: dict, global_state: State, exp: Experiment, runtime: Runtime, rows: list[dict]) -> None:
    """The checkpoint is the source of truth; metrics.jsonl is rewritten from it."""
    save_checkpoint(out_dir, {"config": fingerprint, "global_state": global_state, "strategy_state": exp.strategy.state_dict(),
                              "capacity": exp.capacity.state_dict(), "devices": runtime.state_dict(), "metrics": rows,
                              "kept": exp.kept.state_dict() if exp.kept is not None else {}})
    runtime.checkpointed()
    write_metrics(out_dir, rows)


def write_metrics(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write(out_dir / METRICS_FILE, "".join(json.dumps(row) + "\n" for row in rows).encode())


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write(out_dir / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())
