"""Where local training runs: in this process (the embedded engine) or on remote nodes (Flower).

The engine hands a runtime the round's jobs (each device's plan as it arrives there, and its seed) and
gets back, per device, its update or the reason it has none (lost: crashed, disconnected, timed out).
Every runtime trains with ``local_training``, so a run gives the same result on either. A runtime also
owns what each device keeps between rounds (``DeviceSide.kept``, FedSA-LoRA's B): the embedded one
stores it for its devices (a file per client, named by the checkpoint), a Flower node on the node.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from legend.config import FaultsConfig
from legend.core import ClientPlan, SecureSum, State, Update
from legend.data.batching import EncodedSplit
from legend.engine.attacks import MALICIOUS, flipped_labels, is_attacker, poison
from legend.engine.client import LocalTraining, local_step_count, train_client
from legend.engine.client_store import ClientStore
from legend.engine.parallel import train_together

ROUND_TRIP_S = "round_trip_s"  # metric a remote runtime adds: seconds from sending the job to receiving the update
SENT_NUMEL = "sent_numel"  # metric a device adds under secure aggregation: the numbers its update held (the server never sees them)


@dataclass(frozen=True)
class Job:
    """One device's work in a round: its plan as received, and the seed of its batches and dropout."""

    round_number: int
    plan: ClientPlan
    seed: int


class Runtime(Protocol):
    clock: str  # where its devices' round times come from: "virtual" (their profiles) or "measured" (their own reports)

    def reachable(self, clients: list[int]) -> list[int]:
        """Those of ``clients`` whose device can be sent a job now."""

    def train(self, local: LocalTraining, jobs: list[Job]) -> dict[int, Update | str]:
        """Each job's update, or why it has none (``local``: what training on the shared model needs of the run)."""

    def summed(self) -> SecureSum | None:
        """Under secure aggregation, the sum of the last ``train``'s updates (then those carry no weights); else None."""

    def start(self, folder: Path, initial: State, saved: dict[str, Any] | None) -> None:
        """Before the first round: the run's folder, the initial value of every tensor a device keeps, and (on resume)
        what ``state_dict`` returned when the checkpoint was written."""

    def keep(self, updates: list[Update]) -> None:
        """These updates were aggregated: their kept tensors are their devices' own from now on."""

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint must hold of the devices' own tensors."""

    def checkpointed(self) -> None:
        """The checkpoint holding ``state_dict()`` is written: what only older checkpoints named may go."""


class DeviceCrash(RuntimeError):
    """A simulated crash inside local training (``faults.crash``)."""


def local_training(
    local: LocalTraining, job: Job, own: State | None = None, crash_at_step: int | None = None, data: EncodedSplit | None = None
) -> Update:
    """What a device does with a job: train from the plan and its own tensors on its batches of its own data.

    ``crash_at_step``, ``data``: the simulation's fault injection; training raises DeviceCrash when it reaches that step,
    and reads ``data`` (the same examples, other labels) instead of the training split."""
    work = local.work(job.plan, job.seed, own or {}, data)
    if crash_at_step is not None:
        work = replace(work, batches=_crash_at(work.batches, crash_at_step))
    return train_client(local.model, local.objective, work, data or local.data, local.cfg, job.seed, local.prefix, local.device)


def local_training_together(local: LocalTraining, jobs: list[Job], owns: list[State]) -> list[Update]:
    """``local_training`` of several devices in one pass per step (``engine/parallel.py``): the same updates."""
    work = [local.work(job.plan, job.seed, own) for job, own in zip(jobs, owns, strict=True)]
    return train_together(local.model, local.objective, work, local.data, local.cfg, jobs[0].seed, local.prefix, local.device)


def _crash_at(batches: list[np.ndarray], step: int) -> Iterator[np.ndarray]:
    yield from batches[:step]
    raise DeviceCrash(f"simulated crash at local step {step + 1} of {len(batches)}")


