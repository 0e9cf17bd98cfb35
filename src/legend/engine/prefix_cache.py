"""The frozen-prefix cache: per example, the hidden states entering the lowest block any client can change.

A strategy changes only the tensors of its global state, so the embeddings and the blocks below the
lowest of them (LEGEND's blocks without LoRA) compute the same hidden states for an example in every
round. The cache computes them once per example and feeds them to the blocks above, in training and
in evaluation. Each example is computed alone (a batch of one) and stored at ``engine.cache_dtype``,
so what a batch receives never depends on which batch first met the example or on what was evicted:
a run is as deterministic with the cache as without, and differs from an uncached run only by the
rounding of the stored dtype. Least recently used examples leave memory past ``engine.cache_mb``; they
go to a file in ``engine.cache_spill_dir`` when one is set, else they are recomputed when next needed.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from legend.data.batching import EncodedSplit
from legend.models.shared import SharedModel

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ENTRY_OVERHEAD = 200  # bytes a stored tensor costs beyond its data (object, storage), counted against the limit

Key = tuple[str, int]  # (split name, example index)


class PrefixCache:
    def __init__(self, model: SharedModel, boundary: int, limit_mb: float, dtype: str, spill_dir: str = "", trains: bool = True):
        """``trains``: whether training may read it (not when dropout in the skipped blocks would make each pass differ)."""
        self.model, self.boundary, self.trains = model, boundary, trains
        self.limit = int(limit_mb * 2**20)
        self.dtype = DTYPES[dtype]
        self.entries: OrderedDict[Key, torch.Tensor] = OrderedDict()  # in memory, least recently used first
        self.bytes = 0
        self.spill = tempfile.TemporaryFile(dir=spill_dir) if spill_dir else None  # deleted when closed
        self.spilled: dict[Key, tuple[int, int]] = {}  # key -> (offset, tokens) in the spill file
        self.frozen = model.prefix_parameters(boundary)
        self.versions = self._versions()
        self.hits = self.misses = 0

    def view(self, split: str, data: EncodedSplit) -> PrefixView:
        return PrefixView(self, split, data)

    def hidden(self, split: str, data: EncodedSplit, rows: np.ndarray) -> torch.Tensor:
        """(B, T, H) float32: the cached input of block ``boundary`` for these rows, zero past each row's length."""
        if self._versions() != self.versions:  # something wrote to a frozen tensor: every entry is stale
            log.info("frozen-prefix cache cleared: the embeddings or blocks below %d changed", self.boundary)
            self.clear()
        width = int(data.lengths[rows].max())
        out = torch.zeros(len(rows), width, self.model.info.hidden_size)
        for j, index in enumerate(rows):
            entry = self._entry(split, data, int(index))
            out[j, : len(entry)] = entry
        return out

    def clear(self) -> None:
        self.entries.clear()
        self.spilled.clear()
        self.bytes = 0
        if self.spill:
            self.spill.truncate(0)
        self.versions = self._versions()

    def _entry(self, split: str, data: EncodedSplit, index: int) -> torch.Tensor:
        key = (split, index)
        entry = self.entries.get(key)
        if entry is not None:
            self.hits += 1
            self.entries.move_to_end(key)
            return entry
        entry = self._read_spilled(key)
        if entry is None:
            self.misses += 1
            entry = self.model.prefix_output(data.batch([index]), self.boundary)[0].to(self.dtype)  # (T, H), alone: canonical
        self._store(key, entry)
        return entry

    def _store(self, key: Key, entry: torch.Tensor) -> None:
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
        if self.spill is None or key in self.spilled:
            return
        offset = self.spill.seek(0, os.SEEK_END)
        self.spill.write(entry.view(torch.uint8).numpy().tobytes())
        self.spilled[key] = (offset, entry.shape[0])

    def _read_spilled(self, key: Key) -> torch.Tensor | None:
        if key not in self.spilled:
            return None
        self.hits += 1
        offset, tokens = self.spilled[key]
        hidden = self.model.info.hidden_size
        self.spill.flush()
        raw = os.pread(self.spill.fileno(), tokens * hidden * self.dtype.itemsize, offset)
        return torch.frombuffer(bytearray(raw), dtype=self.dtype).reshape(tokens, hidden)

    def _versions(self) -> tuple[int, ...]:
        """torch counts in-place writes per tensor: any load, optimizer step or merge into a frozen tensor shows here."""
        return tuple(p._version for p in self.frozen)


@dataclass(frozen=True)
class PrefixView:
    """The cache as one split's batches see it."""

    cache: PrefixCache
    split: str
    data: EncodedSplit

    @property
    def boundary(self) -> int:
        return self.cache.boundary

    def hidden(self, rows: np.ndarray) -> torch.Tensor:
        return self.cache.hidden(self.split, self.data, rows)
