"""Poisoned devices against the aggregators: final accuracy of the mean, trimmed mean and median, clean and under attack.

Every cell runs the same config, split, fleet and seed (each run resumable under OUT/<attack>/<aggregator>);
the attackers are drawn per (seed, round, client) with probability --malicious. Prints one Markdown
table: final / best accuracy per attack (rows) and aggregator (columns), and each one's distance from
the clean run with the same aggregator.

    python benchmarks/robust_aggregation.py configs/quickstart.toml engine.threads=1 --out runs/robust   # docs/reliability.md
    python benchmarks/robust_aggregation.py configs/quickstart.toml fl.rounds=2 data.train_size=400 data.test_size=64 --out /tmp/smoke
"""

from __future__ import annotations

import argparse
from pathlib import Path

from legend.config import load_config
from legend.engine.simulation import run_resumable

AGGREGATORS = ("mean", "trimmed_mean", "median")
ATTACKS = ("none", "sign_flip", "scale", "label_flip")


def run_grid(config_path: str, overrides: list[str], out: Path, attacks: list[str], aggregators: list[str], malicious: float) -> dict:
    results = {}
    for attack in attacks:
        for aggregator in aggregators:
            faults = [] if attack == "none" else [f"faults.malicious={malicious}", f"faults.attack={attack}"]
            config = load_config(config_path, [*overrides, f"fl.aggregator={aggregator}", *faults])
            results[attack, aggregator] = run_resumable(config, out / attack / aggregator)
    return results


def markdown(results: dict, attacks: list[str], aggregators: list[str], malicious: float) -> str:
    lines = [
        f"final / best accuracy ({malicious:.0%} attackers per round; in brackets: final accuracy minus the clean run's "
        "with that aggregator)",
        "",
        "| attack | " + " | ".join(f"`{a}`" for a in aggregators) + " |",
        "|---" * (len(aggregators) + 1) + "|",
    ]
    for attack in attacks:
        cells = []
        for aggregator in aggregators:
            summary = results[attack, aggregator]
            clean = results.get(("none", aggregator))
            gap = f" ({summary['final_accuracy'] - clean['final_accuracy']:+.3f})" if clean and attack != "none" else ""
            cells.append(f"{summary['final_accuracy']:.3f} / {summary['best_accuracy']:.3f}{gap}")
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. fl.rounds=20")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated: none, sign_flip, scale, label_flip")
    parser.add_argument("--aggregators", default=",".join(AGGREGATORS), help="comma-separated: mean, trimmed_mean, median")
    parser.add_argument("--malicious", type=float, default=0.2, help="probability that a sampled device attacks in a round")
    args = parser.parse_args()
    attacks, aggregators = args.attacks.split(","), args.aggregators.split(",")
    print(
        markdown(
            run_grid(args.config, args.overrides, args.out, attacks, aggregators, args.malicious), attacks, aggregators, args.malicious
        )
    )


if __name__ == "__main__":
    main()
