"""The frozen-prefix cache: per example, the hidden states entering the lowest block any client can change.

A strategy changes only the tensors of its global state, so the embeddings and the blocks below the
lowest of them (LEGEND's blocks without LoRA) compute the same hidden states for an example in every
round. The cache computes them once per example, stores them at ``engine.cache_dtype`` and feeds them
to the blocks above. An example's states never depend on what was cached before: evaluation reads the
test set in the same batches every time, so a batch with a miss is computed whole; a training example
is computed alone (a batch of one), since its batch differs from round to round. Hence a run is as
deterministic with the cache as without (resume, eviction and Flower nodes with their own caches give
the same numbers), and differs from an uncached run only by the rounding of the stored dtype.

Computing an example alone costs about three times its share of a batched pass, so training reads the
cache only when examples come back often enough to repay it (``training_reuse``). On a GPU the most
recently used examples stay in its memory, up to ``engine.cache_device_mb``, and a batch of them is read
there without a copy; the least recently used move to host memory, up to ``engine.cache_mb``, and leave it
for a file in ``engine.cache_spill_dir`` when one is set, else they are recomputed when next needed.
A Flower node whose device keeps its activations (``devices.activation_cache``) keeps them in a file of its own
instead (``keep_on_disk``), which the next process of the node finds again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from legend.config import Config
from legend.core import atomic_write
from legend.data.batching import EncodedSplit
from legend.models.shared import SharedModel

log = logging.getLogger(__name__)

# Visits per training example over the run below which training does not read the cache: an example computed alone
# cost 2.65 ms against 0.80 ms as its share of a batched pass (MiniLM-L6, blocks 0-1, 2 cores), repaid after ~3 more visits.
MIN_TRAINING_REUSE = 4.0

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ENTRY_OVERHEAD = 200  # bytes a stored tensor costs beyond its data (object, storage), counted against the limit

Key = tuple[str, int]  # (split name, example index)


class PrefixCache:
    def __init__(
        self,
        model: SharedModel,
        boundary: int,
        limit_mb: float,
        dtype: str,
        spill_dir: str = "",
        trains: bool = True,
        device_limit_mb: float = 0.0,
    ):
        """``trains``: whether training reads it (not with dropout in the skipped blocks, nor without enough reuse: ``training_reuse``).
        ``device_limit_mb``: the tier in the model's device memory, before ``limit_mb`` of host memory (0: none)."""
        self.model, self.boundary, self.trains = model, boundary, trains
        self.device_limit = int(device_limit_mb * 2**20)
        self.on_device: OrderedDict[Key, torch.Tensor] = OrderedDict()  # the device tier, least recently used first
        self.device_bytes = 0
        self.limit = int(limit_mb * 2**20)
        self.dtype = DTYPES[dtype]
        self.entries: OrderedDict[Key, torch.Tensor] = OrderedDict()  # in memory, least recently used first
        self.bytes = 0
        self.spill = tempfile.TemporaryFile(dir=spill_dir) if spill_dir else None  # deleted when closed
        self.spilled: dict[Key, tuple[int, int]] = {}  # key -> (offset, tokens) in the spill file
        self.spill_bytes, self.spill_limit = 0, None  # bytes in the spill file, and its bound (kept on disk: the device's storage)
        self.index: Path | None = None  # kept on disk: where the spill file's index is saved
        self.frozen = model.prefix_parameters(boundary)
        self.versions = self._versions()
        self.hits = self.misses = 0

    def view(self, split: str, data: EncodedSplit, fixed_batches: bool) -> PrefixView:
        return PrefixView(self, split, data, fixed_batches)

    def hidden(self, split: str, data: EncodedSplit, rows: np.ndarray, fixed_batches: bool) -> torch.Tensor:
        """(B, T, H) float32: the cached input of block ``boundary`` for these rows, zero past each row's length.

        Missing rows are computed, then stored: each alone, or, where the split is always read in the same batches
        (evaluation), the whole batch at once: either way an example's states never depend on what was cached before."""
        if self._versions() != self.versions:  # something wrote to a frozen tensor: every entry is stale
            log.info("frozen-prefix cache cleared: the embeddings or blocks below %d changed", self.boundary)
            self.clear()
        found = {int(i): self._lookup((split, int(i))) for i in rows}
        missing = [i for i, entry in found.items() if entry is None]
        self.hits += len(found) - len(missing)
        self.misses += len(missing)
        if missing:
            found.update(self._compute(data, [int(i) for i in rows] if fixed_batches else missing, alone=not fixed_batches))
            for i in missing:
                self._store((split, i), found[i])
        out = torch.zeros(len(rows), int(data.lengths[rows].max()), self.model.info.hidden_size, device=self.model.device)
        for j, index in enumerate(rows):
            entry = found[int(index)]
            out[j, : len(entry)] = entry
        return out

    def keep_on_disk(self, path: Path, limit_bytes: int) -> None:
        """Write every training example's states to ``path`` as well (at most ``limit_bytes``), and read those an earlier
        process left there: a device that keeps its activations, on a Flower node that starts a process per message."""
        if self.spill:
            self.spill.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.spill = open(path, "a+b")  # noqa: SIM115 (open for the cache's life)
        self.index, self.spill_limit = path.with_suffix(".json"), limit_bytes
        saved = json.loads(self.index.read_text()) if self.index.is_file() else {}
        size, width = os.fstat(self.spill.fileno()).st_size, self.model.info.hidden_size * self.dtype.itemsize
        if saved.get("header") == self._header():  # entries past the file's end were indexed but never flushed: dropped
            self.spilled = {
                (split, i): (offset, tokens) for split, i, offset, tokens in saved["entries"] if offset + tokens * width <= size
            }
        else:
            self.spill.truncate(0)
            self.spilled = {}
        self.spill_bytes = sum(tokens * width for _, tokens in self.spilled.values())

    def save(self) -> None:
        """Kept on disk: flush the states and write their index, so that the node's next process finds them."""
        if self.index is None:
            return
        self.spill.flush()
        os.fsync(self.spill.fileno())
        entries = [[split, i, offset, tokens] for (split, i), (offset, tokens) in self.spilled.items()]
        atomic_write(self.index, json.dumps({"header": self._header(), "entries": entries}).encode())

    def _header(self) -> dict:
        return {"boundary": self.boundary, "dtype": str(self.dtype), "hidden": self.model.info.hidden_size}

    def clear(self) -> None:
        self.on_device.clear()
        self.device_bytes = 0
        self.entries.clear()
        self.spilled.clear()
        self.bytes = self.spill_bytes = 0
        if self.spill:
            self.spill.truncate(0)
        self.versions = self._versions()

    def _compute(self, data: EncodedSplit, rows: list[int], alone: bool) -> dict[int, torch.Tensor]:
        """Each row's (T_row, H) states at the stored dtype."""
        groups = [[i] for i in rows] if alone else [rows]
        out = {}
        for group in groups:
            states = self.model.prefix_output(data.batch(group), self.boundary)  # (B, T, H)
            out.update(
                {i: states[j, : data.lengths[i]].to("cpu", self.dtype, copy=True) for j, i in enumerate(group)}
            )  # own host storage, not the batch's
        return out

    def _lookup(self, key: Key) -> torch.Tensor | None:
        entry = self.on_device.get(key)
        if entry is not None:
            self.on_device.move_to_end(key)
            return entry
        entry = self.entries.get(key)
        if entry is not None and self.device_limit:  # back to the device tier, as the most recently used
            del self.entries[key]
            self.bytes -= entry.nbytes + ENTRY_OVERHEAD
            return self._store(key, entry)
        if entry is not None:
            self.entries.move_to_end(key)
            return entry
        entry = self._read_spilled(key)
        if entry is not None:
            entry = self._store(key, entry)  # back in memory, as the most recently used
        return entry

    def _store(self, key: Key, entry: torch.Tensor) -> torch.Tensor:
        """Keep a (host) entry: in the device tier when there is one (its least recently used moving to host memory),
        else in host memory. Returns the entry where it is kept."""
        if self.index is not None and key[0] == "train":  # kept on disk: written through
            self._write_spilled(key, entry)
        size = entry.nbytes + ENTRY_OVERHEAD
        if not self.device_limit or size > self.device_limit:
            self._store_on_host(key, entry)
            return entry
        while self.device_bytes + size > self.device_limit:
            old_key, old = self.on_device.popitem(last=False)
            self.device_bytes -= old.nbytes + ENTRY_OVERHEAD
            self._store_on_host(old_key, old.to("cpu"))
        self.on_device[key] = entry.to(self.model.device)
        self.device_bytes += size
        return self.on_device[key]

    def _store_on_host(self, key: Key, entry: torch.Tensor) -> None:
        size = entry.nbytes + ENTRY_OVERHEAD
        if size > self.limit:
            return
        while self.bytes + size > self.limit:
            old_key, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes + ENTRY_OVERHEAD
            self._write_spilled(old_key, old)
        self.entries[key] = entry
        self.bytes += size

    def _write_spilled(self, key: Key, entry: torch.Tensor) -> None:
        if (
            self.spill is None
            or key in self.spilled
            or (self.spill_limit is not None and self.spill_bytes + entry.nbytes > self.spill_limit)
        ):
            return
        offset = self.spill.seek(0, os.SEEK_END)
        self.spill.write(entry.view(torch.uint8).numpy().tobytes())
        self.spilled[key] = (offset, entry.shape[0])
        self.spill_bytes += entry.nbytes

    def _read_spilled(self, key: Key) -> torch.Tensor | None:
        if key not in self.spilled:
            return None
        offset, tokens = self.spilled[key]
        hidden = self.model.info.hidden_size
        self.spill.flush()
        raw = os.pread(self.spill.fileno(), tokens * hidden * self.dtype.itemsize, offset)
        return torch.frombuffer(bytearray(raw), dtype=self.dtype).reshape(tokens, hidden)

    def _versions(self) -> tuple[int, ...]:
        """torch counts in-place writes per tensor: any load, optimizer step or merge into a frozen tensor shows here."""
        return tuple(p._version for p in self.frozen)


def training_reuse(config: Config, train_examples: int) -> float:
    """How often, on average, the run trains on each training example (sampled clients x their samples x rounds / examples)."""
    fl, train = config.fl, config.train
    per_client = train.local_epochs * train_examples / fl.num_clients if train.local_epochs > 0 else train.local_steps * train.batch_size
    return fl.rounds * fl.clients_per_round * per_client / max(train_examples, 1)


@dataclass(frozen=True)
class PrefixView:
    """The cache as one split's batches see it."""

    cache: PrefixCache
    split: str
    data: EncodedSplit
    fixed_batches: bool  # always read in the same batches (the evaluation buckets)

    @property
    def boundary(self) -> int:
        return self.cache.boundary

    def hidden(self, rows: np.ndarray) -> torch.Tensor:
        return self.cache.hidden(self.split, self.data, rows, self.fixed_batches)
