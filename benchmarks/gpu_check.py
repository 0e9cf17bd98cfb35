"""The GPU path, end to end, in one short run: what docs/performance.md reports for a CUDA GPU.

    pip install -e ".[gpu]"          # with a CUDA build of torch==2.13.0
    python benchmarks/gpu_check.py --out runs/gpu-check

Parts, each timed on its local training only (the runtime's ``train``), each in this process:

- quickstart: configs/quickstart.toml (MiniLM-L6, FedIT) for ``--rounds`` rounds on the GPU at engine.precision=auto,
  and the same rounds on 2 CPU threads (float32): samples/s of both, their ratio, and both final accuracies;
- smollm2: configs/instruct-sst2.toml (SmolLM2-135M, LEGEND, instructions) for ``--smollm2-rounds`` rounds;
- parallel: MiniLM quickstart rounds with engine.parallel_clients 1 and 8 (8 clients a round): samples/s and ratio;
- prefix_cache: LEGEND on the quickstart in float32 with the frozen-prefix cache on (float32 entries) and off: the
  largest difference of the final global states (the cache is exact: float rounding only);
- qlora: the smollm2 part with model.quantize=4bit.

MFU: the cost model's FLOPs of the local training done, over its seconds, over the GPU's dense bfloat16 peak
(``--peak-tflops``, else from the table below). Peak memory: the summary's ``peak_memory_mb``. A part that fails
records its error line and the others still run. Prints a line per part, then one JSON line.
``--device cpu`` runs every part but QLoRA on the CPU: a dry run of this script before spending GPU time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from parallel_clients import TimedInProcess

from legend.config import load_config
from legend.engine.checkpoint import CHECKPOINT
from legend.engine.simulation import build_experiment, run_experiment
from legend.errors import LegendError
from legend.records import read_metrics

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART, INSTRUCT = ROOT / "configs" / "quickstart.toml", ROOT / "configs" / "instruct-sst2.toml"
BF16_DENSE_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
}  # vendor sheets, no sparsity


def gpu_peak_flops(device: str, override: float) -> float | None:
    if override:
        return override * 1e12
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((tflops * 1e12 for key, tflops in BF16_DENSE_TFLOPS.items() if key in name), None)


def timed_run(config_path: Path, overrides: list[str], out: Path, peak_flops: float | None) -> dict:
    """One run: samples/s and steps/s of local training, MFU, peak memory, accuracy."""
    config = load_config(config_path, overrides)
    exp = build_experiment(config)
    runtime = TimedInProcess(config.faults, config.engine.client_state_mb, config.engine.parallel_clients)
    started = time.perf_counter()
    summary = run_experiment(config, out, experiment=exp, runtime=runtime)
    rows = read_metrics(out)
    flops = sum(
        (d["compute_s"] - d["read_s"]) * exp.fleet.device_of(d["client"]).profile.flops
        for row in rows
        for d in row["devices"]
        if not d["dropped"]
    )
    steps = runtime.sequences / config.train.batch_size
    return {
        "samples_per_s": round(runtime.sequences / runtime.seconds, 2),
        "steps_per_s": round(steps / runtime.seconds, 3),
        "train_s": round(runtime.seconds, 2),
        "run_s": round(time.perf_counter() - started, 1),
        "mfu": round(flops / runtime.seconds / peak_flops, 4) if peak_flops else None,
        "peak_memory_mb": summary["peak_memory_mb"],
        "final_accuracy": summary["final_accuracy"],
        "rounds": summary["rounds"],
        "precision": str(exp.model.compute_dtype).removeprefix("torch."),
    }


def largest_difference(first: Path, second: Path) -> float:
    a, b = (torch.load(folder / CHECKPOINT, weights_only=True)["global_state"] for folder in (first, second))
    return max(float((a[key] - b[key]).abs().max()) for key in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the MiniLM parts")
    parser.add_argument(
        "--smollm2-rounds", type=int, default=30, help="rounds of the SmolLM2 parts (the config's 30: its documented CPU run)"
    )
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the GPU's dense bfloat16 peak (default: from the table)")
    parser.add_argument("--parts", default="quickstart,smollm2,parallel,prefix_cache,qlora")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"gpu_check: --device {args.device} but this torch ({torch.__version__}) sees no CUDA device: run it on a GPU machine, "
            "or --device cpu for a dry run",
            file=sys.stderr,
        )
        sys.exit(2)
    peak = gpu_peak_flops(args.device, args.peak_tflops)
    on_device = [f"engine.device={args.device}", "engine.precision=auto", "engine.threads=0"]
    minilm = [f"fl.rounds={args.rounds}", f"eval.every={args.rounds}"]
    smollm2 = [f"fl.rounds={args.smollm2_rounds}"]
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    parts = {
        "quickstart": lambda: {
            "on_device": timed_run(QUICKSTART, minilm + on_device, out / "quickstart-gpu", peak),
            "cpu_2_threads": timed_run(
                QUICKSTART, minilm + ["engine.device=cpu", "engine.precision=float32", "engine.threads=2"], out / "quickstart-cpu", None
            ),
        },
        "smollm2": lambda: timed_run(INSTRUCT, smollm2 + on_device, out / "smollm2", peak),
        "parallel": lambda: {
            f"parallel_clients_{k}": timed_run(
                QUICKSTART, minilm + on_device + ["fl.clients_per_round=8", f"engine.parallel_clients={k}"], out / f"parallel-{k}", peak
            )
            for k in (1, 8)
        },
        "prefix_cache": lambda: prefix_cache(out, minilm + [f"engine.device={args.device}", "engine.precision=float32"], peak),
        "qlora": lambda: timed_run(INSTRUCT, smollm2 + on_device + ["model.quantize=4bit"], out / "qlora", peak),
    }
    result = {
        "device": torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "peak_bf16_tflops": peak / 1e12 if peak else None,
    }
    for name in args.parts.split(","):
        started = time.perf_counter()
        try:
            result[name] = parts[name]()
        except (LegendError, RuntimeError, ImportError) as error:  # one part's failure is a result too
            result[name] = {"error": str(error).splitlines()[0]}
        ratios(result, name)
        print(f"{name} ({time.perf_counter() - started:.0f} s): {json.dumps(result[name])}", file=sys.stderr, flush=True)
    print(json.dumps(result))


def prefix_cache(out: Path, overrides: list[str], peak: float | None) -> dict:
    legend = ["strategy.name=legend", *overrides]
    on = timed_run(QUICKSTART, [*legend, "engine.cache_dtype=float32"], out / "cache-on", peak)
    off = timed_run(QUICKSTART, [*legend, "engine.cache_mb=0"], out / "cache-off", peak)
    return {"cache_on": on, "cache_off": off, "max_state_difference": largest_difference(out / "cache-on", out / "cache-off")}


def ratios(result: dict, name: str) -> None:
    part = result[name]
    if name == "quickstart" and "on_device" in part:
        part["device_over_cpu_2_threads"] = round(part["on_device"]["samples_per_s"] / part["cpu_2_threads"]["samples_per_s"], 2)
    if name == "parallel" and "parallel_clients_8" in part:
        part["8_over_1_samples_per_s"] = round(part["parallel_clients_8"]["samples_per_s"] / part["parallel_clients_1"]["samples_per_s"], 2)


if __name__ == "__main__":
    main()
