"""Devices that keep their frozen-prefix activations (devices.activation_cache): the clock charges the blocks below the
global LoRA region once per example, then a read; the model trains exactly as without; lora.top_blocks restricts
any LoRA strategy to the top blocks; a Flower node's cache outlives its process."""

import json

import numpy as np
import pytest
import torch
from tests.conftest import ROOT, tiny_overrides

from legend.config import load_config
from legend.devices.activations import STATE_BYTES, KeptActivations
from legend.devices.cost import Batches, block_forward_flops
from legend.engine.checkpoint import CHECKPOINT
from legend.engine.round import device_view, preview_plans
from legend.engine.simulation import build_experiment, build_model, run_experiment
from legend.errors import LegendError

QUICKSTART = ROOT / "configs" / "quickstart.toml"
# Every client trains in both rounds on its whole partition, one example per batch: no example comes back within a round
EVERY_EXAMPLE_EACH_ROUND = {
    "strategy.name": "legend",
    "data.train_size": 120,
    "fl.clients_per_round": 4,
    "train.local_epochs": 1,
    "train.batch_size": 1,
}


def run(tmp_path, name, **extra):
    config = load_config(QUICKSTART, tiny_overrides(**{**EVERY_EXAMPLE_EACH_ROUND, **extra}))
    run_experiment(config, tmp_path / name)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return config, rows, torch.load(tmp_path / name / CHECKPOINT, weights_only=True)["global_state"]


def test_a_device_is_charged_the_frozen_blocks_once_then_a_read_and_the_model_is_the_same(tmp_path):
    config, kept_rows, kept_state = run(tmp_path, "kept", **{"devices.activation_cache": "true"})
    _, rows, state = run(tmp_path, "plain")
    assert all(torch.equal(kept_state[k], state[k]) for k in state)
    for a, b in zip(kept_rows, rows, strict=True):
        assert (a["accuracy"], a["loss"], a["bytes_up"], a["bytes_down"]) == (b["accuracy"], b["loss"], b["bytes_up"], b["bytes_down"])
    exp = build_experiment(config)
    edge = 2  # LEGEND's global LoRA region on MiniLM's 6 blocks: 2..5
    first = {d["client"]: d for d in kept_rows[1]["devices"]}
    assert first and all(
        d["compute_s"] == p["compute_s"] and d["read_s"] == 0 for d, p in zip(kept_rows[1]["devices"], rows[1]["devices"], strict=True)
    )
    batches, view = device_view(exp, exp.local(), 2, sorted(first))
    for kept, plain in zip(kept_rows[2]["devices"], rows[2]["devices"], strict=True):
        client, profile = kept["client"], exp.fleet.device_of(kept["client"]).profile
        assert set(np.concatenate(batches[client])) == set(exp.partitions[client])  # every example was seen and stored in round 1
        below = edge * block_forward_flops(exp.spec, view.workload[client], 0) / profile.flops  # forward of blocks 0-1, no adapters there
        stored = sum(int(exp.train.lengths[i]) for i in exp.partitions[client]) * exp.spec.hidden * STATE_BYTES
        read_s = stored / (profile.storage_mb_s * 1e6)  # each example once in the round: the whole partition is read
        assert kept["read_s"] == pytest.approx(read_s, abs=1e-4) and read_s > 0
        assert kept["compute_s"] == pytest.approx(plain["compute_s"] - below + read_s, abs=2e-4)
        assert kept["compute_s"] < plain["compute_s"] - 0.1 * below
        assert (kept["kept_blocks"], kept["storage_mb"]) == (edge, pytest.approx(stored / 1e6, abs=1e-4))
    assert kept_rows[2]["virtual_time_s"] < rows[2]["virtual_time_s"]


