"""The devices' side of a round: bytes on the wire, each device's time (virtual clock or measured), what it reports.

Given what the engine passes in (the plans, what came back, a node's measured times where its runtime reports them),
never read from a runtime's settings, so the embedded engine and Flower charge a round the same way. A device that
keeps its activations (``devices.activation_cache``, ``devices/activations.py``) runs the blocks below the global LoRA
region only on the rows it has not stored, and reads the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from legend.core import ClientPlan, numel
from legend.devices.activations import KeptActivations
from legend.devices.capacity import BYTES_DOWN, BYTES_UP, COMPUTE_S, DOWNLOAD_S, FLOPS, UPLOAD_S
from legend.devices.clock import RoundTime, device_time
from legend.devices.cost import Batches, ModelSpec, applied_ranks, lowest_trained_block, training_flops
from legend.devices.fleet import Fleet
from legend.lora.layout import AdapterLayout
from legend.wire import wire_bytes


def sent_bytes(plan: ClientPlan, wire_dtype: str) -> int:
    """Bytes of the plan on the wire (its compact form where it has one)."""
    return wire_bytes(numel(plan.weights if plan.wire is None else plan.wire), wire_dtype)


@dataclass
class Accounting:
    """What charging a round needs: the model's sizes, the fleet, the strategy's global layout as it is when asked (the
    activation edge, the frozen adapters applied above a device's own), the wire dtype, the run's seed (the links'
    draws) and the ledger of kept activations (None: devices keep none)."""

    spec: ModelSpec
    fleet: Fleet
    global_layout: Callable[[], AdapterLayout]
    wire_dtype: str
    seed: int
    kept: KeptActivations | None = None

    @property
    def edge(self) -> int:
        """The lowest block of the global LoRA region: a device that keeps its activations keeps those entering it."""
        return lowest_trained_block(self.spec, self.global_layout())

    def keeps_activations(self, client: int) -> bool:
        """Whether the client's device keeps activations: the cache is on, there are blocks below the edge, and it has storage for them."""
        return self.kept is not None and self.edge > 0 and self.fleet.device_of(client).profile.storage_gb > 0

    def received(
        self,
        round_number: int,
        plan: ClientPlan,
        work: Batches,
        batches: list[np.ndarray],
        sent_numel: int,
        measured: tuple[float, float] | None = None,
    ) -> tuple[RoundTime, dict[str, float]]:
        """The device's times this round and its report of them (the metrics the capacity estimate reads).

        Virtual clock: times from the device's profile and this round's link draw. Measured (a runtime whose nodes
        report their times, ``measured`` = (the node's compute seconds, the round trip the server saw)): the node's own
        compute time, and the rest of the round trip split between download and upload by their bytes."""
        client, device = plan.client, self.fleet.device_of(plan.client)
        bytes_down, bytes_up = sent_bytes(plan, self.wire_dtype), wire_bytes(sent_numel, self.wire_dtype)
        kept = self.kept.round(client, batches, self.edge, device.profile.storage_gb) if self.keeps_activations(client) else None
        flops = training_flops(self.spec, plan.layout, work, applied_ranks(plan.layout, self.global_layout()), kept)
        if measured is not None:
            compute_s, round_trip_s = measured
            transfer_s = max(round_trip_s - compute_s, 0.0)
            share_down = bytes_down / max(bytes_down + bytes_up, 1)
            times = RoundTime(client, device.kind, transfer_s * share_down, compute_s, transfer_s * (1 - share_down), bytes_down, bytes_up)
        else:
            compute_s = flops / device.profile.flops  # the FLOPs alone: the capacity estimate is a FLOP rate, whatever the device reads
            read_s = kept.read_bytes / (device.profile.storage_mb_s * 1e6) if kept else 0.0
            link = self.fleet.link(client, round_number, self.seed)
            times = device_time(client, device.kind, flops, device.profile.flops, bytes_down, bytes_up, link, read_s)
        report = {
            FLOPS: flops,
            COMPUTE_S: compute_s,
            BYTES_DOWN: times.bytes_down,
            DOWNLOAD_S: times.download_s,
            BYTES_UP: times.bytes_up,
            UPLOAD_S: times.upload_s,
        }
        return times, report

    def storage(self, client: int) -> dict[str, Any]:
        """What a device that keeps its activations holds: how many blocks they skip, and their storage (MB)."""
        if self.kept is None:
            return {}
        edge, _, used = self.kept.held.get(client, (0, set(), 0))
        return {"kept_blocks": edge, "storage_mb": round(used / 1e6, 4)}

    def device_rows(
        self, times: list[RoundTime], dropped: set[int], plans: dict[int, ClientPlan], memory: dict[int, int]
    ) -> list[dict[str, Any]]:
        """The round record's row of each device that sent an update: its times, layout, memory and storage."""
        return [
            {
                **t.as_row(t.client in dropped),
                "rank_by_block": list(plans[t.client].layout.rank_by_block),
                "memory_gb": round(memory[t.client] / 1e9, 4),
                **self.storage(t.client),
            }
            for t in times
        ]
