"""Per-round metrics (metrics.jsonl) and the run summary (summary.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from legend.core import atomic_write

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def write_metrics(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write(out_dir / METRICS_FILE, "".join(json.dumps(row) + "\n" for row in rows).encode())


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out_dir / METRICS_FILE).read_text().splitlines() if line]


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write(out_dir / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())


def summarize(strategy: str, rows: list[dict[str, Any]], target_accuracy: float) -> dict[str, Any]:
    """Row 0 is the evaluation before training; later rows are rounds."""
    evaluated = [r for r in rows if r["accuracy"] is not None]
    reached = next((r for r in evaluated if r["round"] > 0 and r["accuracy"] >= target_accuracy), None)
    rounds = [r for r in rows if r["round"] > 0]
    return {
        "strategy": strategy,
        "initial_accuracy": rows[0]["accuracy"],
        "initial_loss": rows[0]["loss"],
        "final_accuracy": evaluated[-1]["accuracy"],
        "final_loss": evaluated[-1]["loss"],
        "best_accuracy": max(r["accuracy"] for r in evaluated),
        "rounds": len(rounds),
        "bytes_up": sum(r["bytes_up"] for r in rounds),
        "bytes_down": sum(r["bytes_down"] for r in rounds),
        "virtual_time_s": rows[-1]["virtual_time_s"],
        "dropped_updates": sum(len(r["dropped"]) for r in rounds),
        "rejected_updates": sum(len(r.get("rejected", [])) for r in rounds),
        "lost_updates": sum(len(r.get("lost", [])) for r in rounds),
        "skipped_rounds": sum(bool(r.get("skipped")) for r in rounds),
        "wall_s": round(sum(r["wall_s"] for r in rows), 3),
        "target_accuracy": target_accuracy,
        "round_to_target": reached["round"] if reached else None,
        "time_to_target_s": reached["virtual_time_s"] if reached else None,
        "bytes_to_target": sum(r["bytes_up"] + r["bytes_down"] for r in rounds if r["round"] <= reached["round"]) if reached else None,
    }