def test_in_pieces_a_devices_first_round_costs_what_a_plain_run_does(tmp_path):
    """One batch of 16 per round, computed in pieces: the blocks a keeping device runs below its edge are charged per piece,
    as the blocks above are, so before it holds anything it costs what a device that keeps nothing does."""
    one_batch = {"train.local_epochs": 0, "train.local_steps": 1, "train.batch_size": 16}
    _, kept_rows, _ = run(tmp_path, "kept", **{"devices.activation_cache": "true", **one_batch})
    _, rows, _ = run(tmp_path, "plain", **one_batch)
    pairs = list(zip(kept_rows[1]["devices"], rows[1]["devices"], strict=True))
    assert pairs and all(kept["compute_s"] == plain["compute_s"] and kept["read_s"] == 0 for kept, plain in pairs)


def test_a_resumed_run_charges_what_an_uninterrupted_one_does(tmp_path):
    """What each device holds is in the checkpoint: round 2 after a resume reads what round 1 stored."""
    _, whole, _ = run(tmp_path, "whole", **{"devices.activation_cache": "true"})
    run(tmp_path, "resumed", **{"devices.activation_cache": "true", "fl.rounds": 1})
    config = load_config(QUICKSTART, tiny_overrides(**EVERY_EXAMPLE_EACH_ROUND, **{"devices.activation_cache": "true"}))
    run_experiment(config, tmp_path / "resumed", resume=True)
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["devices"] for r in resumed] == [r["devices"] for r in whole]


def test_a_device_stores_what_fits_and_starts_over_when_the_edge_moves():
    lengths = np.array([10, 20, 30, 40])
    ledger = KeptActivations(hidden=4, lengths=lengths)  # an example takes length x 4 x 2 bytes
    room_gb = (10 + 20) * 4 * STATE_BYTES / 1e9  # rows 0 and 1 fit, then nothing
    first = ledger.round(0, [np.array([0, 1]), np.array([2, 3])], edge=2, storage_gb=room_gb)
    assert (first.computed, first.read_bytes, first.stored_bytes) == (Batches.of([(2, 20), (2, 40)]), 0, 240)
    later = ledger.round(0, [np.array([1, 2, 3])], edge=2, storage_gb=room_gb)
    assert (later.computed, later.read_bytes) == (Batches.of([(2, 40)]), 20 * 4 * STATE_BYTES)  # rows 2 and 3 found no room
    moved = ledger.round(0, [np.array([0, 1])], edge=3, storage_gb=room_gb)
    assert (moved.computed, moved.read_bytes) == (Batches.of([(2, 20)]), 0)
    assert ledger.round(0, [np.array([0])], edge=0, storage_gb=room_gb) is None  # nothing below the region: nothing to keep
    assert ledger.round(1, [np.array([0])], edge=2, storage_gb=0) is None  # no storage


def test_legend_plan_shows_kept_blocks_storage_and_a_cheaper_later_round():
    exp = build_experiment(load_config(QUICKSTART, tiny_overrides(**{"strategy.name": "legend", "devices.activation_cache": "true"})))
    rows = preview_plans(exp)
    assert rows and all(r["kept_blocks"] == 2 and r["storage_mb"] > 0 and r["later_compute_s"] < r["compute_s"] for r in rows)
    plain = build_experiment(load_config(QUICKSTART, tiny_overrides(**{"strategy.name": "fedit", "devices.activation_cache": "true"})))
    assert all(r["kept_blocks"] == 0 and "later_compute_s" not in r for r in preview_plans(plain))  # LoRA on every block: nothing to keep


@pytest.mark.parametrize("strategy", ["fedit", "ffa", "hetlora", "flexlora", "fedsa"])
def test_any_lora_strategy_can_train_the_top_blocks_only(strategy):
    config = load_config(QUICKSTART, tiny_overrides(**{"strategy.name": strategy, "lora.top_blocks": 2}))
    _, _, strategy_object = build_model(config, ("0", "1"))
    assert strategy_object.global_layout().rank_by_block == (0, 0, 0, 0, 8, 8)


