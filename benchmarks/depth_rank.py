"""The coupled depth and rank study: what a LoRA rank in block l is worth, measured.

Trains a grid of global layouts (depth counted from the output x rank distribution: uniform, increasing or decreasing
toward the output, at several totals of rank units) with LEGEND's `global` planner, so every device trains the whole
layout. `--setting central` (default) trains one client holding the task's training data (IID) for a fixed number of
steps; `--setting federated` runs the config's own federated setting (e.g. the paper config's 80 label-skewed clients)
for its rounds. Each layout's run is resumable. It prints, per layout, the validation accuracy after the budget, the
bytes each device sends per round (equal totals send equal bytes) and the compute per round (the cost model's virtual
seconds on one device class), then fits LEGEND's worth model to the accuracies:

    accuracy ~ a + b * sum_l gamma^(N-1-l) (1 - exp(-r_l / rho))

over a grid of gamma (how much a block is worth against the block above it) and rho (the rank at which a block's worth
saturates), printing the best fit and its R^2. docs/legend.md has the table of a run of:

    python benchmarks/depth_rank.py configs/paper-sst2.toml engine.threads=1 --out runs/depth-rank
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import numpy as np

from legend.config import load_config
from legend.engine.simulation import run_resumable
from legend.models.shared import SharedModel

SHAPES = ("uniform", "increasing", "decreasing")
CENTRAL = {
    "fl.num_clients": 1,
    "fl.clients_per_round": 1,
    "data.partition": "iid",
    "fl.rounds": 6,
    "train.local_steps": 25,
    "train.batch_size": 32,
    "eval.every": 6,
    "devices.fleet": "jetson-mix-80",
}


def layout(num_blocks: int, depth: int, total: int, shape: str) -> tuple[int, ...]:
    """Ranks per block (input first): ``total`` rank units over the top ``depth`` blocks, each at least 1."""
    weights = np.arange(1, depth + 1, dtype=float) if shape != "uniform" else np.ones(depth)
    if shape == "decreasing":
        weights = weights[::-1]
    ranks = np.maximum(1, np.round(total * weights / weights.sum())).astype(int)
    return (0,) * (num_blocks - depth) + tuple(int(r) for r in ranks)


def grid(num_blocks: int, depths: list[int], totals: list[int]) -> list[tuple[int, ...]]:
    layouts = []
    for total, depth, shape in itertools.product(totals, depths, SHAPES):
        ranks = layout(num_blocks, depth, total, shape)
        if depth <= num_blocks and ranks not in layouts:
            layouts.append(ranks)
    return layouts


def worth(ranks: tuple[int, ...], gamma: float, rho: float) -> float:
    top = len(ranks) - 1
    return sum(gamma ** (top - block) * (1 - math.exp(-r / rho)) for block, r in enumerate(ranks))


def fit(rows: list[dict]) -> dict:
    """The (gamma, rho) whose worth explains the accuracies best by least squares, with a and b and R^2."""
    accuracy = np.array([row["accuracy"] for row in rows])
    best = {"r2": -math.inf}
    for gamma, rho in itertools.product((0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), (0.5, 1, 2, 4, 8, 16)):
        x = np.array([worth(tuple(row["rank_by_block"]), gamma, rho) for row in rows])
        design = np.stack([np.ones_like(x), x], axis=1)
        (a, b), *_ = np.linalg.lstsq(design, accuracy, rcond=None)
        residual = accuracy - design @ np.array([a, b])
        r2 = 1 - residual.var() / max(accuracy.var(), 1e-12)
        if r2 > best["r2"]:
            best = {"gamma": gamma, "rho": rho, "a": float(a), "b": float(b), "r2": float(r2)}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. engine.threads=1")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--setting", choices=("central", "federated"), default="central")
    parser.add_argument("--depths", default="1,2,4,6", help="LoRA depths counted from the output")
    parser.add_argument("--totals", default="12,48", help="rank units over the layout's blocks")
    args = parser.parse_args()
    base = load_config(args.config, args.overrides)
    num_blocks = SharedModel.build(base.model.name, 2, causal_lm=base.data.format == "instruct").info.num_blocks
    per_round = base.fl.clients_per_round if args.setting == "federated" else 1
    setting = CENTRAL if args.setting == "central" else {}
    rows = []
    for ranks in grid(num_blocks, [int(d) for d in args.depths.split(",")], [int(t) for t in args.totals.split(",")]):
        name = "-".join(map(str, ranks))
        overrides = [
            *args.overrides,
            *(f"{k}={v}" for k, v in setting.items()),
            "strategy.name=legend",
            "legend.planner=global",
            f"legend.rank_by_block=[{','.join(map(str, ranks))}]",
        ]
        summary = run_resumable(load_config(args.config, overrides), args.out / name)
        rounds = summary["rounds"]
        row = {
            "rank_by_block": list(ranks),
            "depth": sum(r > 0 for r in ranks),
            "total": sum(ranks),
            "accuracy": summary["final_val_accuracy"] if summary.get("final_val_accuracy") is not None else summary["final_accuracy"],
            "test_accuracy": summary["final_accuracy"],
            "mb_up_per_round": summary["bytes_up"] / rounds / per_round / 1e6,
            "virtual_s_per_round": summary["virtual_time_s"] / rounds,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| ranks per block (input first) | depth | rank units | validation accuracy | MB up per device-round | virtual s per round |")
    print("|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r["total"], r["depth"])):
        print(
            f"| {' '.join(map(str, row['rank_by_block']))} | {row['depth']} | {row['total']} | {row['accuracy']:.3f} | "
            f"{row['mb_up_per_round']:.3f} | {row['virtual_s_per_round']:.3f} |"
        )
    print(json.dumps({"fit": fit(rows)}))


if __name__ == "__main__":
    main()
