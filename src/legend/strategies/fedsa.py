"""FedSA-LoRA (arXiv 2410.01463): A is shared and averaged, each client keeps its own B.

Up and down: every A and the classification head (the head is shared like A: design choice). B never
leaves the device: a client seen for the first time starts from the initial B, later from the B it
trained last (kept here for the simulated devices, and in the checkpoint). The global model that the
server evaluates uses the sample-weighted mean of the latest B of every client seen so far: a
scoring convention only, nothing sends it.
"""

from __future__ import annotations

from typing import Any

from legend.devices.capacity import DeviceView
from legend.lora.layout import lora_modules
from legend.models.shared import SharedModel, State
from legend.strategies.aggregate import average_updates, weighted_average
from legend.strategies.base import ClientPlan, Update
from legend.strategies.fedit import FedIT
from legend.strategies.registry import register


@register
class FedSALoRA(FedIT):
    name = "fedsa"
    averages_coordinates = False  # the scored B is a mean of B factors that never leave the devices

    def __init__(self, config, info):
        super().__init__(config, info)
        self.initial_b: State = {}
        self.local_b: dict[int, State] = {}  # client -> its B, as it left the device
        self.samples: dict[int, int] = {}  # client -> its sample count, for the evaluation mean

    def initial_state(self, model: SharedModel) -> State:
        state = super().initial_state(model)
        self.initial_b = {b_key: state[b_key] for _, b_key in lora_modules(state).values()}
        return state

    def plan(self, round_number: int, clients: list[int], global_state: State, devices: DeviceView) -> dict[int, ClientPlan]:
        layout, lr = self.global_layout(), self.lr(round_number)
        shared = {key: value for key, value in global_state.items() if key not in self.initial_b}
        return {c: ClientPlan(c, layout, shared, lr, local=self.local_b.get(c, self.initial_b)) for c in clients}

    def aggregate(self, round_number: int, global_state: State, updates: list[Update]) -> State:
        for update in updates:
            self.local_b[update.client], self.samples[update.client] = update.local, update.num_samples
        seen = sorted(self.local_b)
        total = sum(self.samples[c] for c in seen)
        weights = [self.samples[c] / total for c in seen]
        evaluation_b = {key: weighted_average([self.local_b[c][key] for c in seen], weights) for key in self.initial_b}
        return {**global_state, **average_updates(updates), **evaluation_b}

    def state_dict(self) -> dict[str, Any]:
        return {"initial_b": self.initial_b, "local_b": self.local_b, "samples": self.samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial_b, self.local_b, self.samples = state["initial_b"], state["local_b"], state["samples"]
