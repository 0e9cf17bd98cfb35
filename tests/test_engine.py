"""End to end on the real MiniLM model and real SST-2 rows, kept tiny so CI stays fast."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tests.conftest import ROOT, tiny_overrides
from typer.testing import CliRunner

from legend.cli import app
from legend.config import Config, load_config
from legend.engine.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from legend.engine.simulation import build_experiment, run_experiment
from legend.errors import LegendError
from legend.records import MEASURED

QUICKSTART = ROOT / "configs" / "quickstart.toml"


def run_tiny(out, **extra):
    config = load_config(QUICKSTART, tiny_overrides(**extra))
    return run_experiment(config, out)


def without_measurements(summary):
    return {k: v for k, v in summary.items() if k not in MEASURED}


@pytest.mark.parametrize("strategy", ["fedit", "fedavg-full"])
def test_run_writes_metrics_summary_and_counts_bytes(tmp_path, strategy):
    summary = run_tiny(tmp_path, **{"strategy.name": strategy})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert {"round", "accuracy", "loss", "bytes_up", "bytes_down", "wall_s"} <= rows[1].keys()
    assert all(0 < row["forward_backward_s"] <= row["wall_s"] for row in rows)  # training and evaluation passes, within the round
    model_mb = sum(p.numel() * 4 for p in build_experiment(load_config(QUICKSTART, tiny_overrides())).model.params.values()) / 2**20
    assert all(row["peak_memory_mb"] > model_mb for row in rows)  # this process's peak holds at least the model's weights
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["peak_memory_mb"] == max(row["peak_memory_mb"] for row in rows)
    for key in (
        "strategy",
        "initial_accuracy",
        "initial_loss",
        "final_accuracy",
        "best_accuracy",
        "rounds",
        "bytes_up",
        "bytes_down",
        "wall_s",
        "time_to_target_s",
        "bytes_to_target",
    ):
        assert key in saved
    assert saved["strategy"] == strategy and saved["rounds"] == 2
    exp = build_experiment(load_config(QUICKSTART, tiny_overrides(**{"strategy.name": strategy})))
    per_client = sum(t.numel() * 4 for t in exp.strategy.initial_state(exp.model).values())  # float32 on the wire
    assert summary["bytes_down"] == summary["bytes_up"] == per_client * 2 * 2  # 2 clients x 2 rounds
    if strategy == "fedit":
        assert per_client == (6 * 2 * (8 * 384 + 384 * 8) + 2 * 384 + 2) * 4
    else:
        assert per_client == sum(p.numel() for p in exp.model.module.parameters()) * 4


def test_same_seed_same_result_and_other_seed_differs(tmp_path):
    first = run_tiny(tmp_path / "a")
    again = run_tiny(tmp_path / "b")
    other = run_tiny(tmp_path / "c", seed=1)
    assert without_measurements(first) == without_measurements(again)
    state_a = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=True)["global_state"]
    state_b = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)["global_state"]
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert without_measurements(first) != without_measurements(other)


def test_training_changes_the_global_adapter(tmp_path):
    run_tiny(tmp_path, **{"fl.rounds": 1})
    exp = build_experiment(load_config(QUICKSTART, tiny_overrides()))
    initial = exp.strategy.initial_state(exp.model)
    trained = torch.load(tmp_path / CHECKPOINT, weights_only=True)["global_state"]
    moved = [k for k in initial if not torch.equal(initial[k], trained[k])]
    assert len(moved) == len(initial)  # every LoRA factor and the head were trained and averaged


@pytest.mark.parametrize("strategy", ["fedit", "legend"])
def test_a_head_learning_rate_of_zero_keeps_the_head_and_trains_the_adapters(tmp_path, strategy):
    """train.head_lr_ratio=0 (FedBABU's frozen head): the head stays as initialised while the adapters move (a step of
    lr 3e-3 would move it by about 1e-3; LEGEND's weighted mean of equal heads rounds in the last bit)."""
    run_tiny(tmp_path, **{"fl.rounds": 1, "train.head_lr_ratio": 0, "strategy.name": strategy})
    exp = build_experiment(load_config(QUICKSTART, tiny_overrides(**{"strategy.name": strategy})))
    initial = exp.strategy.initial_state(exp.model)
    trained = torch.load(tmp_path / CHECKPOINT, weights_only=True)["global_state"]
    moved = {k for k in initial if not torch.allclose(initial[k], trained[k], rtol=0, atol=1e-6)}
    heads = {k for k in initial if exp.model.is_head(k)}
    assert heads and moved and not moved & heads
    if strategy == "fedit":  # every device trains every block
        assert moved == set(initial) - heads


def test_sigkill_then_resume_gives_the_uninterrupted_summary(tmp_path):
    overrides = tiny_overrides(**{"fl.rounds": 5})
    uninterrupted = run_experiment(load_config(QUICKSTART, overrides), tmp_path / "whole")
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "legend", "run", str(QUICKSTART), *overrides, "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:  # rounds 0..2 done
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "summary.json").exists()
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert without_measurements(summary) == without_measurements(uninterrupted)


