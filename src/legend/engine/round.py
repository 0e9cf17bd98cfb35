"""One synchronous round, step by step as Flower's strategy loop reads:

    sample -> plan -> send -> train -> receive -> admit -> aggregate -> evaluate -> record

The strategy plans and aggregates, the runtime trains (in this process or on Flower nodes), the devices side
charges each device's time and bytes (``devices/accounting.py``); this file only moves their results along.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from legend.core import ClientPlan, SecureSum, State, Update, numel
from legend.devices.accounting import sent_bytes
from legend.devices.capacity import DeviceView
from legend.devices.clock import RoundTime, synchronous_round
from legend.devices.cost import Batches, kept_memory_bytes, layout_numel, require_fits
from legend.devices.preview import preview_rows
from legend.engine.attacks import MALICIOUS
from legend.engine.client import FORWARD_BACKWARD_S, PEAK_MEMORY_MB, Evaluation, LocalTraining, batch_shapes, derived_seed, evaluate, passes
from legend.engine.privacy import add_noise, clip_update
from legend.engine.runtime import ROUND_TRIP_S, SENT_NUMEL, Job, Runtime
from legend.engine.validation import rejection
from legend.models.placement import peak_memory_mb
from legend.records import RoundRecord
from legend.strategies.coverage import enough_clients, withheld
from legend.wire import through_wire

if TYPE_CHECKING:
    from legend.engine.simulation import Experiment

log = logging.getLogger(__name__)


def run_round(exp: Experiment, runtime: Runtime, round_number: int, global_state: State, clock_s: float) -> tuple[State, dict[str, Any]]:
    """One round from ``global_state``; ``clock_s`` is the virtual time at its start. Returns the new state and the round's record."""
    started, local = time.perf_counter(), exp.local()
    online, available, clients = sample(exp, runtime, round_number)
    batches, view = device_view(exp, local, round_number, clients)
    plans, memory = plan(exp, round_number, clients, global_state, view)
    jobs = send(exp, round_number, clients, plans)
    returned = runtime.train(local, jobs)
    summed = runtime.summed()  # secure aggregation: the server holds only the sum of the updates
    lost, results = receive(exp, runtime, round_number, plans, view, batches, returned)
    round_s, dropped = synchronous_round([t for _, t in results], exp.config.devices.deadline_s)
    arrived = [u for u, _ in results if u.client not in dropped]
    valid, rejected, expected = admit(exp, round_number, arrived, plans, global_state, summed)
    global_state, skipped = aggregate(exp, runtime, round_number, global_state, valid, expected, summed)
    scored, held_out = evaluate_round(exp, round_number, global_state)
    config, times = exp.config, [t for _, t in results]
    losses = [u.metrics["train_loss"] for u in valid]
    record = RoundRecord(
        round=round_number,
        clients=sorted([t.client for t in times] + list(lost)),
        accuracy=scored.accuracy,
        loss=scored.loss,
        val_accuracy=held_out.accuracy,
        val_loss=held_out.loss,
        train_loss=float(np.mean(losses)) if losses else None,
        bytes_up=sum(t.bytes_up for t in times if t.client not in dropped),  # every update that arrived (rejected ones were sent too)
        bytes_down=sum(sent_bytes(plans[c], config.fl.wire_dtype) for c in clients),  # every device that was sent a plan
        round_time_s=round(round_s, 4),
        virtual_time_s=round(clock_s + round_s, 4),
        dropped=sorted(dropped),
        devices=exp.accounting.device_rows(times, dropped, plans, memory),
        rejected=[{"client": client, "reason": reason} for client, reason in rejected.items()],
        lost=[{"client": client, "reason": reason} for client, reason in sorted(lost.items())],
        unreachable=sorted(set(online) - set(available)),
        malicious=sorted(u.client for u, _ in results if u.metrics.get(MALICIOUS)),
        skipped=skipped,
        withheld=withheld(exp.strategy, round_number),
        secure_aggregation=None
        if summed is None
        else {"bytes_down": summed.bytes_down, "bytes_up": summed.bytes_up, "seconds": round(summed.seconds, 4)},
        wall_s=round(time.perf_counter() - started, 4),
        forward_backward_s=round(
            sum(u.metrics.get(FORWARD_BACKWARD_S, 0.0) for u, _ in results) + (scored.forward_s + held_out.forward_s), 4
        ),
        peak_memory_mb=max(
            [peak_memory_mb(exp.model.device)] + [u.metrics.get(PEAK_MEMORY_MB, 0.0) for u, _ in results]
        ),  # here, and each node's
    )
    return global_state, record.row()


