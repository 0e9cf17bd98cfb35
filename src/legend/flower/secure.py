"""Secure aggregation on Flower (``flower.secure_aggregation``): Flower's own SecAgg+ carries legend's updates.

The ServerApp never receives an update, only the sum over the round's devices: each device adds its update,
padded to the global layout, as weight x value, and beside it its weight where it trained, at the granularity that
varies (per rank row of a LoRA factor, per other tensor: ``coverage_numel``); the server spreads the weights' sum over
the coordinates and the strategy divides the two sums (``Strategy.aggregate_sums``). That is LEGEND's masked average,
and FedIT's mean where every device trains every coordinate.

Flower's ``SecAggPlusWorkflow`` drives the four stages (keys, shares, masked vectors, unmasking) through its
legacy-Strategy interface, which ``SumCollector`` speaks; on the node Flower's ``secaggplus_mod`` quantises and
masks what legend's ClientApp returns. No cryptography here is ours. SecAgg+ sums integers: a node sends each
number quantised to 2^31 / 2^ceil(log2 clients) levels over [-flower.secure_clip, flower.secure_clip] (stochastic rounding,
seeded per job so the run is deterministic), masked modulo 2^32 and sent in 32-bit words (``apps.recode_masked``): the
global layout's numbers and the weights, with the key exchange, are the cost each round's ``secure_aggregation``
record measures.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as FlowerStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from legend.config import FlowerConfig
from legend.core import SecureSum, State, Update
from legend.engine.runtime import ROUND_TRIP_S, SENT_NUMEL, Job
from legend.errors import LegendError
from legend.flower.apps import recode_masked
from legend.flower.messages import job_from_meta, job_meta
from legend.lora.layout import LORA_FACTOR, AdapterLayout
from legend.strategies.aggregate import add_masked_terms
from legend.strategies.coverage import thinly_covered
from legend.wire import through_wire

JOB = "legend-job"  # the FitIns config entry holding the job's meta (JSON); its tensors are the FitIns parameters, by sorted name
REPORT = "legend-update"  # the FitRes metric holding the device's report (JSON): what it trained on, never what it trained
MODULUS = 2**32  # SecAgg+'s mask range: the largest Flower allows


def quantization_range(clients: int) -> int:
    """Levels per number such that the sum of ``clients`` quantised numbers stays below the modulus."""
    return MODULUS >> (math.ceil(math.log2(max(clients, 1))) + 1)


# --- on the node -------------------------------------------------------------------------------------------------


def read_job(content: RecordDict) -> tuple[Job, float, dict[str, tuple[int, ...]]]:
    """The job a SecAgg+ train message carries, the weight scale (the round's total samples) it divides by, and the
    global layout's shapes (the server's: every node pads to the same)."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    meta = json.loads(str(fitins.config[JOB]))
    arrays = parameters_to_ndarrays(fitins.parameters)
    weights = {key: torch.from_numpy(np.array(array)) for key, array in zip(meta["keys"], arrays, strict=True)}
    return job_from_meta(meta, weights), float(meta["weight_scale"]), {key: tuple(shape) for key, shape in meta["shapes"].items()}


def rank_axis(key: str, shape: tuple[int, ...]) -> int | None:
    """The axis along which a device trains a leading slice of this global tensor: a LoRA factor's rank (A's rows, B's
    columns); None for a tensor a device trains whole or not at all (the head, a bottleneck adapter, a bias)."""
    factor = LORA_FACTOR.search(key)
    return None if factor is None or len(shape) != 2 else (0 if factor.group(1) == "lora_A" else 1)


def coverage_numel(key: str, shape: tuple[int, ...]) -> int:
    """How many numbers a device's weight on this tensor takes: one per rank row of a LoRA factor, else one."""
    axis = rank_axis(key, shape)
    return 1 if axis is None else shape[axis]


