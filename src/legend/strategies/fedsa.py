"""FedSA-LoRA (arXiv 2410.01463): A is shared and averaged, each client keeps its own B.

Up and down: every A and the classification head (the head is shared like A: design choice). B never
leaves the device: a client seen for the first time starts from the initial B, later from the B it
trained last (kept here for the simulated devices: a file per client that the checkpoint names, the
latest ``engine.client_state_mb`` of them also in memory). The global model that the server
evaluates uses the sample-weighted mean of the latest B of every client seen so far: a scoring
convention only, nothing sends it. The mean is kept as a running float64 sum, so a round touches
only its own clients' B, however many clients came before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from legend.core import ClientPlan, State, Update
from legend.devices.capacity import DeviceView
from legend.lora.layout import lora_modules
from legend.models.shared import SharedModel
from legend.strategies.aggregate import average_updates
from legend.strategies.client_store import ClientStore
from legend.strategies.fedit import FedIT
from legend.strategies.registry import register


@register
class FedSALoRA(FedIT):
    name = "fedsa"
    averages_coordinates = False  # the scored B is a mean of B factors that never leave the devices

    def __init__(self, config, info):
        super().__init__(config, info)
        self.initial_b: State = {}
        self.local_b = ClientStore(config.engine.client_state_mb)  # client -> its B, as it left the device
        self.samples: dict[int, int] = {}  # client -> its sample count, for the evaluation mean
        self.weighted_b_sum: State = {}  # sum over clients seen of samples x B, float64

    def use_folder(self, folder: Path) -> None:
        self.local_b.use_folder(folder / "client_state")

    def initial_state(self, model: SharedModel) -> State:
        state = super().initial_state(model)
        self.initial_b = {b_key: state[b_key] for _, b_key in lora_modules(state).values()}
        self.weighted_b_sum = {key: torch.zeros_like(b, dtype=torch.float64) for key, b in self.initial_b.items()}
        return state

    def plan(self, round_number: int, clients: list[int], global_state: State, devices: DeviceView) -> dict[int, ClientPlan]:
        layout, lr = self.global_layout(), self.lr(round_number)
        shared = {key: value for key, value in global_state.items() if key not in self.initial_b}
        return {c: ClientPlan(c, layout, shared, lr, local=self.local_b.get(c) or self.initial_b) for c in clients}

    def aggregate(self, round_number: int, global_state: State, updates: list[Update]) -> State:
        for update in updates:
            previous = self.local_b.get(update.client)
            for key, total in self.weighted_b_sum.items():
                if previous is not None:
                    total.sub_(previous[key].double(), alpha=self.samples[update.client])
                total.add_(update.local[key].double(), alpha=update.num_samples)
            self.local_b.put(update.client, update.local)
            self.samples[update.client] = update.num_samples
        seen = sum(self.samples.values())
        evaluation_b = {key: (total / seen).float() for key, total in self.weighted_b_sum.items()}
        return {**global_state, **average_updates(updates), **evaluation_b}

    def state_dict(self) -> dict[str, Any]:
        return {"initial_b": self.initial_b, "local_b": self.local_b.state_dict(), "samples": self.samples, "weighted_b_sum": self.weighted_b_sum}

    def checkpointed(self) -> None:
        self.local_b.collect()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "weighted_b_sum" not in state:  # written before client_state/ (2026-11-24): every client's B in the checkpoint
            state = {**state, "local_b": {"memory": state["local_b"], "files": {}, "written": 0},
                     "weighted_b_sum": {key: sum((b[key].double() * state["samples"][c] for c, b in state["local_b"].items()),
                                                 torch.zeros_like(initial, dtype=torch.float64)) for key, initial in state["initial_b"].items()}}
        self.initial_b, self.samples, self.weighted_b_sum = state["initial_b"], state["samples"], state["weighted_b_sum"]
        self.local_b.load_state_dict(state["local_b"])
