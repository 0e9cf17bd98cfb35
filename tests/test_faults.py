"""Devices that fail: simulated drop-outs and crashes, devices that send corrupt updates, and a process
killed while it writes its checkpoint. None may corrupt the global model or lose finished rounds."""

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from tests.conftest import ROOT, tiny_overrides

from legend.config import load_config
from legend.engine.checkpoint import CHECKPOINT
from legend.engine.runtime import InProcess
from legend.engine.simulation import run_experiment
from legend.records import MEASURED

QUICKSTART = ROOT / "configs" / "quickstart.toml"
FOUR_PER_ROUND = {"fl.clients_per_round": 4, "fl.rounds": 3, "eval.every": 1}


def run(out, runtime=None, **extra):
    config = load_config(QUICKSTART, tiny_overrides(**{**FOUR_PER_ROUND, **extra}))
    summary = run_experiment(config, out, runtime=runtime or InProcess(config.faults))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows, torch.load(out / CHECKPOINT, weights_only=True)["global_state"]


def finite(state):
    return all(torch.isfinite(t).all() for t in state.values())


def test_thirty_percent_dropout_still_trains_and_is_counted(tmp_path):
    summary, rows, state = run(tmp_path / "a", **{"faults.dropout": 0.3})
    lost = [entry for row in rows for entry in row["lost"]]
    assert summary["lost_updates"] == len(lost) > 0 and all("dropped out" in e["reason"] for e in lost)
    assert summary["rounds"] == 3 and finite(state) and rows[-1]["loss"] != rows[0]["loss"]
    again, _, _ = run(tmp_path / "b", **{"faults.dropout": 0.3})
    assert again["lost_updates"] == summary["lost_updates"] and again["final_loss"] == summary["final_loss"]  # drawn from the seed


def test_crashes_inside_local_training_lose_those_updates_only(tmp_path):
    summary, rows, state = run(tmp_path, **{"faults.crash": 0.5})
    crashed = [entry for row in rows for entry in row["lost"]]
    assert crashed and all("crashed in local training: simulated crash at local step" in e["reason"] for e in crashed)
    assert summary["lost_updates"] == len(crashed) and summary["rounds"] == 3 and finite(state)
    assert all(len(row["devices"]) == 4 - len(row["lost"]) for row in rows[1:])


class Corrupting(InProcess):
    """Client 0's device sends back what ``corrupt`` makes of its update."""

    def __init__(self, faults, corrupt):
        super().__init__(faults)
        self.corrupt = corrupt

    def train(self, local, jobs):
        updates = super().train(local, jobs)
        if 0 in updates:
            updates[0] = replace(updates[0], weights=self.corrupt(updates[0].weights))
        return updates


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (lambda w: {k: torch.full_like(t, float("nan")) for k, t in w.items()}, "NaN or Inf"),
        (lambda w: {k: t[..., :1] if t.dim() == 2 else t for k, t in w.items()}, "wrong shape"),
        (lambda w: {k: t * 1e6 for k, t in w.items()}, "exceeds fl.max_update_norm"),
    ],
)
def test_a_corrupt_update_is_rejected_and_the_global_model_stays_finite(tmp_path, corrupt, reason):
    config = load_config(QUICKSTART, tiny_overrides(**FOUR_PER_ROUND, **{"fl.max_update_norm": 100.0}))
    summary, rows, state = run(tmp_path, Corrupting(config.faults, corrupt), **{"fl.max_update_norm": 100.0})
    rejected = [entry for row in rows for entry in row["rejected"]]
    assert rejected and {e["client"] for e in rejected} == {0} and all(reason in e["reason"] for e in rejected)
    assert summary["rounds"] == 3 and finite(state) and all(row["loss"] is not None and row["loss"] == row["loss"] for row in rows)


KILL_IN_THIRD_CHECKPOINT_WRITE = """
import os, signal, sys
import legend.core as core
writes = 0
real_fsync = os.fsync
def fsync(fd):  # the temp file of the third checkpoint (after round 2) is written, not yet synced or renamed
    global writes
    if os.readlink(f"/proc/self/fd/{fd}").endswith(".checkpoint.pt.tmp"):
        writes += 1
        if writes == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    real_fsync(fd)
core.os.fsync = fsync
from legend.cli import main
sys.argv = ["legend", *sys.argv[1:]]
main()
"""


def test_sigkill_during_a_checkpoint_write_then_resume_gives_the_uninterrupted_summary(tmp_path):
    overrides = tiny_overrides(**{"fl.rounds": 3})
    uninterrupted = run_experiment(load_config(QUICKSTART, overrides), tmp_path / "whole")
    out = tmp_path / "killed"
    args = ["run", str(QUICKSTART), *overrides, "--out", str(out)]
    killed = subprocess.run([sys.executable, "-c", KILL_IN_THIRD_CHECKPOINT_WRITE, *args], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / f".{CHECKPOINT}.tmp").is_file() and not (out / "summary.json").exists()
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]  # round 2 was in flight
    resumed = subprocess.run([sys.executable, "-m", "legend", *args, "--resume"], capture_output=True, text=True, env={**os.environ})
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if k not in MEASURED} == {k: v for k, v in uninterrupted.items() if k not in MEASURED}


def test_a_truncated_checkpoint_is_refused_in_one_line(tmp_path):
    run_experiment(load_config(QUICKSTART, tiny_overrides(**{"fl.rounds": 1})), tmp_path)
    data = (tmp_path / CHECKPOINT).read_bytes()
    (tmp_path / CHECKPOINT).write_bytes(data[: len(data) // 2])
    result = subprocess.run(
        [sys.executable, "-m", "legend", "run", str(QUICKSTART), *tiny_overrides(**{"fl.rounds": 1}), "--out", str(tmp_path), "--resume"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "is unreadable" in result.stderr and "delete it to start over" in result.stderr