def sample(exp: Experiment, runtime: Runtime, round_number: int) -> tuple[list[int], list[int], list[int]]:
    """The devices online this round, those of them the runtime can reach, and the clients sampled from those."""
    config = exp.config
    online = exp.fleet.available(round_number, config.seed)
    available = runtime.reachable(online)
    clients = sample_clients(config.seed, round_number, available, config.fl.clients_per_round)
    clients = enough_clients(clients, config, round_number)  # none when fewer than secure aggregation or the coverage guard needs
    return online, available, clients


def sample_clients(seed: int, round_number: int, available: list[int], per_round: int) -> list[int]:
    """``per_round`` clients drawn uniformly from those whose device is available (all of them if fewer)."""
    rng = np.random.default_rng([seed, round_number])
    return sorted(int(c) for c in rng.choice(available, size=min(per_round, len(available)), replace=False))


def device_view(
    exp: Experiment, local: LocalTraining, round_number: int, clients: list[int]
) -> tuple[dict[int, list[np.ndarray]], DeviceView]:
    """Each client's passes of local training this round (its batches, drawn from (seed, round, client) whatever its plan,
    or their pieces: what its device computes and keeps) and what the strategy may know."""
    config = exp.config
    batches = {c: passes(local.data, local.batches(c, derived_seed(config.seed, round_number, c)), local.cfg) for c in clients}
    workload = {c: Batches.of(batch_shapes(local.data, b)) for c, b in batches.items()}
    return batches, DeviceView(exp.spec, exp.capacity.estimates(), workload, config.fl.wire_dtype)


def plan(
    exp: Experiment, round_number: int, clients: list[int], global_state: State, view: DeviceView
) -> tuple[dict[int, ClientPlan], dict[int, int]]:
    """The strategy's plan of each sampled client, and the memory each needs on its device (bytes), checked."""
    plans = exp.strategy.plan(round_number, clients, global_state, view) if clients else {}
    return plans, {c: _check_plan(exp, plans[c], global_state, view.workload[c]) for c in clients}


def _check_plan(exp: Experiment, plan: ClientPlan, global_state: State, work: Batches) -> int:
    """The memory the plan needs on its device (bytes). A plan must fit that memory, and carry every global tensor
    the device does not keep itself or skip (its layout's skipped blocks never run): a device loads its plan and its own
    tensors, nothing else."""
    device = exp.fleet.device_of(plan.client)
    extra = kept_memory_bytes(exp.spec, work) if exp.accounting.keeps_activations(plan.client) else 0
    needed = require_fits(exp.spec, plan.layout, work, device.profile.memory_gb, f"client {plan.client} ({device.kind})", extra)
    skipped = {key for key in global_state if exp.model.block_of(key) in plan.layout.skipped_blocks}
    missing = global_state.keys() - plan.weights.keys() - exp.kept_keys(plan.layout) - skipped
    if missing:
        raise RuntimeError(f"{exp.strategy.name}: the plan of client {plan.client} leaves out global tensors {sorted(missing)[:3]}")
    return needed


def send(exp: Experiment, round_number: int, clients: list[int], plans: dict[int, ClientPlan]) -> list[Job]:
    """Each client's plan as its device receives it (through the wire's dtype), with the seed of its batches and dropout."""
    config = exp.config
    return [
        Job(
            round_number,
            replace(plans[c], weights=through_wire(plans[c].weights, config.fl.wire_dtype)),
            derived_seed(config.seed, round_number, c),
        )
        for c in clients
    ]


def receive(
    exp: Experiment,
    runtime: Runtime,
    round_number: int,
    plans: dict[int, ClientPlan],
    view: DeviceView,
    batches: dict[int, list[np.ndarray]],
    returned: dict[int, Update | str],
) -> tuple[dict[int, str], list[tuple[Update, RoundTime]]]:
    """Why each lost device sent nothing, and every other update as the server receives it (through the wire), with the
    device's times and its report of them in its metrics (``devices/accounting.py``)."""
    lost = {c: outcome for c, outcome in returned.items() if isinstance(outcome, str)}
    for client, reason in lost.items():
        log.warning("round %d: client %d lost: %s", round_number, client, reason)
    results = []
    for client, update in returned.items():
        if client in lost:
            continue
        metrics = update.metrics
        measured = (metrics["train_wall_s"], metrics[ROUND_TRIP_S]) if runtime.clock == "measured" and ROUND_TRIP_S in metrics else None
        times, report = exp.accounting.received(
            round_number,
            plans[client],
            view.workload[client],
            batches[client],
            int(metrics.get(SENT_NUMEL, numel(update.weights))),
            measured,
        )
        results.append(
            (replace(update, weights=through_wire(update.weights, exp.config.fl.wire_dtype), metrics={**metrics, **report}), times)
        )
    return lost, results


