"""Capacity estimation: what the server believes about each device, and what a layout would cost on it.

Before a device has reported, its estimate is its profile with seeded noise (the server's prior is
never exact); once it reports a round, an exponential moving average of what it measured replaces the
prior: sustained FLOP/s = FLOPs it ran / seconds it computed, bandwidth = bytes / seconds. In the
simulation the reports are the virtual clock's times; on real devices they are measured. Strategies
that size adapters per device (LEGEND, HetLoRA, FlexLoRA) read the same estimates, so only the
algorithm differs between them.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, replace
from typing import Any

import numpy as np

from legend.devices.clock import RoundTime
from legend.devices.cost import Batches, ModelSpec, adapter_params, training_flops, training_memory_bytes
from legend.devices.fleet import Fleet
from legend.lora.layout import AdapterLayout
from legend.wire import wire_bytes

# Keys of the device report that an update carries in its metrics (the same on every engine).
FLOPS, COMPUTE_S, BYTES_DOWN, DOWNLOAD_S, BYTES_UP, UPLOAD_S = "flops", "compute_s", "bytes_down", "download_s", "bytes_up", "upload_s"
REPORT_KEYS = (FLOPS, COMPUTE_S, BYTES_DOWN, DOWNLOAD_S, BYTES_UP, UPLOAD_S)


@dataclass(frozen=True)
class Capacity:
    """One device as the server sees it: sustained FLOP/s, link rates in bytes per second, memory."""

    kind: str
    flops_per_s: float
    uplink: float
    downlink: float
    memory_gb: float


@dataclass(frozen=True)
class DeviceView:
    """What a strategy may know about the devices when it plans a round.

    capacity: every client's current estimate; workload: what each sampled client trains on this
    round (its batch shapes; a real device reports its data statistics); spec: the model's sizes;
    wire_dtype: ``fl.wire_dtype``, in which bytes are counted (``wire_bytes``).
    """

    spec: ModelSpec
    capacity: dict[int, Capacity]
    workload: dict[int, Batches]
    wire_dtype: str


class CapacityEstimator:
    """Per-client capacity: the profile with noise until the device reports, then an EMA of its reports."""

    def __init__(self, fleet: Fleet, noise: float, ema: float, seed: int):
        self.fleet, self.noise, self.ema, self.seed = fleet, noise, ema, seed
        self.observed: dict[int, Capacity] = {}

    def prior(self, client: int) -> Capacity:
        """The profile's figures, each times exp(N(0, noise^2)) drawn from (seed, client)."""
        device = self.fleet.device_of(client)
        p = device.profile
        factor = np.exp(
            np.random.default_rng([self.seed, client, 11]).normal(0.0, self.noise, size=3)
        ).tolist()  # plain floats: checkpoints load weights_only
        return Capacity(
            device.kind, p.flops * factor[0], p.uplink_mbps * 1e6 / 8 * factor[1], p.downlink_mbps * 1e6 / 8 * factor[2], p.memory_gb
        )

    def estimate(self, client: int) -> Capacity:
        return self.observed.get(client) or self.prior(client)

    def estimates(self) -> dict[int, Capacity]:
        return {client: self.estimate(client) for client in range(len(self.fleet.binding))}

    def observe(self, client: int, report: dict[str, float]) -> None:
        """Fold one round's report into the client's estimate (the first report replaces the prior)."""
        measured = {
            "flops_per_s": _rate(report, FLOPS, COMPUTE_S),
            "downlink": _rate(report, BYTES_DOWN, DOWNLOAD_S),
            "uplink": _rate(report, BYTES_UP, UPLOAD_S),
        }
        previous = self.observed.get(client)
        if previous is None:
            previous = self.prior(client)
            weight = 1.0
        else:
            weight = self.ema
        blended = {k: weight * v + (1 - weight) * getattr(previous, k) for k, v in measured.items() if v is not None}
        self.observed[client] = replace(previous, **blended)

    def state_dict(self) -> dict[str, Any]:
        return {c: astuple(e) for c, e in self.observed.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.observed = {int(c): Capacity(*values) for c, values in state.items()}


def _rate(report: dict[str, float], amount: str, seconds: str) -> float | None:
    """amount / seconds when the report has both and the time is positive (no transfer, no evidence)."""
    if report.get(seconds, 0) > 0 and report.get(amount, 0) > 0:
        return report[amount] / report[seconds]
    return None


def lora_numel(spec: ModelSpec, rank_by_block, train_factors=("lora_A", "lora_B"), head: bool = True) -> int:
    """How many numbers LoRA factors of these per-block ranks (and the head) hold: ``wire_bytes`` of it on the wire."""
    factors = len(train_factors) / 2  # A (r x in) and B (out x r) together are r (in + out)
    return int(factors * sum(adapter_params(spec, "lora", r) for r in rank_by_block) + (spec.head_params if head else 0))


def estimate_round(
    view: DeviceView, client: int, layout: AdapterLayout, applied: tuple[int, ...], bytes_down: int, bytes_up: int
) -> RoundTime:
    """Estimated download, compute and upload seconds of a layout on one client, and its training memory."""
    capacity, work = view.capacity[client], view.workload[client]
    return RoundTime(
        client=client,
        device=capacity.kind,
        download_s=bytes_down / capacity.downlink,
        compute_s=training_flops(view.spec, layout, work, applied) / capacity.flops_per_s,
        upload_s=bytes_up / capacity.uplink,
        bytes_down=bytes_down,
        bytes_up=bytes_up,
        memory_bytes=training_memory_bytes(view.spec, layout, work),
    )


def ranks_by_capacity(view: DeviceView, clients: list[int], r_min: int, r_max: int, top: int = 0) -> dict[int, int]:
    """HetLoRA's and FlexLoRA's per-device rank: in proportion to the device's estimated speed against the whole fleet.

    r_k = floor(r_max x min_j t_j(W_k) / t_k(W_k)) (``round_times``), clipped to [r_min, r_max]: a device as fast as the
    fleet's fastest gets r_max, one three times slower a third of it, whichever devices the round happens to sample with it.
    """
    times = round_times(view, clients, r_max, top)
    return {client: max(r_min, min(r_max, int(r_max * fastest / own))) for client, (fastest, own) in times.items()}


def round_times(view: DeviceView, clients: list[int], r_max: int, top: int = 0) -> dict[int, tuple[float, float]]:
    """Per client k: (min_j t_j(W_k), t_k(W_k)), where t_j(W) = the estimated round time of LoRA at r_max on every block (the
    top ``top``: lora.top_blocks) on device j with workload W, over every device j of the fleet (its current estimate).
    The ratio of the two is how much of a full round device k can do in the time the fleet's fastest does it all."""
    layout = AdapterLayout.uniform_lora(view.spec.num_blocks, r_max, top)
    size = wire_bytes(lora_numel(view.spec, layout.rank_by_block), view.wire_dtype)

    def seconds(capacity: Capacity, flops: float) -> float:
        return size / capacity.downlink + flops / capacity.flops_per_s + size / capacity.uplink

    times = {}
    for client in clients:
        flops = training_flops(view.spec, layout, view.workload[client], layout.rank_by_block)
        times[client] = (min(seconds(capacity, flops) for capacity in view.capacity.values()), seconds(view.capacity[client], flops))
    return times
