"""``legend plan``: each device's round-1 plan with its estimated cost, from the plans and what the engine passes in."""

from __future__ import annotations

from typing import Any

import numpy as np

from legend.core import ClientPlan
from legend.devices.accounting import Accounting, sent_bytes
from legend.devices.activations import KeptActivations
from legend.devices.capacity import DeviceView, estimate_round
from legend.devices.clock import RoundTime
from legend.devices.cost import applied_ranks, kept_memory_bytes, training_flops
from legend.wire import wire_bytes


def preview_rows(
    plans: dict[int, ClientPlan],
    view: DeviceView,
    batches: dict[int, list[np.ndarray]],
    up_numel: dict[int, int],
    partitions: list[np.ndarray],
    accounting: Accounting,
) -> list[dict[str, Any]]:
    """Per plan: the device, its layout, its estimated compute, communication and round time, memory and bytes
    (``up_numel``: the numbers its update sends), and for a device that keeps its activations what it holds later."""
    rows = []
    for client, plan in plans.items():
        applied = applied_ranks(plan.layout, accounting.global_layout())
        down = sent_bytes(plan, accounting.wire_dtype)
        up = wire_bytes(up_numel[client], accounting.wire_dtype)
        estimate = estimate_round(view, client, plan.layout, applied, down, up)
        row = {
            "client": client,
            "device": view.capacity[client].kind,
            "depth": plan.layout.depth,
            "rank_by_block": list(plan.layout.rank_by_block),
            "compute_s": estimate.compute_s,
            "communication_s": estimate.download_s + estimate.upload_s,
            "round_s": estimate.total_s,
            "memory_gb": estimate.memory_bytes / 1e9,
            "bytes_down": down,
            "bytes_up": up,
            "kept_blocks": 0,
            "storage_mb": 0.0,
        }
        if accounting.keeps_activations(client):
            row.update(_kept_preview(accounting, plan, view, partitions[client], batches[client], applied, estimate))
        rows.append(row)
    return rows


def _kept_preview(
    accounting: Accounting,
    plan: ClientPlan,
    view: DeviceView,
    partition: np.ndarray,
    batches: list[np.ndarray],
    applied,
    estimate: RoundTime,
) -> dict:
    """A device that keeps its activations, once it has stored its examples (in their partition order, while room is left): the
    blocks it skips, its storage, the memory of reading them, and its compute time in such a later round."""
    client, edge, spec = plan.client, accounting.edge, accounting.spec
    profile = accounting.fleet.device_of(client).profile
    ledger = KeptActivations(accounting.kept.hidden, accounting.kept.lengths)
    ledger.round(client, [partition], edge, profile.storage_gb)
    later = ledger.round(client, batches, edge, profile.storage_gb)
    flops = training_flops(spec, plan.layout, view.workload[client], applied, later)
    read_s = later.read_bytes / (profile.storage_mb_s * 1e6)
    return {
        "kept_blocks": edge,
        "storage_mb": later.stored_bytes / 1e6,
        "memory_gb": (estimate.memory_bytes + kept_memory_bytes(spec, view.workload[client])) / 1e9,
        "later_compute_s": flops / view.capacity[client].flops_per_s + read_s,
    }
