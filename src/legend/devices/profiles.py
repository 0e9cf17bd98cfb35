"""The catalog of device classes and named fleets.

Peak FP32 FLOP/s is CUDA cores (or CPU cores x SIMD FLOP per cycle) x 2 (FMA) x the maximum clock
from the vendor's datasheet; the efficiency factor (the share of peak that training sustains) and the
network figures are our stated assumptions, explained in docs/devices.md. ``legend calibrate``
measures this machine and stores the ``host`` profile.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from legend.config import DeviceProfile
from legend.errors import LegendError
from legend.models.resolve import cache_dir

GPU_EFFICIENCY = 0.35  # FP32 training on an embedded GPU: about a third of peak (docs/devices.md)
JETSON_LINK = {"uplink_mbps": 10.0, "downlink_mbps": 20.0, "bandwidth_sigma": 0.5}  # lab Wi-Fi
EMMC_51_MB_S = 250.0  # sustained sequential read of the Jetson modules' eMMC 5.1 (HS400 bus: 400 MB/s), our assumption

CATALOG: dict[str, DeviceProfile] = {
    "jetson-nano": DeviceProfile(
        peak_flops=128 * 2 * 0.921e9,
        efficiency=GPU_EFFICIENCY,
        memory_gb=2.5,
        **JETSON_LINK,
        storage_gb=2.0,
        storage_mb_s=EMMC_51_MB_S,
        source="NVIDIA Jetson Nano module datasheet DS-09366: 128-core Maxwell GPU at 921 MHz, 4 GB LPDDR4 shared with the OS",
    ),
    "jetson-tx2": DeviceProfile(
        peak_flops=256 * 2 * 1.30e9,
        efficiency=GPU_EFFICIENCY,
        memory_gb=6.0,
        **JETSON_LINK,
        storage_gb=8.0,
        storage_mb_s=EMMC_51_MB_S,
        source="NVIDIA Jetson TX2 module datasheet DS-08366: 256-core Pascal GPU at 1.30 GHz, 8 GB LPDDR4",
    ),
    "jetson-xavier-nx": DeviceProfile(
        peak_flops=384 * 2 * 1.10e9,
        efficiency=GPU_EFFICIENCY,
        memory_gb=6.0,
        **JETSON_LINK,
        storage_gb=2.0,
        storage_mb_s=EMMC_51_MB_S,
        source="NVIDIA Jetson Xavier NX module datasheet DS-09693: 384-core Volta GPU at 1.1 GHz, 8 GB LPDDR4x",
    ),
    "jetson-agx-xavier": DeviceProfile(
        peak_flops=512 * 2 * 1.377e9,
        efficiency=GPU_EFFICIENCY,
        memory_gb=28.0,
        **JETSON_LINK,
        storage_gb=8.0,
        storage_mb_s=EMMC_51_MB_S,
        source="NVIDIA Jetson AGX Xavier module datasheet DS-09654: 512-core Volta GPU at 1377 MHz, 32 GB LPDDR4x",
    ),
    "jetson-agx-orin": DeviceProfile(
        peak_flops=2048 * 2 * 1.30e9,
        efficiency=GPU_EFFICIENCY,
        memory_gb=58.0,
        **JETSON_LINK,
        storage_gb=16.0,
        storage_mb_s=EMMC_51_MB_S,
        source="NVIDIA Jetson AGX Orin series datasheet DS-10662: 2048-core Ampere GPU at 1.3 GHz (5.3 TFLOPS FP32), 64 GB LPDDR5",
    ),
    "phone-midrange": DeviceProfile(
        peak_flops=(2.4 + 3 * 2.2) * 16e9 + 4 * 1.9 * 8e9,
        efficiency=0.25,
        memory_gb=1.5,
        uplink_mbps=5.0,
        downlink_mbps=30.0,
        bandwidth_sigma=0.8,
        availability=0.6,
        storage_gb=4.0,
        storage_mb_s=1500.0,
        source="Qualcomm Snapdragon 778G: 4x Cortex-A78 (2.4/2.2 GHz, 16 FP32 FLOP/cycle) + 4x Cortex-A55 (1.9 GHz, 8); training on "
        "the CPU",
    ),
    "laptop-cpu": DeviceProfile(
        peak_flops=4 * 2.8e9 * 32,
        efficiency=0.5,
        memory_gb=8.0,
        uplink_mbps=20.0,
        downlink_mbps=100.0,
        bandwidth_sigma=0.5,
        availability=0.9,
        storage_gb=16.0,
        storage_mb_s=2000.0,
        source="Intel Core i7-1165G7: 4 cores at 2.8 GHz base, AVX-512 with one FMA unit (32 FP32 FLOP/cycle), 16 GB",
    ),
}

# LEGEND's testbed: 80 Jetson devices of mixed classes (the abstract gives the count, not the mix).
FLEETS: dict[str, list[tuple[str, int]]] = {
    "jetson-mix-80": [("jetson-nano", 16), ("jetson-tx2", 24), ("jetson-xavier-nx", 24), ("jetson-agx-xavier", 8), ("jetson-agx-orin", 8)],
}

HOST_FILE = "host-profile.json"


def save_host_profile(profile: DeviceProfile) -> str:
    path = cache_dir() / HOST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.model_dump_json(indent=2) + "\n")
    return str(path)


def host_profile_from(calibration: dict) -> DeviceProfile:
    """This machine as a device: the measured sustained rate, most of its memory (its GPU's, when calibrated on one), a LAN
    link (edit the file to change)."""
    memory_gb = calibration.get("device_memory_gb") or host_memory_gb()
    where = f"{calibration['threads']} threads" if calibration.get("device", "cpu") == "cpu" else calibration["device"]
    return DeviceProfile(
        peak_flops=calibration["flops_per_s"],
        efficiency=1.0,
        memory_gb=round(0.8 * memory_gb, 1),
        uplink_mbps=100.0,
        downlink_mbps=100.0,
        bandwidth_sigma=0.2,
        storage_gb=round(0.1 * shutil.disk_usage(Path.home()).free / 1e9, 1),  # a tenth of the free disk
        storage_mb_s=500.0,  # an SSD, assumed: edit the file to change
        source=f"legend calibrate: {calibration['model']} blocks on {where}, {calibration.get('precision', 'float32')}, "
        f"{time.strftime('%Y-%m-%d')}",
    )


def host_profile() -> DeviceProfile:
    """This machine, as measured by ``legend calibrate``."""
    path = cache_dir() / HOST_FILE
    if not path.is_file():
        raise LegendError(f"device profile 'host' needs a calibration of this machine ({path} is missing): run `legend calibrate` first")
    return DeviceProfile.model_validate(json.loads(path.read_text()))


def profile(name: str, user_profiles: dict[str, DeviceProfile]) -> DeviceProfile:
    """A device class by name: the user's own first, then the catalog, then ``host``."""
    if name in user_profiles:
        return user_profiles[name]
    if name in CATALOG:
        return CATALOG[name]
    if name == "host":
        return host_profile()
    known = ", ".join([*user_profiles, *CATALOG, "host"])
    raise LegendError(f"unknown device profile '{name}': use one of {known}, or define it under [devices.profiles.{name}]")


def host_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
