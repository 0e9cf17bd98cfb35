"""The virtual clock: how long each device's round takes, and how long a synchronous round lasts."""

from __future__ import annotations

from dataclasses import dataclass

from legend.devices.fleet import Link


@dataclass(frozen=True)
class RoundTime:
    """One device's round: receive the plan, train, send the update (seconds), and its bytes.

    The one type of a round's time, however it was obtained: on the virtual clock, measured on a
    Flower node, or estimated before the round by a planner (``capacity.estimate_round``, which also
    gives the memory training needs).
    """

    client: int
    device: str
    download_s: float
    compute_s: float
    upload_s: float
    bytes_down: int
    bytes_up: int
    memory_bytes: int = 0  # estimates only
    read_s: float = 0.0  # of compute_s: reading kept activations from storage (devices.activation_cache)

    @property
    def total_s(self) -> float:
        return self.download_s + self.compute_s + self.upload_s

    def as_row(self, dropped: bool) -> dict:
        return {
            "client": self.client,
            "device": self.device,
            "download_s": round(self.download_s, 4),
            "compute_s": round(self.compute_s, 4),
            "read_s": round(self.read_s, 4),
            "upload_s": round(self.upload_s, 4),
            "total_s": round(self.total_s, 4),
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "dropped": dropped,
        }


def device_time(
    client: int, device: str, flops: float, device_flops: float, bytes_down: int, bytes_up: int, link: Link, read_s: float = 0.0
) -> RoundTime:
    """Transfers at the link's rates; compute = FLOPs at the sustained rate, plus ``read_s`` reading kept activations."""
    return RoundTime(
        client,
        device,
        float(bytes_down / link.downlink),
        float(flops / device_flops) + read_s,
        float(bytes_up / link.uplink),
        bytes_down,
        bytes_up,
        read_s=read_s,
    )


def synchronous_round(times: list[RoundTime], deadline_s: float = 0.0) -> tuple[float, set[int]]:
    """The round lasts as long as its slowest participant; with a deadline, later devices are dropped.

    Returns the round's length and the dropped clients. A server with a deadline waits until it passes
    only when someone is late; if everyone is on time, the round ends with the last arrival.
    """
    if not times:
        return 0.0, set()
    late = {t.client for t in times if deadline_s > 0 and t.total_s > deadline_s}
    if late:
        return deadline_s, late
    return max(t.total_s for t in times), late