def test_legend_takes_its_global_depth_from_top_blocks():
    _, _, legend = build_model(load_config(QUICKSTART, tiny_overrides(**{"strategy.name": "legend", "lora.top_blocks": 3})), ("0", "1"))
    assert legend.global_layout().depth == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"strategy.name": "fedit", "lora.top_blocks": 7}, "exceeds the model's 6 blocks"),
        ({"strategy.name": "bitfit", "lora.top_blocks": 2}, "leave lora.top_blocks at 0"),
        ({"strategy.name": "legend", "lora.top_blocks": 2, "legend.max_depth": 3}, "set one of them"),
    ],
)
def test_a_top_blocks_that_cannot_apply_is_one_clear_error(overrides, message):
    with pytest.raises(LegendError, match=message):
        build_model(load_config(QUICKSTART, tiny_overrides(**overrides)), ("0", "1"))


def test_a_device_cannot_keep_what_dropout_changes_on_every_pass():
    with pytest.raises(LegendError, match="set model.dropout=0 or devices.activation_cache=false"):
        build_experiment(load_config(QUICKSTART, tiny_overrides(**{"devices.activation_cache": "true", "model.dropout": 0.1})))


def test_a_node_keeps_its_activations_on_disk_for_its_next_process(tmp_path):
    """A Flower node starts a process per message: the states it stored are found (not recomputed) by the next, bit for bit,
    and never more than its storage holds."""
    config = load_config(QUICKSTART, tiny_overrides(**{"strategy.name": "legend"}))
    rows = np.arange(12)
    first = build_experiment(config)
    first.prefix.keep_on_disk(tmp_path / "node.prefix", limit_bytes=10**9)
    computed = first.prefix.hidden("train", first.train, rows, fixed_batches=False)
    first.prefix.save()
    second = build_experiment(config)
    second.prefix.keep_on_disk(tmp_path / "node.prefix", limit_bytes=10**9)
    assert torch.equal(second.prefix.hidden("train", second.train, rows, fixed_batches=False), computed)
    assert (second.prefix.hits, second.prefix.misses) == (12, 0)
    small = build_experiment(config)
    small.prefix.keep_on_disk(tmp_path / "small.prefix", limit_bytes=int(first.train.lengths[:3].sum()) * 384 * 2)
    small.prefix.hidden("train", small.train, rows, fixed_batches=False)
    assert len(small.prefix.spilled) == 3 and (tmp_path / "small.prefix").stat().st_size <= small.prefix.spill_limit


def test_a_flower_node_with_the_cache_trains_from_the_states_it_keeps(tmp_path):
    """The ClientApp's path: a job trained on a node keeps its examples' states in the node's file, and the next job's
    training reads them there (the engine's own rule would not: each example comes back less than 4 times)."""
    pytest.importorskip("flwr", reason="the Flower extra is not installed: pip install -e '.[flower]'")
    from legend.engine.client import derived_seed
    from legend.engine.runtime import Job, local_training
    from legend.flower.apps import _keep_activations

    config = load_config(QUICKSTART, tiny_overrides(**{"strategy.name": "legend", "devices.activation_cache": "true"}))
    exp = build_experiment(config)
    assert not exp.prefix.trains
    _keep_activations(exp, {"storage-gb": "1"}, tmp_path / "node.prefix", 0)
    _, view = device_view(exp, exp.local(), 1, [0])
    plan = exp.strategy.plan(1, [0], exp.strategy.initial_state(exp.model), view)[0]
    local_training(exp.local(), Job(1, plan, derived_seed(config.seed, 1, 0)))
    exp.prefix.save()
    assert exp.prefix.trains and exp.prefix.spill_limit == 10**9 and exp.prefix.misses > 0 and exp.prefix.spilled
    again = build_experiment(config)  # the node's next process
    _keep_activations(again, {}, tmp_path / "node.prefix", 0)
    assert again.prefix.spilled.keys() == exp.prefix.spilled.keys()
