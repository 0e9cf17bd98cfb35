"""Per-client state lives in files, memory keeps engine.client_state_mb of it, and a run neither changes nor loses anything by it."""

from __future__ import annotations

import shutil

import pytest
import torch
from tests.conftest import ROOT, tiny_overrides

from legend.config import load_config
from legend.engine.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from legend.engine.client_store import ClientStore, state_bytes
from legend.engine.simulation import run_experiment
from legend.errors import LegendError
from legend.records import MEASURED

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
    assert store.get(100) is None
    assert state_bytes(b_factor(0)) == 384 * 8 * 4


def test_a_file_goes_only_after_a_checkpoint_that_no_longer_names_it_is_written(tmp_path):
    store = ClientStore(limit_mb=0)
    store.use_folder(tmp_path)
    store.put(7, b_factor(1))
    first = store.state_dict()
    store.collect()
    store.put(7, b_factor(2))  # a newer B for client 7: a new file
    second = store.state_dict()
    assert first["files"][7] != second["files"][7]
    assert (tmp_path / first["files"][7]).is_file(), "until the second checkpoint is written, a crash must find the first one's file"
    (tmp_path / ".client-7-9.pt.tmp").write_bytes(b"torn")  # a write that a crash cut short
    store.collect()
    assert [path.name for path in tmp_path.iterdir()] == [second["files"][7]]
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


def fedsa_config(**extra):
    return load_config(QUICKSTART, tiny_overrides(**{"strategy.name": "fedsa", "fl.rounds": 4, **extra}))


def without_measurements(summary):
    return {k: v for k, v in summary.items() if k not in MEASURED}


def test_fedsa_with_every_b_on_disk_gives_the_in_memory_run_and_resumes_from_its_files(tmp_path):
    memory_config, disk_config = fedsa_config(), fedsa_config(**{"engine.client_state_mb": 0})
    in_memory = run_experiment(memory_config, tmp_path / "memory")
    with pytest.raises(Crash):
        run_experiment(disk_config, tmp_path / "disk", on_round=crash_after_round(2))
    assert list((tmp_path / "disk" / "client_state").glob("client-*.pt")), "with no memory allowed, every B is in a file"
    on_disk = run_experiment(disk_config, tmp_path / "disk", resume=True)
    assert without_measurements(on_disk) == without_measurements(in_memory)
    memory_state = load_checkpoint(tmp_path / "memory", memory_config.model_dump())["global_state"]
    disk_state = load_checkpoint(tmp_path / "disk", disk_config.model_dump())["global_state"]
    for key, tensor in memory_state.items():
        torch.testing.assert_close(disk_state[key], tensor, rtol=0, atol=0)


def test_a_fedsa_checkpoint_from_before_client_state_resumes_as_the_uninterrupted_run(tmp_path):
    config = fedsa_config()
    whole = run_experiment(config, tmp_path / "whole")
    old = tmp_path / "old"
    with pytest.raises(Crash):
        run_experiment(config, old, on_round=crash_after_round(2))
    payload = torch.load(old / CHECKPOINT, weights_only=True)  # rewritten as legend wrote it before: every B in it, no running sum
    devices = payload.pop("devices")  # nor the runtime's own part: the B were the strategy's
    store = ClientStore(limit_mb=64)
    store.use_folder(old / "client_state")
    store.load_state_dict(devices["own"])
    payload["strategy_state"] = {
        "initial_b": devices["initial"],
        "samples": payload["strategy_state"]["samples"],
        "local_b": {client: store.get(client) for client in devices["own"]["files"]},
    }
    shutil.rmtree(old / "client_state")
    save_checkpoint(old, payload)
    assert without_measurements(run_experiment(config, old, resume=True)) == without_measurements(whole)
