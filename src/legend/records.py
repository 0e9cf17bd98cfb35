"""What a run folder holds, as plain data: one record per round (metrics.jsonl) and the run's summary (summary.json).

A leaf: the round loop writes these files (``engine/simulation.py``), reports and benchmarks read them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class RoundRecord:
    """One line of metrics.jsonl: round 0 is the evaluation before training.

    Bytes up count every update that arrived (rejected ones too: they were sent); bytes down every
    device that was sent a plan. ``devices``: each participant's times and bytes (``RoundTime.as_row``)
    with its ranks and memory; ``wall_s`` and ``forward_backward_s`` are this machine's seconds.
    """

    round: int
    clients: list[int] = field(default_factory=list)
    accuracy: float | None = None  # on the test split
    loss: float | None = None
    val_accuracy: float | None = None  # on the validation split (data.val_size), where there is one
    val_loss: float | None = None
    train_loss: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    round_time_s: float = 0.0
    virtual_time_s: float = 0.0
    dropped: list[int] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    lost: list[dict[str, Any]] = field(default_factory=list)
    unreachable: list[int] = field(
        default_factory=list
    )  # devices online by the fleet that the runtime could not reach (Flower: no live node)
    malicious: list[int] = field(default_factory=list)  # devices that sent a poisoned update (simulated: faults.malicious)
    skipped: bool = False
    withheld: list[dict[str, Any]] = field(default_factory=list)  # coverage guard: devices whose plan it cut (strategies/coverage.py)
    secure_aggregation: dict[str, Any] | None = None  # on Flower with flower.secure_aggregation: the protocol's measured bytes and seconds
    wall_s: float = 0.0
    forward_backward_s: float = 0.0
    peak_memory_mb: float = 0.0  # measured: the largest peak of the processes that trained or evaluated (placement.peak_memory_mb)

    def row(self) -> dict[str, Any]:
        """The record as its JSON line (and as the checkpoint keeps it)."""
        return asdict(self)


MEASURED = ("wall_s", "forward_backward_s", "peak_memory_mb")  # this machine's seconds and memory: they differ between runs of one config


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out_dir / METRICS_FILE).read_text().splitlines() if line]


def target_key(rows: list[dict[str, Any]]) -> str:
    """The metrics key the target is judged on: validation accuracy where the run held a split out (data.val_size), else test."""
    return "val_accuracy" if any(r.get("val_accuracy") is not None for r in rows) else "accuracy"


def _evaluations(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The rounds after training began that were evaluated (a round without evaluation has ``key`` null)."""
    return [r for r in rows if r["round"] > 0 and r.get(key) is not None]


def first_crossing(rows: list[dict[str, Any]], key: str, target: float) -> dict[str, Any] | None:
    """The first evaluation at or above ``target``, even one the next evaluation falls back from."""
    return next((r for r in _evaluations(rows, key) if r[key] >= target), None)


def held_crossing(rows: list[dict[str, Any]], key: str, target: float) -> dict[str, Any] | None:
    """The first evaluation i with acc_i >= target and, where it is not the run's last evaluation, acc_(i+1) >= target.

    Under label skew accuracy swings a few points between evaluations, so one evaluation that spikes above the target
    and falls back is noise, not the target reached; a run that ends on an evaluation at or above it has reached it."""
    evaluations = _evaluations(rows, key)
    following = [*evaluations[1:], None]
    held = (r for r, after in zip(evaluations, following, strict=True) if r[key] >= target and (after is None or after[key] >= target))
    return next(held, None)


def target_held(rows: list[dict[str, Any]], target: float) -> bool:
    """Whether the last two evaluations are both at or above ``target``: a held crossing, confirmed (eval.stop_at_target)."""
    key = target_key(rows)
    evaluations = _evaluations(rows, key)
    return len(evaluations) >= 2 and min(r[key] for r in evaluations[-2:]) >= target


def bytes_through(rows: list[dict[str, Any]], round_number: int) -> int:
    """Bytes up and down sent in rounds 1 to ``round_number``."""
    return sum(r["bytes_up"] + r["bytes_down"] for r in rows if 0 < r["round"] <= round_number)


def accuracy_within(rows: list[dict[str, Any]], key: str, seconds: float | None = None, sent: int | None = None) -> float:
    """``key`` at the last evaluation at or before ``seconds`` of virtual time and ``sent`` bytes (up and down; None: no bound).

    Round 0, the evaluation before training (0 s, 0 bytes), is within any budget."""
    within, total = rows[0].get(key), 0
    for r in rows[1:]:
        total += r["bytes_up"] + r["bytes_down"]
        if (seconds is not None and r["virtual_time_s"] > seconds) or (sent is not None and total > sent):
            break
        if r.get(key) is not None:
            within = r[key]
    return within


def summarize(strategy: str, rows: list[dict[str, Any]], target_accuracy: float) -> dict[str, Any]:
    """Row 0 is the evaluation before training; later rows are rounds. With a validation split, the target is
    judged on validation accuracy (``target_split``); ``*_accuracy`` are on the test split either way. ``*_to_target``:
    the first crossing (``first_crossing``); ``*_to_target_held``: the crossing the next evaluation holds (``held_crossing``)."""
    evaluated = [r for r in rows if r["accuracy"] is not None]
    validated = [r["val_accuracy"] for r in evaluated if r.get("val_accuracy") is not None]
    judged = target_key(rows)
    reached, held = first_crossing(rows, judged, target_accuracy), held_crossing(rows, judged, target_accuracy)
    rounds = [r for r in rows if r["round"] > 0]
    return {
        "strategy": strategy,
        "initial_accuracy": rows[0]["accuracy"],
        "initial_loss": rows[0]["loss"],
        "final_accuracy": evaluated[-1]["accuracy"],
        "final_loss": evaluated[-1]["loss"],
        "final_perplexity": math.exp(evaluated[-1]["loss"])
        if evaluated[-1]["loss"] is not None
        else None,  # of the answer tokens (instruct)
        "best_accuracy": max(r["accuracy"] for r in evaluated),
        "rounds": len(rounds),
        "bytes_up": sum(r["bytes_up"] for r in rounds),
        "bytes_down": sum(r["bytes_down"] for r in rounds),
        "virtual_time_s": rows[-1]["virtual_time_s"],
        "dropped_updates": sum(len(r["dropped"]) for r in rounds),
        "rejected_updates": sum(len(r.get("rejected", [])) for r in rounds),
        "lost_updates": sum(len(r.get("lost", [])) for r in rounds),
        "malicious_updates": sum(len(r.get("malicious", [])) for r in rounds),
        "skipped_rounds": sum(bool(r.get("skipped")) for r in rounds),
        "wall_s": round(sum(r["wall_s"] for r in rows), 3),
        "peak_memory_mb": max(r.get("peak_memory_mb", 0.0) for r in rows),
        "final_val_accuracy": validated[-1] if validated else None,
        "best_val_accuracy": max(validated) if validated else None,
        "target_accuracy": target_accuracy,
        "target_split": "validation" if validated else "test",
        "round_to_target": reached["round"] if reached else None,
        "time_to_target_s": reached["virtual_time_s"] if reached else None,
        "bytes_to_target": bytes_through(rows, reached["round"]) if reached else None,
        "round_to_target_held": held["round"] if held else None,
        "time_to_target_held_s": held["virtual_time_s"] if held else None,
        "bytes_to_target_held": bytes_through(rows, held["round"]) if held else None,
    }
