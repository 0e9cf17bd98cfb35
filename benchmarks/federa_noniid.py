"""FeDeRA against FedIT, FFA-LoRA, full fine-tuning and BitFit as the data grows more non-IID.

Every strategy runs on every task and Dirichlet alpha with the same config, split, fleet and seed
(each run resumable under OUT/<task>/alpha-<alpha>/<strategy>), then one Markdown table per task is
printed: final and best accuracy and virtual time to the task's target accuracy, per alpha and strategy.
`--target TASK=ACC` measures time to another target from the finished runs' metrics (nothing is rerun).

    python benchmarks/federa_noniid.py configs/quickstart.toml fl.rounds=20 eval.every=5 data.test_size=1000 --out runs/federa-noniid \
        --target sst2=0.75 agnews=0.80 qnli=0.60     # the tables in docs/experiments/2026-11-24-federa-label-skew.md
    python benchmarks/federa_noniid.py configs/quickstart.toml fl.rounds=2 data.train_size=400 --tasks sst2 --alphas 0.5 --out /tmp/smoke
"""

from __future__ import annotations

import argparse
from pathlib import Path

from legend.config import load_config
from legend.engine.simulation import run_resumable
from legend.records import read_metrics, summarize

STRATEGIES = ("federa", "fedit", "ffa", "fedavg-full", "bitfit")
ALPHAS = (0.1, 0.5, 1.0)
# Target accuracy per task (for time to target): what FedIT's quick-start settings reach on the task, rounded down.
TARGETS = {"sst2": 0.80, "agnews": 0.85, "qnli": 0.70}


def run_grid(
    config_path: str,
    overrides: list[str],
    out: Path,
    tasks: list[str],
    alphas: list[float],
    strategies: list[str],
    targets: dict[str, float],
) -> dict:
    """Each run's summary, its time to target measured against ``targets`` (from its rows, whatever target it ran with)."""
    results = {}
    for task in tasks:
        for alpha in alphas:
            for strategy in strategies:
                settings = [
                    *overrides,
                    f"data.task={task}",
                    f"data.alpha={alpha}",
                    f"strategy.name={strategy}",
                    f"eval.target_accuracy={TARGETS[task]}",
                ]
                run_dir = out / task / f"alpha-{alpha}" / strategy
                run_resumable(load_config(config_path, settings), run_dir)
                results[task, alpha, strategy] = summarize(strategy, read_metrics(run_dir), targets[task])
    return results


def cell(summary: dict) -> str:
    time = summary["time_to_target_s"]
    return f"{summary['final_accuracy']:.3f} / {summary['best_accuracy']:.3f} / {'never' if time is None else f'{time:.0f} s'}"


def markdown(results: dict, tasks: list[str], alphas: list[float], strategies: list[str], targets: dict[str, float]) -> str:
    lines = []
    for task in tasks:
        lines += [
            f"### {task} (target accuracy {targets[task]}): final accuracy / best accuracy / virtual time to target",
            "",
            "| Dirichlet alpha | " + " | ".join(f"`{s}`" for s in strategies) + " |",
            "|---" * (len(strategies) + 1) + "|",
        ]
        lines += [f"| {alpha} | " + " | ".join(cell(results[task, alpha, s]) for s in strategies) + " |" for alpha in alphas]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. fl.rounds=20")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tasks", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--alphas", nargs="+", type=float, default=list(ALPHAS))
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=list(STRATEGIES),
        choices=list(STRATEGIES),
        help="a subset (two processes with disjoint subsets share the work on two cores)",
    )
    parser.add_argument(
        "--target", nargs="*", default=[], metavar="TASK=ACC", help="time to this accuracy in the table instead of the task's default"
    )
    args = parser.parse_args()
    targets = dict(TARGETS)
    for given in args.target:
        task, _, accuracy = given.partition("=")
        if task not in TARGETS or not accuracy.replace(".", "", 1).isdigit():
            parser.error(f"--target {given}: write TASK=ACCURACY with TASK one of {', '.join(TARGETS)}, e.g. sst2=0.75")
        targets[task] = float(accuracy)
    results = run_grid(args.config, args.overrides, args.out, args.tasks, args.alphas, args.strategies, targets)
    print(markdown(results, args.tasks, args.alphas, args.strategies, targets))


if __name__ == "__main__":
    main()
