"""FedSA-LoRA (arXiv 2410.01463): A is shared and averaged, each client keeps its own B.

Up and down: every A and the classification head (the head is shared like A: design choice). B never
leaves the device (``FedSADevice.kept``): its runtime stores it between rounds (the embedded one a file
per client, a Flower node on the node), and a device seen for the first time starts from the initial
B. The global model that the server evaluates uses the sample-weighted mean of the latest B of every
client seen so far: a scoring convention only, nothing sends it (a device reports its B before and
after training for it, uncounted). The mean is kept as a running float64 sum, so a round touches only
its own clients' B, however many clients came before.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from legend.core import ClientPlan, State, Update
from legend.devices.capacity import DeviceView
from legend.lora.layout import lora_modules
from legend.models.shared import SharedModel
from legend.strategies.aggregate import average_updates
from legend.strategies.base import LORA_ONLY, DeviceSide
from legend.strategies.fedit import FedIT
from legend.strategies.registry import register


class FedSADevice(DeviceSide):
    def kept(self, keys: Iterable[str]) -> set[str]:
        return {b_key for _, b_key in lora_modules(keys).values()}


@register
class FedSALoRA(FedIT):
    name = "fedsa"
    supports = LORA_ONLY  # no coordinate means: the scored B is a mean of B factors that never leave the devices

    def __init__(self, config, info):
        super().__init__(config, info)
        self.samples: dict[int, int] = {}  # client -> its sample count, for the evaluation mean
        self.weighted_b_sum: State = {}  # sum over clients seen of samples x B, float64

    def device_side(self) -> FedSADevice:
        return FedSADevice()

    def initial_state(self, model: SharedModel) -> State:
        state = super().initial_state(model)
        self.weighted_b_sum = {b_key: torch.zeros_like(state[b_key], dtype=torch.float64) for _, b_key in lora_modules(state).values()}
        return state

    def plan(self, round_number: int, clients: list[int], global_state: State, devices: DeviceView) -> dict[int, ClientPlan]:
        layout, lr = self.global_layout(), self.lr(round_number)
        shared = {key: value for key, value in global_state.items() if key not in self.weighted_b_sum}
        return {c: ClientPlan(c, layout, shared, lr) for c in clients}

    def aggregate(self, round_number: int, global_state: State, updates: list[Update]) -> State:
        for update in updates:
            for key, total in self.weighted_b_sum.items():
                if update.client in self.samples:  # its previous B is what it started from
                    total.sub_(update.kept_start[key].double(), alpha=self.samples[update.client])
                total.add_(update.kept[key].double(), alpha=update.num_samples)
            self.samples[update.client] = update.num_samples
        seen = sum(self.samples.values())
        evaluation_b = {key: (total / seen).float() for key, total in self.weighted_b_sum.items()}
        return {**global_state, **average_updates(updates), **evaluation_b}

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "weighted_b_sum": self.weighted_b_sum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "weighted_b_sum" not in state:  # written before client_state/ (2026-11-24): every client's B in the checkpoint
            state = {
                **state,
                "weighted_b_sum": {
                    key: sum(
                        (b[key].double() * state["samples"][c] for c, b in state["local_b"].items()),
                        torch.zeros_like(initial, dtype=torch.float64),
                    )
                    for key, initial in state["initial_b"].items()
                },
            }
        self.samples, self.weighted_b_sum = state["samples"], state["weighted_b_sum"]
