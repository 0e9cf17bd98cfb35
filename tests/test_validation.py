"""The server rejects unsound client updates, and a round without enough sound ones keeps the global model."""

import json

import pytest
import torch
from tests.conftest import ROOT, tiny_overrides

from legend.config import load_config
from legend.core import Update
from legend.engine.simulation import run_experiment
from legend.engine.validation import rejection

EXPECTED = {"a": ((2, 3), torch.float32), "head": ((2,), torch.float32)}
START = {"a": torch.zeros(2, 3), "head": torch.zeros(2)}


def update(**weights) -> Update:
    """A sound update moved by 1 in each of its 8 numbers (L2 norm sqrt(8) = 2.83 from START), then changed by ``weights``."""
    return Update(client=0, weights={"a": torch.ones(2, 3), "head": torch.ones(2), **weights}, num_samples=10)


@pytest.mark.parametrize(
    "weights, reason",
    [
        ({"a": torch.tensor([[1.0, float("nan"), 0], [0, 0, 0]])}, "NaN or Inf in a"),
        ({"head": torch.tensor([float("inf"), 0.0])}, "NaN or Inf in head"),
        ({"a": torch.ones(3, 2)}, "wrong shape for a: got (3, 2), expected (2, 3)"),
        ({"a": torch.ones(2, 3, dtype=torch.float64)}, "wrong dtype for a"),
        ({"extra": torch.ones(1)}, "wrong keys: missing [], unexpected ['extra']"),
    ],
)
def test_each_corruption_is_rejected_with_its_reason(weights, reason):
    assert reason in rejection(update(**weights), EXPECTED, START, max_norm=0.0)


def test_a_missing_tensor_is_rejected():
    assert "missing ['head']" in rejection(Update(0, {"a": torch.ones(2, 3)}, 10), EXPECTED, START, 0.0)


@pytest.mark.parametrize(
    "kept, reason",
    [
        ({"b": torch.tensor([[float("nan")], [0.0]])}, "NaN or Inf in b"),
        ({"b": torch.ones(1, 2)}, "wrong shape for b: got (1, 2), expected (2, 1)"),
        ({}, "wrong keys: missing ['b']"),
    ],
)
def test_the_tensors_a_device_keeps_are_checked_too(kept, reason):
    """FedSA-LoRA's B is stored by the embedded runtime and scored by the server: a corrupt one would spoil every later score."""
    expected_kept = {"b": ((2, 1), torch.float32)}
    assert rejection(Update(0, update().weights, 10, kept={"b": torch.ones(2, 1)}), EXPECTED, START, 0.0, expected_kept) is None
    assert reason in rejection(Update(0, update().weights, 10, kept=kept), EXPECTED, START, 0.0, expected_kept)


def test_the_norm_limit_counts_the_distance_from_the_start():
    assert rejection(update(), EXPECTED, START, max_norm=0.0) is None  # no limit
    assert rejection(update(), EXPECTED, START, max_norm=3.0) is None
    assert "update norm 2.828 exceeds fl.max_update_norm 2.5" in rejection(update(), EXPECTED, START, max_norm=2.5)
    assert rejection(update(), EXPECTED, {"a": torch.ones(2, 3), "head": torch.ones(2)}, max_norm=1e-9) is None  # it did not move


def run_tiny(tmp_path, **extra):
    summary = run_experiment(load_config(ROOT / "configs" / "quickstart.toml", tiny_overrides(**{"eval.every": 1, **extra})), tmp_path)
    return summary, [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_oversized_updates_are_rejected_and_the_rounds_keep_the_global_model(tmp_path):
    summary, rows = run_tiny(tmp_path, **{"fl.max_update_norm": 1e-6})  # any real training step moves further
    assert summary["rounds"] == 2 and summary["skipped_rounds"] == 2 and summary["rejected_updates"] == 4
    assert all(len(r["rejected"]) == 2 and "exceeds fl.max_update_norm" in r["rejected"][0]["reason"] for r in rows[1:])
    assert [r["accuracy"] for r in rows] == [rows[0]["accuracy"]] * 3 and [r["loss"] for r in rows] == [rows[0]["loss"]] * 3
    assert summary["bytes_up"] > 0  # the rejected updates were sent all the same


def test_min_clients_skips_a_round_with_too_few_updates_and_a_generous_limit_rejects_nothing(tmp_path):
    summary, rows = run_tiny(tmp_path / "strict", **{"fl.min_clients": 3})  # 2 clients per round
    assert summary["skipped_rounds"] == 2 and summary["rejected_updates"] == 0
    assert {r["loss"] for r in rows} == {rows[0]["loss"]}
    summary, rows = run_tiny(tmp_path / "loose", **{"fl.max_update_norm": 1e3})
    assert summary["skipped_rounds"] == 0 and summary["rejected_updates"] == 0 and rows[-1]["loss"] != rows[0]["loss"]