def spread_masses(global_shapes: dict[str, tuple[int, ...]], masses: torch.Tensor) -> State:
    """The per-coordinate weight sums from the compact vector ``summand`` sends (per tensor by sorted name, per rank row)."""
    out, start = {}, 0
    for key in sorted(global_shapes):
        shape, axis, size = global_shapes[key], rank_axis(key, global_shapes[key]), coverage_numel(key, global_shapes[key])
        rows = masses[start : start + size]
        start += size
        out[key] = rows.expand(shape).clone() if axis is None else (rows[:, None] if axis == 0 else rows[None, :]).expand(shape).clone()
    return out


def summand(
    update: Update, global_shapes: dict[str, tuple[int, ...]], weight_scale: float, wire_dtype: str, clip: float, seed: int
) -> RecordDict:
    """What the node hands to SecAgg+: per global tensor (sorted by name) weight x value on the coordinates it trained,
    zero elsewhere, then one vector of its weight at the granularity it varies (``coverage_numel``: per rank row of a
    LoRA factor, per other tensor); its report as a metric. Refuses numbers outside the clipping range: SecAgg+ would
    clip them silently, and the sum would be wrong."""
    weight = update.num_samples / weight_scale
    sent = through_wire(update.weights, wire_dtype)  # what the server would have received in the clear
    arrays, masses = [], []
    for key in sorted(global_shapes):
        shape, axis = global_shapes[key], rank_axis(key, global_shapes[key])
        total, mass = torch.zeros(shape), torch.zeros(coverage_numel(key, shape))
        if key in sent:
            add_masked_terms(total, torch.zeros(shape), sent[key], weight)
            mass[: 1 if axis is None else sent[key].shape[axis]] = weight
        arrays.append(total.double().numpy())
        masses.append(mass.double())
    arrays.append(torch.cat(masses).numpy())
    largest = max((float(np.abs(a).max()) for a in arrays if a.size), default=0.0)
    if not math.isfinite(largest) or largest > clip:
        raise LegendError(
            f"client {update.client}: its update holds {largest:g}, outside flower.secure_clip={clip:g}: raise flower.secure_clip"
        )
    np.random.seed(seed % 2**32)  # SecAgg+ rounds stochastically with NumPy's global generator: the same job, the same sum
    report = {
        "client": update.client,
        "num_samples": update.num_samples,
        "metrics": {**update.metrics, SENT_NUMEL: sum(t.numel() for t in update.weights.values())},
    }
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, {REPORT: json.dumps(report)})  # weight 1: legend weighs inside
    return compat.fitres_to_recorddict(fitres, keep_input=False)


# --- on the server -----------------------------------------------------------------------------------------------


