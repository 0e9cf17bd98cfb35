"""Heterogeneous devices: profiles and fleets, the cost model (FLOPs, memory, bytes) and the virtual clock."""

from legend.devices.clock import RoundTime, device_time, synchronous_round
from legend.devices.cost import Batches, ModelSpec, layout_numel, training_flops, training_memory_bytes
from legend.devices.fleet import Device, Fleet, Link, build_fleet

__all__ = ["Batches", "Device", "Fleet", "Link", "ModelSpec", "RoundTime", "build_fleet", "device_time", "layout_numel",
           "synchronous_round", "training_flops", "training_memory_bytes"]