Shapes = dict[str, tuple[tuple[int, ...], torch.dtype]]  # tensor -> (shape, dtype)


class Expected(NamedTuple):
    """What a plan asks its device to send back, the values it started those from, and what it keeps."""

    sent: Shapes
    start: State
    kept: Shapes


def _expected(exp: Experiment, plan: ClientPlan, global_state: State) -> Expected:
    received = {**global_state, **plan.weights}
    shapes = exp.model.device_shapes(plan.layout)
    kept = exp.kept_keys(plan.layout)
    sent = {key: shape for key, shape in shapes.items() if key not in kept}
    return Expected(
        sent={key: (shape, exp.model.params[key].dtype) for key, shape in sent.items()},
        start={key: received[key][tuple(slice(0, n) for n in shape)] for key, shape in sent.items()},
        kept={key: (shapes[key], exp.model.params[key].dtype) for key in kept},
    )


def admit(
    exp: Experiment, round_number: int, arrived: list[Update], plans: dict[int, ClientPlan], global_state: State, summed: SecureSum | None
) -> tuple[list[Update], dict[int, str], dict[int, Expected]]:
    """The sound updates (each checked against what its plan asked for: ``engine/validation.py``), why the others were
    rejected, and what each plan expected. The capacity estimates learn from the sound ones' reports."""
    config = exp.config
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
    return valid, rejected, expected


def aggregate(
    exp: Experiment,
    runtime: Runtime,
    round_number: int,
    global_state: State,
    valid: list[Update],
    expected: dict[int, Expected],
    summed: SecureSum | None,
) -> tuple[State, bool]:
    """The new global state (client-level DP: clipped updates, noise on the aggregate), and whether the round was skipped
    (fewer sound updates than fl.min_clients: the state stays)."""
    config, privacy = exp.config, exp.config.privacy
    if privacy.clip_norm > 0:
        valid = [clip_update(u, expected[u.client].start, privacy.clip_norm) for u in valid]
    if len(valid) < config.fl.min_clients:
        return global_state, True
    if summed is None:
        global_state = exp.strategy.aggregate(round_number, global_state, valid)
    else:
        global_state = exp.strategy.aggregate_sums(round_number, global_state, summed.totals, summed.masses)
    runtime.keep(valid)
    if privacy.noise_multiplier > 0:
        noise = torch.Generator().manual_seed(derived_seed(config.seed, round_number, 23))
        global_state = add_noise(global_state, valid, privacy.noise_multiplier, privacy.clip_norm, noise)
    return global_state, False


NOT_EVALUATED = Evaluation(None, None, 0.0)


def evaluate_round(exp: Experiment, round_number: int, state: State) -> tuple[Evaluation, Evaluation]:
    """The global model scored every eval.every rounds and after the last (``evaluate_global``); else nothing."""
    config = exp.config
    if round_number % config.eval.every == 0 or round_number == config.fl.rounds:
        return evaluate_global(exp, state)
    return NOT_EVALUATED, NOT_EVALUATED


def evaluate_global(exp: Experiment, state: State) -> tuple[Evaluation, Evaluation]:
    """The global model scored on the test split and on the validation split (all None without data.val_size)."""
    test = evaluate(exp.model, exp.objective, state, exp.test, exp.test_buckets, exp.prefix_view("test"))
    if exp.validation is None:
        return test, NOT_EVALUATED
    return test, evaluate(exp.model, exp.objective, state, exp.validation, exp.validation_buckets, exp.prefix_view("validation"))


def preview_plans(exp: Experiment) -> list[dict[str, Any]]:
    """The strategy's round-1 plans for every client as if all were sampled, each with its estimated cost (``legend plan``)."""
    clients = list(range(exp.config.fl.num_clients))
    batches, view = device_view(exp, exp.local(), 1, clients)
    plans = exp.strategy.plan(1, clients, exp.strategy.initial_state(exp.model), view)
    up_numel = {c: layout_numel(exp.model, p.layout, exclude=exp.kept_keys(p.layout)) for c, p in plans.items()}
    return preview_rows(plans, view, batches, up_numel, exp.partitions, exp.accounting)
