"""Per run: round, virtual seconds and MB to a validation target, the mean of the last three validation
evaluations (what `legend tune` scores), the last test accuracy and the virtual seconds and MB so far (the whole
run's, once finished; a run still going says how far it got, one not yet evaluated is named and skipped).

`legend report` averages over seeds and leaves a target out when one seed missed it; docs/experiments/'s per-seed
tables need each run on its own. With --budget-of RUN it also gives each run's validation score within that run's
whole virtual time (the comparison at equal virtual time); with --curves, each run's validation curve.

    python benchmarks/run_table.py --target 0.80 runs/sm-sst2-tuned-lf/runs/*-seed*
    python benchmarks/run_table.py --target 0.80 --budget-of runs/sm-sst2-tuned-all/runs/legend-seed0 runs/sm-sst2-tuned-all/runs/*
"""

from __future__ import annotations

import argparse
from pathlib import Path

from legend.records import read_metrics, summarize
from legend.report.tune import LAST_EVALUATIONS, validation_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--target", type=float, required=True)
    parser.add_argument("--budget-of", type=Path)
    parser.add_argument("--curves", action="store_true")
    args = parser.parse_args()
    budget = read_metrics(args.budget_of)[-1]["virtual_time_s"] if args.budget_of else None
    for run in args.runs:
        rows = read_metrics(run)
        evaluated = [r for r in rows if r.get("val_accuracy") is not None]
        if not evaluated or evaluated[-1]["round"] == 0:
            print(f"{run}: no evaluation after round 0 yet")
            continue
        run_summary = summarize(run.name, rows, args.target)  # the target rule `legend report` uses
        reached = (
            (
                f"round {run_summary['round_to_target']}, {run_summary['time_to_target_s']:.1f} s, "
                f"{run_summary['bytes_to_target'] / 1e6:.1f} MB"
            )
            if run_summary["round_to_target"] is not None
            else f"not reached (best {run_summary['best_val_accuracy']:.3f})"
        )
        line = (
            f"{run}: to {args.target} {reached} | validation, last {LAST_EVALUATIONS} {validation_score(rows):.3f} | "
            f"test at round {evaluated[-1]['round']} {run_summary['final_accuracy']:.3f} | "
            f"run to round {run_summary['rounds']} {run_summary['virtual_time_s']:.1f} s, "
            f"{(run_summary['bytes_up'] + run_summary['bytes_down']) / 1e6:.1f} MB"
        )
        if budget is not None:
            line += f" | validation within {budget:.1f} s {validation_score([r for r in rows if r['virtual_time_s'] <= budget]):.3f}"
        print(line)
        if args.curves:
            print("  validation by round: " + " ".join(f"{r['round']}:{r['val_accuracy']:.3f}" for r in evaluated))


if __name__ == "__main__":
    main()
