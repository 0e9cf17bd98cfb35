"""Devices that keep their frozen-prefix activations (``devices.activation_cache``): what each one holds, what it runs.

A device's local data is fixed, and no strategy changes anything below the lowest block of its global LoRA region (the
edge), so the hidden states entering that block are the same for an example in every round. Such a device runs the blocks
below the edge for an example the first round it trains on it, writes the states (float16) to its storage while its
profile's ``storage_gb`` has room, and reads them back in later rounds at ``storage_mb_s``. When the edge moves, what it
holds is stale and it starts over. Writing overlaps with the training above the edge and is not charged.

This ledger only decides what the virtual clock charges; the engine trains exactly the same with or without it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from legend.devices.cost import Batches, KeptPrefix

STATE_BYTES = 2  # float16 per hidden value


class KeptActivations:
    """Per client: the edge its storage was filled at, the examples (training-split rows) it holds, and their bytes."""

    def __init__(self, hidden: int, lengths: np.ndarray):
        self.hidden, self.lengths = hidden, lengths
        self.held: dict[int, tuple[int, set[int], int]] = {}

    def state_bytes(self, rows) -> int:
        """Storage the states of these rows take: their tokens (unpadded) x hidden x 2 bytes."""
        return int(self.lengths[np.asarray(rows, dtype=np.int64)].sum()) * self.hidden * STATE_BYTES

    def round(self, client: int, batches: list[np.ndarray], edge: int, storage_gb: float) -> KeptPrefix | None:
        """What the device runs and reads below ``edge`` this round, storing what it runs while there is room (None: it keeps nothing)."""
        if edge == 0 or storage_gb <= 0:
            return None
        held_edge, stored, used = self.held.get(client, (edge, set(), 0))
        if held_edge != edge:  # the global region moved: what it holds is stale
            stored, used = set(), 0
        computed, read, room = [], 0, round(storage_gb * 1e9)
        for batch in batches:
            missing = [int(i) for i in batch if int(i) not in stored]
            read += self.state_bytes(batch) - self.state_bytes(missing)
            if missing:
                computed.append((len(missing), int(self.lengths[missing].max())))
            for row in missing:
                size = self.state_bytes([row])
                if used + size <= room:
                    stored.add(row)
                    used += size
        self.held[client] = (edge, stored, used)
        return KeptPrefix(edge, Batches.of(computed), read, used)

    def state_dict(self) -> dict[str, Any]:
        return {client: {"edge": edge, "rows": sorted(stored), "bytes": used} for client, (edge, stored, used) in self.held.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.held = {int(client): (s["edge"], set(s["rows"]), s["bytes"]) for client, s in state.items()}
