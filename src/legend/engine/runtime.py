"""Where local training runs: in this process (the embedded engine) or on remote nodes (Flower).

The engine hands a runtime the round's jobs (each device's plan as it arrives there, and its seed) and
gets back, per device, its update or the reason it has none (lost: crashed, disconnected, timed out).
Every runtime trains with ``local_training``, so a run gives the same result on either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from legend.engine.client import client_batches, train_client
from legend.strategies.base import ClientPlan, Update

if TYPE_CHECKING:
    from legend.engine.simulation import Experiment

ROUND_TRIP_S = "round_trip_s"  # metric a remote runtime adds: seconds from sending the job to receiving the update


@dataclass(frozen=True)
class Job:
    """One device's work in a round: its plan as received, and the seed of its batches and dropout."""

    round_number: int
    plan: ClientPlan
    seed: int


class Runtime(Protocol):
    def reachable(self, clients: list[int]) -> list[int]:
        """Those of ``clients`` whose device can be sent a job now."""

    def train(self, exp: Experiment, jobs: list[Job]) -> dict[int, Update | str]:
        """Each job's update, or why it has none."""


def local_training(exp: Experiment, job: Job) -> Update:
    """What a device does with a job: draw its batches from its own data, train from the plan."""
    indices = exp.partitions[job.plan.client]
    batches = client_batches(exp.train, indices, exp.config.train, job.seed)
    return train_client(exp.model, job.plan, exp.train, batches, len(indices), exp.config.train, job.seed)


class InProcess:
    """The embedded runtime: the devices train one after another on this process's shared model."""

    def reachable(self, clients: list[int]) -> list[int]:
        return clients

    def train(self, exp: Experiment, jobs: list[Job]) -> dict[int, Update | str]:
        return {job.plan.client: local_training(exp, job) for job in jobs}
