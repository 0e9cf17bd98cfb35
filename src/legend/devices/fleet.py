"""A fleet: the devices of an experiment, one bound to each simulated client, and their per-round links."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from legend.config import DeviceProfile, DevicesConfig
from legend.devices.profiles import FLEETS, profile


@dataclass(frozen=True)
class Device:
    index: int  # position in the fleet
    kind: str  # the profile's name
    profile: DeviceProfile


@dataclass(frozen=True)
class Link:
    """One device's bandwidth in one round, in bytes per second."""

    uplink: float
    downlink: float


class Fleet:
    """Devices in fleet order, and the binding of clients to them.

    Client c runs on device ``binding[c]``: a seeded permutation of the fleet, repeated when there are
    more clients than devices, so a run with fewer clients than devices still draws a mix of classes.
    """

    def __init__(self, devices: list[Device], num_clients: int, seed: int):
        self.devices = devices
        order = np.random.default_rng([seed, 7]).permutation(len(devices))
        self.binding = [int(order[c % len(devices)]) for c in range(num_clients)]
        self.advertised: dict[int, DeviceProfile] = {}  # client -> its profile with the figures its device reported

    def device_of(self, client: int) -> Device:
        device = self.devices[self.binding[client]]
        return replace(device, profile=self.advertised[client]) if client in self.advertised else device

    def advertise(self, client: int, figures: dict[str, float]) -> None:
        """A real device's own figures (e.g. memory_gb, uplink_mbps from its SuperNode's node config) replace its class's, for it alone."""
        self.advertised[client] = self.devices[self.binding[client]].profile.model_copy(update=figures)

    def link(self, client: int, round_number: int, seed: int) -> Link:
        """Bandwidth fluctuates per round: median * exp(N(0, sigma^2)), drawn from (seed, round, device)."""
        device = self.device_of(client)
        p = device.profile
        noise = np.exp(np.random.default_rng([seed, round_number, device.index, 3]).normal(0.0, p.bandwidth_sigma, size=2))
        return Link(uplink=p.uplink_mbps * 1e6 / 8 * noise[0], downlink=p.downlink_mbps * 1e6 / 8 * noise[1])

    def available(self, round_number: int, seed: int) -> list[int]:
        """Clients whose device can take part this round (each with its profile's availability)."""
        draws = np.random.default_rng([seed, round_number, 5]).random(len(self.devices))
        return [c for c in range(len(self.binding)) if draws[self.binding[c]] < self.device_of(c).profile.availability]


def build_fleet(cfg: DevicesConfig, num_clients: int, seed: int) -> Fleet:
    if isinstance(cfg.fleet, str):
        entries = FLEETS.get(cfg.fleet) or [(cfg.fleet, num_clients)]  # a bare profile name: one such device per client
    else:
        entries = [(e.profile, e.count) for e in cfg.fleet]
    devices = []
    for kind, count in entries:
        p = profile(kind, cfg.profiles)
        devices += [Device(len(devices) + i, kind, p) for i in range(count)]
    return Fleet(devices, num_clients, seed)
