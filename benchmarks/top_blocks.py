"""The observation LEGEND starts from: LoRA with higher ranks on the top blocks only, against uniform LoRA on
every block, at the same parameter count (the sum of ranks over blocks).

Every variant trains the same layout on every device (LEGEND's planner with unlimited slack gives each
device the whole global layout, and LEGEND's masked average is then FedIT's plain average), so only the
placement of the ranks differs. Each run is resumable under OUT/<variant>; prints one Markdown table:

    python benchmarks/top_blocks.py configs/paper-sst2.toml engine.threads=1 --out runs/top-blocks
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from legend.config import load_config
from legend.engine.simulation import run_resumable
from legend.records import read_metrics


def top_only(depth: int, rank: int) -> list[str]:
    return [
        "strategy.name=legend",
        f"legend.max_depth={depth}",
        "legend.ranks=uniform",
        f"legend.r_min={rank}",
        f"legend.r_max={rank}",
        "legend.slack=1e6",
    ]


VARIANTS = {  # MiniLM-L6: 6 blocks x rank 8 = 3 x 16 = 2 x 24 = 48 rank-blocks, the same adapter size
    "all 6 blocks, r=8 (FedIT)": ["strategy.name=fedit", "lora.r=8"],
    "top 3 blocks, r=16": top_only(3, 16),
    "top 2 blocks, r=24": top_only(2, 24),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. engine.threads=1")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(
        "| layout | final accuracy | best accuracy | rounds to target | device compute s per round (mean) | peak device memory GB | "
        "MB per round (up + down) | time to target s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, overrides in VARIANTS.items():
        out = args.out / name.split(",")[0].replace(" ", "-")
        summary = run_resumable(load_config(args.config, [*args.overrides, *overrides]), out)
        rounds = [row for row in read_metrics(out) if row["round"] > 0]
        compute = statistics.fmean(d["compute_s"] for row in rounds for d in row["devices"])
        memory = max(d["memory_gb"] for row in rounds for d in row["devices"])
        megabytes = (summary["bytes_up"] + summary["bytes_down"]) / summary["rounds"] / 1e6
        time_to = summary["time_to_target_s"]
        print(
            f"| {name} | {summary['final_accuracy']:.3f} | {summary['best_accuracy']:.3f} | {summary['round_to_target'] or 'never'} | "
            f"{compute:.3f} | {memory:.3f} | {megabytes:.2f} | {'never' if time_to is None else f'{time_to:.1f}'} |"
        )


if __name__ == "__main__":
    main()
