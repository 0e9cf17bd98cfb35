"""engine.parallel_clients: local-training samples/s with K clients in one pass against one by one, in one run.

    python benchmarks/parallel_clients.py configs/quickstart.toml --parallel 1,4,8 [OVERRIDES...]

The same rounds (default: 3 rounds of 8 clients, the config's local steps and batch size) run once per K, each
in this process with the model built afresh; only the seconds inside the runtime's ``train`` (local training)
are timed, so loading and evaluation do not count. It also reports the largest difference of the final global
state from K = 1's (float rounding only, `tests/test_parallel_clients.py`). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from legend.config import load_config
from legend.engine.checkpoint import CHECKPOINT
from legend.engine.runtime import InProcess
from legend.engine.simulation import run_experiment


class TimedInProcess(InProcess):
    """The embedded runtime, counting the seconds and sequences of local training."""

    seconds = 0.0
    sequences = 0

    def train(self, local, jobs):
        started = time.perf_counter()
        results = super().train(local, jobs)
        self.seconds += time.perf_counter() - started
        self.sequences += sum(update.metrics["steps"] * local.cfg.batch_size for update in results.values() if not isinstance(update, str))
        return results


def measure(config_path: Path, overrides: list[str], parallel: int, out: Path) -> dict:
    config = load_config(config_path, [*overrides, f"engine.parallel_clients={parallel}"])
    runtime = TimedInProcess(config.faults, config.engine.client_state_mb, parallel)
    summary = run_experiment(config, out, runtime=runtime)
    state = torch.load(out / CHECKPOINT, weights_only=True)["global_state"]
    return {
        "parallel_clients": parallel,
        "train_s": round(runtime.seconds, 2),
        "samples_per_s": round(runtime.sequences / runtime.seconds, 2),
        "final_accuracy": summary["final_accuracy"],
        "state": state,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--parallel", default="1,4,8", help="comma-separated K; the first is the reference")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8, help="clients per round")
    args = parser.parse_args()
    overrides = [f"fl.rounds={args.rounds}", f"fl.clients_per_round={args.clients}", f"eval.every={args.rounds}", *args.overrides]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for k in (int(v) for v in args.parallel.split(",")):
            rows.append(measure(args.config, overrides, k, Path(folder) / f"k{k}"))
    states = [row.pop("state") for row in rows]
    for row, state in zip(rows, states, strict=True):
        row["max_difference"] = max(float((state[key] - states[0][key]).abs().max()) for key in state)
        row["speedup"] = round(row["samples_per_s"] / rows[0]["samples_per_s"], 2)
    print(f"{'K':>3} {'train s':>9} {'samples/s':>10} {'speedup':>8} {'max diff':>10} {'accuracy':>9}")
    for row in rows:
        print(
            f"{row['parallel_clients']:>3} {row['train_s']:>9.1f} {row['samples_per_s']:>10.1f} {row['speedup']:>8.2f} "
            f"{row['max_difference']:>10.2e} {row['final_accuracy']:>9.4f}"
        )
    print(json.dumps({"config": str(args.config), "overrides": overrides, "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
