"""Where the engine's time goes, part by part, and what bfloat16 changes: the numbers behind docs/performance.md.

    python benchmarks/engine_parts.py
    python benchmarks/engine_parts.py --startup    # import and build only (runs against older legends too)

On MiniLM-L6 and SST-2, the workload of benchmarks/engine_speed.py: the seconds to import the engine
and to build the experiment (data, tokenisation, partition, model); the float32 rate of a MiniLM-sized
linear layer (400 x 384 by 384 x 1536) on one thread and on all of them, and its bfloat16 rate; one
LoRA training step of 16 sentences and one evaluation of the 872 test sentences (cache off) in
float32 and in bfloat16 (``engine.precision``). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_speed import workload  # noqa: E402  (the same workload, and benchmarks/ is not a package)


def best_seconds(work, repeats: int) -> float:
    work()  # warm-up: kernels chosen, memory allocated
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def linear_gflops(threads: int, dtype: torch.dtype) -> float:
    torch.set_num_threads(threads)
    x, w = torch.randn(400, 384, dtype=dtype), torch.randn(1536, 384, dtype=dtype)
    return 2 * 400 * 384 * 1536 / best_seconds(lambda: torch.nn.functional.linear(x, w), 50) / 1e9


def step(exp, rows) -> None:
    """One training step's forward and backward passes on these rows, as local training runs them."""
    from legend.engine.client import forward_passes

    with forward_passes(exp.model, rows):
        loss = exp.objective.loss(exp.model.module, exp.model.on_device(exp.train.batch(rows)))
    loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--startup", action="store_true", help="import and build only (runs against older legends too)")
    args = parser.parse_args()
    from legend.config import load_config
    from legend.engine.client import evaluate
    from legend.engine.simulation import build_experiment

    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import legend.engine.simulation"], check=True)
    result = {"import_s": time.perf_counter() - started}
    started = time.perf_counter()
    base, settings = workload("sst2", "legend", 3, 0.8)
    build_experiment(load_config(base, settings))
    result["build_experiment_s"] = time.perf_counter() - started
    if not args.startup:
        cores = torch.get_num_threads()
        result.update(
            linear_gflops_fp32_1_thread=linear_gflops(1, torch.float32),
            linear_gflops_fp32=linear_gflops(cores, torch.float32),
            linear_gflops_bf16=linear_gflops(cores, torch.bfloat16),
        )
        for precision in ("float32", "bfloat16"):
            exp = build_experiment(load_config(base, [*settings, f"engine.precision={precision}", "engine.cache_mb=0"]))
            rows = np.flatnonzero(exp.train.lengths == 30)[:16]  # 16 sentences of 30 tokens
            exp.model.set_trainable(exp.strategy.global_layout())
            exp.model.module.train()
            result[f"train_step_ms_{precision}"] = 1e3 * best_seconds(lambda: step(exp, rows), 20)
            state = exp.strategy.initial_state(exp.model)
            result[f"evaluate_s_{precision}"] = best_seconds(
                lambda: evaluate(exp.model, exp.objective, state, exp.test, exp.test_buckets), 3
            )
    print(json.dumps({key: round(value, 3) for key, value in result.items()}))


if __name__ == "__main__":
    main()