def test_resume_refuses_another_config(tmp_path):
    run_tiny(tmp_path, **{"fl.rounds": 1})
    result = CliRunner().invoke(
        app, ["run", str(QUICKSTART), *tiny_overrides(**{"train.local_steps": 3}), "--out", str(tmp_path), "--resume"]
    )
    assert result.exit_code == 2
    assert "was run with a different config (train.local_steps)" in result.stderr


def test_a_checkpoint_predating_a_config_key_resumes_when_that_key_is_at_its_default(tmp_path):
    current = Config().model_dump()
    older = {**current, "legend": {k: v for k, v in current["legend"].items() if k != "scaling"}}  # written before legend.scaling existed
    save_checkpoint(tmp_path, {"config": older, "metrics": []})
    assert load_checkpoint(tmp_path, current)["metrics"] == []
    changed = Config.model_validate({"legend": {"scaling": "rank"}}).model_dump()
    with pytest.raises(LegendError, match=r"different config \(legend.scaling\)"):
        load_checkpoint(tmp_path, changed)


def test_a_validation_split_is_scored_beside_the_test_split_and_judges_the_target(tmp_path):
    summary = run_tiny(tmp_path / "held", **{"data.val_size": 100, "eval.target_accuracy": 0.0, "eval.every": 1, "fl.rounds": 3})
    rows = [json.loads(line) for line in (tmp_path / "held" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_accuracy"] is not None and r["accuracy"] is not None for r in rows)
    assert summary["target_split"] == "validation" and summary["final_val_accuracy"] == rows[-1]["val_accuracy"]
    assert summary["final_accuracy"] == rows[-1]["accuracy"]  # the test split, reported separately
    assert summary["round_to_target"] == 1
    plain = run_tiny(tmp_path / "plain", **{"eval.target_accuracy": 0.0, "fl.rounds": 1})
    assert plain["target_split"] == "test" and plain["final_val_accuracy"] is None
    from legend.records import summarize

    for target in sorted({r["val_accuracy"] for r in rows[1:]}):  # each reached first where validation (not test) first reaches it
        assert summarize("fedit", rows, target)["round_to_target"] == next(r["round"] for r in rows[1:] if r["val_accuracy"] >= target)


def test_logit_adjustment_adds_each_client_its_own_label_log_prior_in_local_training():
    """train.logit_adjustment=1 (balanced softmax): a client's offsets are the log of its add-one smoothed label
    frequencies, and local training reaches the loss through them: a client holding only positive sentences starts
    with the positive logit already ahead by log(41/1), so its training loss is a fraction of plain cross-entropy's."""
    from legend.engine.client import derived_seed
    from legend.engine.round import device_view
    from legend.engine.runtime import Job, local_training

    losses = {}
    for adjustment in (0, 1):
        config = load_config(QUICKSTART, tiny_overrides(**{"train.logit_adjustment": adjustment}))
        exp = build_experiment(config)
        exp.partitions[0] = np.flatnonzero(exp.train.labels == 1)[:40]
        plan = exp.strategy.plan(1, [0], exp.strategy.initial_state(exp.model), device_view(exp, exp.local(), 1, [0])[1])[0]
        losses[adjustment] = local_training(exp.local(), Job(1, plan, derived_seed(config.seed, 1, 0))).metrics["train_loss"]
    assert exp.objective.logit_offsets(exp.train, exp.partitions[0]).tolist() == pytest.approx(np.log([1 / 42, 41 / 42]).tolist())
    assert losses[1] < losses[0] / 4


def test_logit_adjustment_is_a_classification_setting():
    with pytest.raises(LegendError, match=r"train.logit_adjustment needs data.format='classification'"):
        load_config(ROOT / "configs" / "instruct-sst2.toml", ["train.logit_adjustment=1"])