class SumCollector(FlowerStrategy):
    """The legacy Flower Strategy that SecAggPlusWorkflow drives: it hands out legend's jobs as FitIns and keeps what
    the workflow gives back, the unmasked sum and each device's report; the global model stays with legend's engine."""

    def __init__(self, fitins: list[tuple[GridClientProxy, FitIns]]):
        self.fitins = fitins
        self.results: list[tuple[Any, FitRes]] = []

    def configure_fit(self, server_round, parameters, client_manager):
        return self.fitins

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class CoveredSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+, which unmasks the sum only if the devices whose masked vectors arrived still cover every coordinate
    one of them trained k times: the coverage guard plans for every sampled device, and SecAgg+ unmasks over the survivors,
    so a device lost after its plan could leave a coordinate to one survivor. Then the round halts (every update lost)."""

    def __init__(self, *args, layouts: dict[int, AdapterLayout], k: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.layouts, self.k = layouts, k  # node -> its plan's layout
        self.thin: list[int] = []  # the surviving nodes that held a coordinate fewer than k survivors trained

    def unmask_stage(self, grid, context, state) -> bool:
        self.thin = thinly_covered({node: self.layouts[node] for node in state.active_node_ids}, self.k)
        return not self.thin and super().unmask_stage(grid, context, state)


class MeteredGrid:
    """The grid as the workflow sees it, counting the bytes of every message's content each way and each node's errors."""

    def __init__(self, grid: Grid):
        self.grid, self.bytes_down, self.bytes_up = grid, 0, 0
        self.errors: dict[int, str] = {}

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.bytes_down += sum(content_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error():
                self.errors[reply.metadata.src_node_id] = reply.error.reason
            else:
                self.bytes_up += content_bytes(reply.content)
                recode_masked(reply, np.int64)  # the words as SecAgg+ adds them
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


def content_bytes(content: RecordDict) -> int:
    """The payload of a message: its arrays' bytes and its config values' (bytes and strings by length, numbers as 8)."""
    size = sum(len(array.data) for record in content.array_records.values() for array in record.values())
    for record in content.config_records.values():
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                size += len(item) if isinstance(item, bytes | str) else 8
    return size


def secure_round(
    grid: Grid,
    context: Context,
    cfg: FlowerConfig,
    jobs: list[Job],
    node_of: dict[int, int],
    weight_scale: float,
    global_shapes: dict[str, tuple[int, ...]],
) -> tuple[dict[int, Update | str], SecureSum | None]:
    """One round's jobs through SecAgg+: each client's report (or why it has none) and the sum, None if the protocol halted."""
    round_number = jobs[0].round_number
    client_of = {node_of[job.plan.client]: job.plan.client for job in jobs}
    collector = SumCollector(
        [(GridClientProxy(node_of[job.plan.client], grid, context.run_id), _fitins(job, weight_scale, global_shapes)) for job in jobs]
    )
    legacy = LegacyContext(context, strategy=collector)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_number})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    shares = cfg.secure_shares if cfg.secure_shares <= 1 else int(cfg.secure_shares)
    workflow = CoveredSecAggPlus(
        shares,
        cfg.secure_threshold,
        max_weight=1.0,
        clipping_range=cfg.secure_clip,
        quantization_range=quantization_range(len(jobs)),
        modulus_range=MODULUS,
        timeout=cfg.round_timeout_s,
        layouts={node_of[job.plan.client]: job.plan.layout for job in jobs},
        k=cfg.secure_min_coverage,
    )
    metered, started = MeteredGrid(grid), time.monotonic()
    workflow(metered, legacy)
    seconds = time.monotonic() - started
    reports = {client_of[proxy.node_id]: json.loads(str(fitres.metrics[REPORT])) for proxy, fitres in collector.results}
    halted = "no masked update (node lost or too slow), or the protocol halted"
    if workflow.thin:
        halted = (
            f"devices lost after masking left coordinates of clients {sorted(client_of[n] for n in workflow.thin)} to fewer than "
            f"flower.secure_min_coverage={cfg.secure_min_coverage} survivors, so their sum was not unmasked"
        )
    outcome: dict[int, Update | str] = {}
    for job in jobs:
        client = job.plan.client
        if client in reports:
            report = reports[client]
            outcome[client] = Update(client, {}, int(report["num_samples"]), {**report["metrics"], ROUND_TRIP_S: seconds})
        else:
            outcome[client] = f"secure aggregation: {metered.errors.get(node_of[client], halted)}"
    if not collector.results:
        return outcome, None
    summed = [
        torch.from_numpy(np.asarray(a) * len(collector.results)).float() for a in parameters_to_ndarrays(collector.results[0][1].parameters)
    ]
    totals = {key: summed[i].reshape(global_shapes[key]) for i, key in enumerate(sorted(global_shapes))}
    masses = spread_masses(global_shapes, summed[-1])
    return outcome, SecureSum(totals, masses, metered.bytes_down, metered.bytes_up, seconds)


def _fitins(job: Job, weight_scale: float, global_shapes: dict[str, tuple[int, ...]]) -> FitIns:
    keys = sorted(job.plan.weights)
    meta = {**job_meta(job), "keys": keys, "weight_scale": weight_scale, "shapes": global_shapes}
    parameters: Parameters = ndarrays_to_parameters([job.plan.weights[key].detach().float().numpy() for key in keys])
    return FitIns(parameters, {JOB: json.dumps(meta)})
