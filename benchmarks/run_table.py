"""Per run: round, virtual seconds and MB to a validation target, the mean of the last three validation
evaluations (what `legend tune` scores), the test accuracy, virtual seconds and MB at its last evaluation (the
whole run's, once finished; a run still going says how far it got, one not yet evaluated is named and skipped).

`legend report` averages over seeds and leaves a target out when one seed missed it; docs/results.md's per-seed
tables need each run on its own. With --budget-of RUN it also gives each run's validation score within that run's
whole virtual time (the comparison at equal virtual time); with --curves, each run's validation curve.

    python benchmarks/run_table.py --target 0.80 runs/sm-sst2-tuned-lf/runs/*-seed*
    python benchmarks/run_table.py --target 0.80 --budget-of runs/sm-sst2-tuned-all/runs/legend-seed0 runs/sm-sst2-tuned-all/runs/*
"""

from __future__ import annotations

import argparse
from pathlib import Path

from legend.records import read_metrics
from legend.report.tune import LAST_EVALUATIONS, validation_score


def evaluations(run: Path) -> list[dict]:
    """Every evaluated round with its cumulative MB (up and down)."""
    sent, rows = 0, []
    for row in read_metrics(run):
        sent += row["bytes_up"] + row["bytes_down"]
        if row.get("val_accuracy") is not None:
            rows.append({**row, "mb": sent / 1e6})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--target", type=float, required=True)
    parser.add_argument("--budget-of", type=Path)
    parser.add_argument("--curves", action="store_true")
    args = parser.parse_args()
    budget = read_metrics(args.budget_of)[-1]["virtual_time_s"] if args.budget_of else None
    for run in args.runs:
        rows = evaluations(run)
        if not any(r["round"] > 0 for r in rows):
            print(f"{run}: no evaluation after round 0 yet")
            continue
        hit = next((r for r in rows if r["val_accuracy"] >= args.target), None)
        reached = f"round {hit['round']}, {hit['virtual_time_s']:.1f} s, {hit['mb']:.1f} MB" if hit else \
            f"not reached (best {max(r['val_accuracy'] for r in rows):.3f})"
        line = (f"{run}: to {args.target} {reached} | validation, last {LAST_EVALUATIONS} {validation_score(rows):.3f} | "
                f"test at round {rows[-1]['round']} {rows[-1]['accuracy']:.3f} | "
                f"run to round {rows[-1]['round']} {rows[-1]['virtual_time_s']:.1f} s, {rows[-1]['mb']:.1f} MB")
        if budget is not None:
            line += f" | validation within {budget:.1f} s {validation_score([r for r in rows if r['virtual_time_s'] <= budget]):.3f}"
        print(line)
        if args.curves:
            print("  validation by round: " + " ".join(f"{r['round']}:{r['val_accuracy']:.3f}" for r in rows))


if __name__ == "__main__":
    main()
