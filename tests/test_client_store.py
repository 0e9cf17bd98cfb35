"""Per-client state lives in files, memory keeps engine.client_state_mb of it, and a run neither changes nor loses anything by it."""

from __future__ import annotations

import pytest
import torch

from legend.config import load_config
from legend.engine.checkpoint import load_checkpoint
from legend.engine.simulation import run_experiment
from legend.errors import LegendError
from legend.strategies.client_store import ClientStore, state_bytes
from tests.conftest import ROOT, tiny_overrides

QUICKSTART = ROOT / "configs" / "quickstart.toml"


def b_factor(seed: int) -> dict[str, torch.Tensor]:
    return {"m.lora_B.default.weight": torch.randn(384, 8, generator=torch.Generator().manual_seed(seed))}


def test_every_client_has_a_file_and_memory_keeps_the_most_recently_written(tmp_path):
    store = ClientStore(limit_mb=0.05)  # room for 4 of these 12 KB factors
    store.use_folder(tmp_path)
    for client in range(100):
        store.put(client, b_factor(client))
    assert store.bytes <= store.limit and len(store.memory) == 4
    assert sorted(store.memory) == [96, 97, 98, 99] and len(list(tmp_path.glob("client-*.pt"))) == 100
    for client in (0, 57, 99):
        torch.testing.assert_close(store.get(client), b_factor(client), rtol=0, atol=0)
    assert store.get(100) is None and store.clients() == list(range(100))
    assert state_bytes(b_factor(0)) == 384 * 8 * 4


def test_a_file_outlives_the_checkpoint_that_replaced_it_by_one_checkpoint(tmp_path):
    store = ClientStore(limit_mb=0)
    store.use_folder(tmp_path)
    store.put(7, b_factor(1))
    first = store.state_dict()
    store.put(7, b_factor(2))  # a newer B for client 7: a new file
    second = store.state_dict()
    assert first["files"][7] != second["files"][7]
    assert (tmp_path / first["files"][7]).is_file(), "the previous checkpoint still names it: a crash now must find it"
    store.state_dict()
    assert not (tmp_path / first["files"][7]).exists() and (tmp_path / second["files"][7]).is_file()
    fresh = ClientStore(limit_mb=0)
    fresh.use_folder(tmp_path)
    fresh.load_state_dict(second)
    torch.testing.assert_close(fresh.get(7), b_factor(2), rtol=0, atol=0)
    (tmp_path / second["files"][7]).unlink()
    with pytest.raises(LegendError, match=r"missing from .*restore the run folder whole"):
        ClientStore(limit_mb=0).load_state_dict(second)


class Crash(Exception):
    pass


def crash_after_round(last):
    def on_round(row):
        if row["round"] == last:
            raise Crash

    return on_round


def test_fedsa_with_every_b_on_disk_gives_the_in_memory_run_and_resumes_from_its_files(tmp_path):
    memory_config = load_config(QUICKSTART, tiny_overrides(**{"strategy.name": "fedsa", "fl.rounds": 4}))
    disk_config = load_config(QUICKSTART, tiny_overrides(**{"strategy.name": "fedsa", "fl.rounds": 4, "engine.client_state_mb": 0}))
    in_memory = run_experiment(memory_config, tmp_path / "memory")
    with pytest.raises(Crash):
        run_experiment(disk_config, tmp_path / "disk", on_round=crash_after_round(2))
    assert list((tmp_path / "disk" / "client_state").glob("client-*.pt")), "with no memory allowed, every B is in a file"
    on_disk = run_experiment(disk_config, tmp_path / "disk", resume=True)
    assert {k: v for k, v in on_disk.items() if k != "wall_s"} == {k: v for k, v in in_memory.items() if k != "wall_s"}
    memory_state = load_checkpoint(tmp_path / "memory", memory_config.model_dump())["global_state"]
    disk_state = load_checkpoint(tmp_path / "disk", disk_config.model_dump())["global_state"]
    for key, tensor in memory_state.items():
        torch.testing.assert_close(disk_state[key], tensor, rtol=0, atol=0)
