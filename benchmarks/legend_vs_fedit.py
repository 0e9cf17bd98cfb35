"""LEGEND against FedIT (uniform LoRA on every block for every device): same config, split, fleet and seed.

Runs each strategy in turn (resumable: a killed run continues, a finished one is read back from its checkpoint) and prints a
table of time and bytes to the target accuracy, then one JSON line with the ratios:

    python benchmarks/legend_vs_fedit.py configs/quickstart.toml eval.every=2 --out runs/legend-vs-fedit-sst2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from legend.config import load_config
from legend.engine.simulation import run_resumable

STRATEGIES = ("fedit", "legend")
COLUMNS = (
    "final_accuracy",
    "best_accuracy",
    "round_to_target",
    "time_to_target_s",
    "bytes_to_target",
    "virtual_time_s",
    "bytes_up",
    "bytes_down",
    "wall_s",
)


def run(config_path: str, overrides: list[str], out: Path, strategy: str) -> dict:
    return run_resumable(load_config(config_path, [*overrides, f"strategy.name={strategy}"]), out / strategy)


def cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def ratio(numerator, denominator):
    return None if numerator is None or denominator in (None, 0) else numerator / denominator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for both runs, e.g. data.task=agnews")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    summaries = {s: run(args.config, args.overrides, args.out, s) for s in STRATEGIES}
    print(f"{'':24}" + "".join(f"{s:>16}" for s in STRATEGIES))
    for column in COLUMNS:
        print(f"{column:24}" + "".join(f"{cell(summaries[s][column]):>16}" for s in STRATEGIES))
    fedit, legend = summaries["fedit"], summaries["legend"]
    print(
        json.dumps(
            {
                "target_accuracy": legend["target_accuracy"],
                "speedup_time_to_target": ratio(fedit["time_to_target_s"], legend["time_to_target_s"]),
                "bytes_to_target_ratio": ratio(legend["bytes_to_target"], fedit["bytes_to_target"]),
                "bytes_per_round_ratio": ratio(
                    (legend["bytes_up"] + legend["bytes_down"]) / legend["rounds"],
                    (fedit["bytes_up"] + fedit["bytes_down"]) / fedit["rounds"],
                ),
                "virtual_time_per_round_ratio": ratio(
                    legend["virtual_time_s"] / legend["rounds"], fedit["virtual_time_s"] / fedit["rounds"]
                ),
                "final_accuracy": {s: summaries[s]["final_accuracy"] for s in STRATEGIES},
            }
        )
    )


if __name__ == "__main__":
    main()
