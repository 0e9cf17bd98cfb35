"""Each simulated device's own tensors between rounds (FedSA-LoRA's B): a file each, the most recent also in memory.

The embedded runtime keeps them for its devices (``engine/runtime.py``); a Flower node keeps its own.

A simulated fleet of 1,000 clients should cost about what 10 do, so a client's tensors are written to
a file of their own in the run's folder (``client_state/``) when they arrive, and memory keeps only the
most recently used ones, up to ``engine.client_state_mb``. A checkpoint names the files instead of
holding the tensors, so it stays small. A file is never rewritten: a client's newer tensors go to a
new file, and the files the checkpoint does not name are deleted only after it is written
(``collect``), so a crash at any point leaves the last checkpoint whole, files and all.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from legend.core import State, atomic_write
from legend.errors import LegendError


def state_bytes(state: State) -> int:
    return sum(tensor.nbytes for tensor in state.values())


class ClientStore:
    def __init__(self, limit_mb: float):
        self.limit = int(limit_mb * 2**20)
        self.memory: OrderedDict[int, State] = OrderedDict()  # client -> its tensors, least recently used first
        self.bytes = 0  # of the tensors in memory
        self.files: dict[int, str] = {}  # client -> the file under ``folder`` holding its tensors
        self.folder: Path | None = None  # None: everything stays in memory (no run folder, e.g. a unit test)
        self.written = 0  # files written so far: the next file's name is new

    def use_folder(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder

    def get(self, client: int) -> State | None:
        if client in self.memory:
            return self.memory[client]
        if client in self.files:
            state = torch.load(self.folder / self.files[client], weights_only=True)
            self._remember(client, state)  # a client planned this round is read again when its update arrives
            return state
        return None

    def put(self, client: int, state: State) -> None:
        if self.folder is not None:
            name = f"client-{client}-{self.written}.pt"
            self.written += 1
            buffer = io.BytesIO()
            torch.save(state, buffer)
            atomic_write(self.folder / name, buffer.getbuffer())
            self.files[client] = name
        self._remember(client, state)

    def _remember(self, client: int, state: State) -> None:
        """Keep in memory as the most recently used; past the limit, the least recently used leave (their files hold them)."""
        if client in self.memory:
            self.bytes -= state_bytes(self.memory.pop(client))
        self.memory[client] = state
        self.bytes += state_bytes(state)
        while self.folder is not None and self.bytes > self.limit:
            self.bytes -= state_bytes(self.memory.popitem(last=False)[1])

    def state_dict(self) -> dict[str, Any]:
        """The names of the files (without a folder: the tensors themselves)."""
        if self.folder is None:
            return {"memory": dict(self.memory), "files": {}, "written": 0}
        return {"memory": {}, "files": dict(self.files), "written": self.written}

    def collect(self) -> None:
        """Delete the files no client's latest tensors are in (and temporary files a crash left); call it once the
        checkpoint naming the latest ones is written."""
        if self.folder is None:
            return
        named = set(self.files.values())
        for path in [*self.folder.glob("client-*.pt"), *self.folder.glob(".client-*.pt.tmp")]:
            if path.name not in named:
                path.unlink()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [name for name in state["files"].values() if self.folder is None or not (self.folder / name).is_file()]
        if missing:
            raise LegendError(
                f"--resume: {missing[0]} (a client's saved tensors) is missing from {self.folder}: restore the run folder whole, or start "
                "a new run"
            )
        self.memory, self.bytes = OrderedDict(), 0
        self.files, self.written = dict(state["files"]), state["written"]
        for client, tensors in state["memory"].items():  # saved without a folder: into files now, where there is one
            self.put(client, tensors)
