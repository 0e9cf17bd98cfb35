"""A whole run's virtual clock and bytes with and without devices that keep their activations, without training.

The clock does not depend on what the model learns: each round's clients, batches and bytes follow from the seed and
the plans, and a planner's capacity estimates from the virtual clock's own reports. So a runtime whose devices send
back the tensors they were sent, untrained, gives every round's virtual time and bytes of the real run (``--check
FOLDER=RUN_DIR`` compares OUT/FOLDER with a real run's metrics.jsonl, round by round). Accuracy, and so time to target, needs the
real run. Evaluation is cut to 8 test sentences at the end. Prints one Markdown table:

    python benchmarks/kept_activations_clock.py configs/paper-sst2.toml model.name=smollm2-135m engine.threads=1 \\
        --strategies legend,fedit,fedit:lora.top_blocks=20 --out runs/kept-clock-smollm2

With ``--trained ENTRY=RUN_DIR`` (a real run of that entry, e.g. ``fedit:lora.top_blocks=20=runs/x/runs/fedit-seed0``) the
table adds the round at which the real run reached ``eval.target_accuracy`` and each clock's time and bytes to it: time to
target with the cache on and off from one trained run, since the cache never changes what is learned.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from legend.config import load_config
from legend.core import Update
from legend.engine.runtime import InProcess, Job
from legend.engine.simulation import run_experiment
from legend.quiet import quiet_libraries
from legend.records import read_metrics, summarize


class Untrained(InProcess):
    """Devices that return what they were sent (cut to their layout): the same shapes, bytes and reports, no training."""

    def train(self, local, jobs: list[Job]) -> dict[int, Update]:
        out = {}
        for job in jobs:
            plan = job.plan
            shapes = local.model.device_shapes(plan.layout)
            keep = local.device.kept(local.model.keys(plan.layout))
            weights = {
                key: plan.weights[key][tuple(slice(0, n) for n in shape)].clone() for key, shape in shapes.items() if key not in keep
            }
            out[plan.client] = Update(plan.client, weights, len(local.partitions[plan.client]), {"train_loss": 0.0})
        return out


def clock(config_path: str, overrides: list[str], out: Path) -> list[dict]:
    """The untrained run's rows (resumed or reused when already there)."""
    rounds = load_config(config_path, overrides).fl.rounds
    config = load_config(config_path, [*overrides, "data.test_size=8", f"eval.every={rounds}"])
    if not (out / "metrics.jsonl").is_file() or len(read_metrics(out)) <= rounds:
        run_experiment(config, out, runtime=Untrained(config.faults))
    return read_metrics(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. engine.threads=1")
    parser.add_argument(
        "--strategies", default="legend,fedit", help="names, each optionally with its own overrides: fedit:lora.top_blocks=4"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--check", action="append", default=[], help="FOLDER=RUN_DIR: the untrained run OUT/FOLDER must have a real run's clock and bytes"
    )
    parser.add_argument(
        "--trained",
        action="append",
        default=[],
        help="ENTRY=RUN_DIR: a real run of that --strategies entry gives the round it "
        "reached eval.target_accuracy; the table adds each clock's time and bytes to it",
    )
    parser.add_argument("--target", type=float, help="the accuracy --trained runs are judged at (default: eval.target_accuracy)")
    args = parser.parse_args()
    quiet_libraries()
    target = args.target or load_config(args.config, args.overrides).eval.target_accuracy
    reached = {
        entry: summarize(entry, read_metrics(Path(run)), target)["round_to_target"]
        for entry, _, run in (t.rpartition("=") for t in args.trained)
    }
    print(
        "| strategy | device cache (default off) | virtual s, all rounds | mean round s | MB, all rounds | storage reads s, all "
        f"device-rounds | round to {target:g} (trained run) | virtual s to it | MB to it |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for entry in args.strategies.split(","):
        name, *own = entry.split(":")
        for cache in ("false", "true"):
            folder = "-".join([name, *(o.replace("=", "") for o in own), "kept" if cache == "true" else "plain"])
            rows = clock(
                args.config, [*args.overrides, f"strategy.name={name}", *own, f"devices.activation_cache={cache}"], args.out / folder
            )[1:]
            to = reached.get(entry)
            upto = [r for r in rows if to is not None and r["round"] <= to]
            print(
                f"| {entry} | {'on' if cache == 'true' else 'off'} | {rows[-1]['virtual_time_s']:.1f} | "
                f"{statistics.mean(r['round_time_s'] for r in rows):.3f} | "
                f"{sum(r['bytes_up'] + r['bytes_down'] for r in rows) / 1e6:.1f} | "
                f"{sum(d.get('read_s', 0) for r in rows for d in r['devices']):.2f} | "
                + (
                    f"{to} | {upto[-1]['virtual_time_s']:.1f} | {sum(r['bytes_up'] + r['bytes_down'] for r in upto) / 1e6:.1f} |"
                    if upto
                    else "- | - | - |"
                )
            )
    for check in args.check:
        folder, _, run_dir = check.partition("=")
        same = [_clock(read_metrics(args.out / folder)) == _clock(read_metrics(Path(run_dir)))]
        print(f"{folder} against {run_dir}: {'the same virtual time and bytes in every round' if all(same) else 'DIFFERENT'}")


def _clock(rows: list[dict]) -> list[tuple]:
    return [(r["round"], r["clients"], r["virtual_time_s"], r["bytes_up"], r["bytes_down"]) for r in rows]


if __name__ == "__main__":
    main()
