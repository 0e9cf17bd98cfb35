"""FedRA (Su et al., ECCV 2024, arXiv 2311.11227; code github.com/leondada/FedRA): layers allocated to devices at random.

Each round the server draws an allocation matrix M (clients x layers): device k's row holds L_k ones, at layers drawn
uniformly without replacement, afresh every round (the code's ``np.random.choice(L, L_k, replace=False)`` per client).
The device's local model is its allocated layers alone, in their order: the others are skipped (each passes its input
on), so its forward and backward both shrink. It tunes LoRA (rank lora.r) on every layer it holds, and the head. The
server sets each layer's LoRA to the sample-weighted mean over the devices that held it,
theta_l = sum_k M_kl p_k theta_kl / sum_k M_kl p_k; a layer no device held keeps its value; the head, which every device
trains, is averaged over all of them. Down and up: the LoRA of the device's layers, and the head.

L_k: in FedRA each client has a fixed number of layers set by its resource level (the code's ``--net_type``, e.g. 12, 10,
8, 6, 4, 3 of 12). Here it follows the device's capacity estimate, as HetLoRA's and FlexLoRA's ranks do (``round_times``):
L_k = floor(L x min_j t_j / t_k), at least 1, where t is a whole-model round: a device three times slower than the fleet's
fastest holds a third of the layers, so its round takes about as long as the fastest device's whole-model round. It is
then lowered until the device's training fits its memory (a device holds only its layers' weights), and recomputed each
round from the current estimates. docs/strategies.md lists the choices our engine forces.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from legend.core import ClientPlan, State, Update
from legend.devices.capacity import DeviceView, round_times
from legend.devices.cost import training_memory_bytes
from legend.errors import LegendError
from legend.lora.layout import AdapterLayout
from legend.strategies.aggregate import masked_average, robust_updates, sample_weights
from legend.strategies.base import COORDINATE_MEANS, QUANTIZED_BASE, Strategy
from legend.strategies.registry import register

ALLOCATION_STREAM = 2311  # keeps the allocation's draws apart from the other (seed, round, client) streams


@register
class FedRA(Strategy):
    name = "fedra"
    supports = COORDINATE_MEANS | {QUANTIZED_BASE}  # not parallel groups: a group runs one pass through every block

    def __init__(self, config, info):
        super().__init__(config, info)
        if config.engine.parallel_clients > 1:
            raise LegendError(
                f"fedra: each device leaves out its own blocks, and engine.parallel_clients = {config.engine.parallel_clients} "
                "trains a group of clients in one pass through every block: set engine.parallel_clients = 1"
            )
        if config.lora.top_blocks:
            raise LegendError(
                "fedra allocates every block of the model to its devices, and lora.top_blocks restricts LoRA to the top ones: "
                "leave lora.top_blocks at 0"
            )

    def global_layout(self) -> AdapterLayout:
        return AdapterLayout.uniform_lora(self.info.num_blocks, self.config.lora.r)

    def device_layout(self, held: Iterable[int]) -> AdapterLayout:
        """LoRA at rank lora.r on the blocks a device holds; every other block skipped."""
        held, blocks = set(held), range(self.info.num_blocks)
        return AdapterLayout(
            "lora", tuple(self.config.lora.r if i in held else 0 for i in blocks), skipped_blocks=tuple(i for i in blocks if i not in held)
        )

    def layer_counts(self, devices: DeviceView, clients: list[int]) -> dict[int, int]:
        """L_k per client: floor(L x min_j t_j / t_k) in [1, L], lowered until its training fits the device's memory
        (which depends on how many blocks it holds, not on which)."""
        num_blocks, counts = self.info.num_blocks, {}
        for client, (fastest, own) in round_times(devices, clients, self.config.lora.r).items():
            layers = max(1, min(num_blocks, int(num_blocks * fastest / own)))
            memory = devices.capacity[client].memory_gb * 1e9
            while layers > 1 and training_memory_bytes(devices.spec, self.device_layout(range(layers)), devices.workload[client]) > memory:
                layers -= 1
            counts[client] = layers
        return counts

    def allocation(self, round_number: int, client: int, layers: int) -> tuple[int, ...]:
        """Row k of this round's allocation matrix: ``layers`` blocks drawn uniformly without replacement from (seed, round, client)."""
        rng = np.random.default_rng([self.config.seed, round_number, client, ALLOCATION_STREAM])
        return tuple(sorted(int(i) for i in rng.choice(self.info.num_blocks, size=layers, replace=False)))

    def plan(self, round_number: int, clients: list[int], global_state: State, devices: DeviceView) -> dict[int, ClientPlan]:
        """Each device gets only what it uses: its blocks' LoRA and the head (its skipped blocks never run)."""
        lr, plans = self.lr(round_number), {}
        for client, layers in self.layer_counts(devices, clients).items():
            held = self.allocation(round_number, client, layers)
            used = {key: value for key, value in global_state.items() if (block := self.info.block_of(key)) is None or block in held}
            plans[client] = ClientPlan(client, self.device_layout(held), used, lr)
        return plans

    def aggregate(self, round_number: int, global_state: State, updates: list[Update]) -> State:
        """theta_l = sum_k M_kl p_k theta_kl / sum_k M_kl p_k over the devices that held layer l (or fl.aggregator's robust rule
        over them); a layer no device held keeps its value."""
        fl = self.config.fl
        if fl.aggregator != "mean":
            return {**global_state, **robust_updates(global_state, updates, fl.aggregator, fl.trim_fraction)}
        weights, new = sample_weights(updates), dict(global_state)
        for key in global_state:
            holders = [(update.weights[key], weight) for update, weight in zip(updates, weights, strict=True) if key in update.weights]
            if holders:
                new[key] = masked_average(global_state[key], [tensor for tensor, _ in holders], [weight for _, weight in holders])
        return new