class InProcess:
    """The embedded runtime: the devices train one after another on this process's shared model, or
    ``parallel_clients`` at a time in one pass (``engine/parallel.py``; a device that crashes or trains on flipped
    labels still trains alone).

    Simulated faults (``faults``), drawn per (seed, round, client): a device that drops out after
    receiving its plan sends nothing; one whose training crashes (DeviceCrash at a random step) neither;
    an attacker sends a poisoned update (``engine/attacks.py``). Other exceptions are bugs, not device
    faults, and stop the run.

    What a device keeps (FedSA-LoRA's B) is stored here once its update is aggregated: a file per client
    under the run's ``client_state/``, the latest ``engine.client_state_mb`` of them also in memory."""

    clock = "virtual"

    def __init__(self, faults: FaultsConfig, client_state_mb: float = 64.0, parallel_clients: int = 1):
        self.faults = faults
        self.parallel_clients = parallel_clients
        self.own = ClientStore(client_state_mb)  # client -> the tensors it keeps
        self.initial: State = {}  # what a device seen for the first time starts them from
        self._flipped: EncodedSplit | None = None  # the training split with flipped labels, made at the first label-flip attack

    def start(self, folder: Path, initial: State, saved: dict[str, Any] | None) -> None:
        self.initial = initial if saved is None else saved["initial"]
        if self.initial:  # the strategy's devices keep something: client_state/ holds it
            self.own.use_folder(folder / "client_state")
        if saved is not None:
            self.own.load_state_dict(saved["own"])

    def keep(self, updates: list[Update]) -> None:
        for update in updates:
            if update.kept:
                self.own.put(update.client, update.kept)

    def state_dict(self) -> dict[str, Any]:
        return {"initial": self.initial, "own": self.own.state_dict()}

    def checkpointed(self) -> None:
        self.own.collect()

    def reachable(self, clients: list[int]) -> list[int]:
        return clients

    def summed(self) -> None:
        return None  # the server holds every update

    def train(self, local: LocalTraining, jobs: list[Job]) -> dict[int, Update | str]:
        faults = {job.plan.client: self._faults(local, job) for job in jobs}
        running = [job for job in jobs if not isinstance(faults[job.plan.client], str)]
        trains_alone = {
            job.plan.client
            for job in running
            if self.parallel_clients == 1 or faults[job.plan.client].crash_at_step is not None or faults[job.plan.client].flips
        }
        alone = [job for job in running if job.plan.client in trains_alone]
        together = [job for job in running if job.plan.client not in trains_alone]
        results: dict[int, Update | str] = {client: fault for client, fault in faults.items() if isinstance(fault, str)}
        for start in range(0, len(together), self.parallel_clients):
            group = together[start : start + self.parallel_clients]
            owns = [self.own.get(job.plan.client) or self.initial for job in group]
            results.update((update.client, update) for update in local_training_together(local, group, owns))
        for job in alone:
            results[job.plan.client] = self._alone(local, job, faults[job.plan.client])
        return {job.plan.client: self._attack(job, results[job.plan.client], faults[job.plan.client]) for job in jobs}

    def _faults(self, local: LocalTraining, job: Job) -> DeviceFaults | str:
        """What the device's (seed, round, client) draw does to its job, or why it sends nothing."""
        leaves, crashes, step = np.random.default_rng([job.seed, 17]).random(3)
        if leaves < self.faults.dropout:
            return "dropped out after receiving its plan (faults.dropout)"
        steps = local_step_count(len(local.partitions[job.plan.client]), local.cfg)
        attacker = is_attacker(self.faults, job.seed)
        return DeviceFaults(
            int(step * steps) if crashes < self.faults.crash else None, attacker, attacker and self.faults.attack == "label_flip"
        )

    def _alone(self, local: LocalTraining, job: Job, faults: DeviceFaults) -> Update | str:
        if faults.flips and self._flipped is None:
            self._flipped = flipped_labels(local.data, local.num_classes)
        try:
            own = self.own.get(job.plan.client) or self.initial
            return local_training(local, job, own, faults.crash_at_step, self._flipped if faults.flips else None)
        except DeviceCrash as crash:
            return f"crashed in local training: {crash} (faults.crash)"

    def _attack(self, job: Job, result: Update | str, faults: DeviceFaults | str) -> Update | str:
        """An attacker's update as it sends it: trained on flipped labels, or poisoned after training."""
        if isinstance(result, str) or not faults.attacker:
            return result
        sent = result.weights
        if not faults.flips:
            sent = poison(
                sent, {key: job.plan.weights[key][tuple(slice(0, n) for n in value.shape)] for key, value in sent.items()}, self.faults
            )
        return replace(result, weights=sent, metrics={**result.metrics, MALICIOUS: 1.0})


@dataclass(frozen=True)
class DeviceFaults:
    crash_at_step: int | None  # local training crashes at this step (faults.crash)
    attacker: bool  # the update is an attack (faults.malicious)
    flips: bool  # the attack trains on flipped labels
