"""Engine speed and memory: wall time to a target accuracy of the embedded engine, a naive loop and Flower's
simulation runtime, in one run.

    pip install -e ".[bench]"        # flwr[simulation]: Ray
    python benchmarks/engine_speed.py --out runs/engine-speed
    python benchmarks/engine_speed.py --workload instruct --out runs/engine-speed-instruct

The workload, for LEGEND and for FedIT: MiniLM-L6 on SST-2 (the 60k training sentences less 872 held out for
validation), 20 clients on the jetson-mix fleet with a Dirichlet 0.5 split, 10 clients per round, 5 local steps of
16, evaluation on the validation and the 872 test sentences after every round; or (``--workload instruct``)
``configs/instruct-sst2.toml``, SmolLM2-135M answering SST-2 as instructions, evaluated every round. Each way trains until the validation
accuracy holds ``--target`` (default 0.80; held: two evaluations in a row at or above it, ``eval.stop_at_target``)
or ``--rounds`` (default 40) have run. It runs three ways,
each in a fresh process timed from its start to its exit (start-up included: users wait for it too), so a way's
wall seconds are its time to the target:

- ours: the embedded engine (``run_experiment``, as ``legend run`` calls it);
- naive: what most research code does (this file, ``--variant naive``): the model rebuilt from its
  files for each client and for each evaluation, every batch padded to ``data.max_length`` and computed whole,
  in float32, no cache; otherwise the engine's work: the same sampling, batches, AdamW settings and
  truncation, the same strategy objects plan and aggregate, and the same capacity observations (the
  virtual clock's report of each update), so LEGEND plans from the same estimates;
- flower-sim: legend's own Flower ServerApp and ClientApp under Flower's simulation runtime
  (``legend deploy simulation``: a SuperLink in simulation mode, Ray actors as SuperNodes, Flower's
  default 2 CPUs per client).

The ratios ``vs_naive`` and ``vs_flower_sim`` are of those wall seconds (None where a way missed the target); each
way's validation accuracy after every round is kept in the result (``curves``), so the curves can be compared.
Then, from our runs: ``overhead_fraction`` (1 - seconds in forward and backward passes / seconds of
the round loop, checkpoints included), ``majority_rate`` (the test split's most common label: every final
accuracy must lie above it, or the runs learnt nothing and their equal accuracy proves nothing: the benchmark
then exits with status 1), ``mfu`` (training FLOPs actually executed, from the cost model
less what the frozen-prefix cache skipped, over the seconds of local training, over this machine's
float32 matmul FLOP/s measured here) and ``rss_ratio_1000_vs_10``: the peak memory of ``legend run``
with 1,000 clients over one with 10, for FedSA-LoRA (the strategy that keeps per-client tensors
between rounds), 100 (10) clients a round for 20 rounds, one local step each. Prints a table, then as
its last line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from legend.records import held_crossing, read_metrics, target_held

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "quickstart.toml"  # lr schedule, dropout off, LoRA r=8: the classification workload's config before its settings
DATA = ROOT.parent / "shared" / "data" / "sst2"
STRATEGIES = ("legend", "fedit")
WORKLOADS = {  # each way starts from the config, then the settings
    "sst2": (
        BASE,
        [
            f'data.path="{DATA}"',
            "data.task=sst2",
            "data.val_size=872",
            "fl.num_clients=20",
            "fl.clients_per_round=10",
            "train.local_steps=5",
            "train.batch_size=16",
        ],
    ),
    # SmolLM2-135M answering SST-2 as instructions (docs/instruct.md): 20 clients, 4 a round, 200 sentences for validation
    "instruct": (ROOT / "configs" / "instruct-sst2.toml", [f'data.path="{DATA}"']),
}


def workload(name: str, strategy: str, rounds: int, target: float) -> tuple[Path, list[str]]:
    """The workload's config and its settings, evaluated every round and stopping once the target is held."""
    base, settings = WORKLOADS[name]
    return base, [
        *settings,
        f"fl.rounds={rounds}",
        "eval.every=1",
        f"eval.target_accuracy={target}",
        "eval.stop_at_target=true",
        f"strategy.name={strategy}",
    ]


def reached(rows: list[dict], target: float) -> dict:
    """A way's metrics rows as the report reads them: the round whose validation accuracy the next one held at the target
    (None: missed within the rounds), the validation accuracy after every round, and the test accuracy it ended at."""
    held = held_crossing(rows, "val_accuracy", target) if target_held(rows, target) else None
    return {
        "round_to_target": held["round"] if held else None,
        "rounds": rows[-1]["round"],
        "curve": [row["val_accuracy"] for row in rows],
        "final_accuracy": rows[-1]["accuracy"],
    }


def memory_workload(clients: int, per_round: int) -> list[str]:
    """FedSA-LoRA, whose clients each keep their own B between rounds: 20 rounds reach most of the clients (88% of 1,000)."""
    return [
        f'data.path="{DATA}"',
        "data.task=sst2",
        f"fl.num_clients={clients}",
        f"fl.clients_per_round={per_round}",
        "fl.rounds=20",
        "train.local_steps=1",
        "train.batch_size=4",
        "eval.every=20",
        "data.test_size=200",
        "strategy.name=fedsa",
    ]


# --- what runs inside each timed process --------------------------------------------------------


def run_ours(base: Path, overrides: list[str], out: Path) -> dict:
    """The embedded engine; returns the seconds of the round loop and where they went."""
    from legend.config import load_config
    from legend.devices.cost import Batches, applied_ranks, block_forward_flops, training_flops
    from legend.engine.client import FORWARD_BACKWARD_S, batch_shapes, client_batches, passes
    from legend.engine.runtime import InProcess
    from legend.engine.simulation import build_experiment, run_experiment

    class Recording(InProcess):
        """The in-process runtime, keeping each job and its update for the FLOP count."""

        trained: list = []

        def train(self, local, jobs):
            returned = super().train(local, jobs)
            self.trained += [(job, returned[job.plan.client]) for job in jobs if not isinstance(returned[job.plan.client], str)]
            return returned

    config = load_config(base, overrides)
    exp = build_experiment(config)
    runtime = Recording(config.faults)
    stamps = []
    run_experiment(config, out, experiment=exp, runtime=runtime, on_round=lambda row: stamps.append((time.perf_counter(), row)))
    rows = [row for _, row in stamps]
    loop_s = stamps[-1][0] - stamps[0][0]  # rounds 1..R, each with its checkpoint
    skipped = exp.prefix.boundary if exp.prefix is not None and exp.prefix.trains else 0
    flops = 0.0
    for job, _ in runtime.trained:
        work = Batches.of(
            batch_shapes(
                exp.train,
                passes(exp.train, client_batches(exp.train, exp.partitions[job.plan.client], config.train, job.seed), config.train),
            )
        )
        layout = job.plan.layout
        flops += training_flops(exp.spec, layout, work, applied_ranks(layout, exp.strategy.global_layout()))
        flops -= skipped * block_forward_flops(exp.spec, work, 0)  # the cached blocks never ran
    return {
        "loop_s": loop_s,
        "forward_backward_s": sum(r["forward_backward_s"] for r in rows[1:]),
        "train_s": sum(u.metrics["train_wall_s"] for _, u in runtime.trained),
        "train_forward_backward_s": sum(u.metrics[FORWARD_BACKWARD_S] for _, u in runtime.trained),
        "train_flops": flops,
        **reached(rows, config.eval.target_accuracy),
    }


def run_naive(base: Path, overrides: list[str]) -> dict:
    """Rebuild the model per client and per evaluation, pad every batch to data.max_length and compute it whole, no cache;
    evaluate the validation and test splits after every round, as ours does, and stop once the target is held."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from legend.config import load_config
    from legend.core import Update, numel
    from legend.engine.client import derived_seed, local_step_count, training_batches
    from legend.engine.round import device_view, sample_clients
    from legend.engine.simulation import build_experiment
    from legend.models.shared import SharedModel
    from legend.objectives.instruct import IGNORE

    config = load_config(base, [*overrides, "engine.cache_mb=0"])
    torch.set_num_threads(config.engine.threads or os.cpu_count())
    exp = build_experiment(config)  # the split, the strategy and its capacity estimates: legend's algorithm, naive execution
    objective, width = exp.objective, config.data.max_length
    fill = {"input_ids": exp.train.pad_token_id, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE}

    def batch(split, rows) -> dict:
        """The rows' tensors, every (rows, tokens) one padded to data.max_length."""
        return {key: F.pad(t, (0, width - t.shape[1]), value=fill[key]) if t.dim() == 2 else t for key, t in split.batch(rows).items()}

    def rebuilt() -> SharedModel:
        model = SharedModel.build(
            config.model.name,
            len(exp.label_names),
            tuple(config.lora.target_modules),
            config.seed,
            config.model.dropout,
            causal_lm=objective.causal_lm,
        )
        model.add_adapters(exp.strategy.global_layout(), exp.strategy.lora_alpha, config.lora.dropout, config.seed, exp.strategy.lora_init)
        return model

    def train_client(plan, round_number: int) -> Update:
        model = rebuilt()
        model.load(plan.weights)  # the benchmarked strategies keep nothing on the device
        params = list(model.set_trainable(plan.layout).values())
        optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=config.train.weight_decay)
        indices = exp.partitions[plan.client]
        rng = np.random.default_rng(derived_seed(config.seed, round_number, plan.client))
        model.module.train()
        for rows in training_batches(exp.train, indices, local_step_count(len(indices), config.train), config.train, rng):
            objective.loss(model.module, batch(exp.train, rows)).backward()
            torch.nn.utils.clip_grad_norm_(params, config.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        trained = model.read(plan.layout)
        return Update(plan.client, trained, len(indices))

    @torch.no_grad()
    def accuracy(model, split) -> float:
        correct = 0
        for rows in np.array_split(np.arange(len(split)), -(-len(split) // config.eval.batch_size)):
            scored = objective.score(model.module, batch(split, rows)).correct
            correct += objective.exact_matches(model.module, split, rows) if scored is None else scored
        return correct / len(split)

    def evaluated(round_number: int, state) -> dict:
        model = rebuilt()
        model.load(state)
        model.module.eval()
        return {"round": round_number, "val_accuracy": accuracy(model, exp.validation), "accuracy": accuracy(model, exp.test)}

    state = exp.strategy.initial_state(exp.model)
    rows = [evaluated(0, state)]
    started = time.perf_counter()
    for round_number in range(1, config.fl.rounds + 1):
        if target_held(rows, config.eval.target_accuracy):
            break
        clients = sample_clients(config.seed, round_number, exp.fleet.available(round_number, config.seed), config.fl.clients_per_round)
        batches, view = device_view(exp, exp.local(), round_number, clients)
        plans = exp.strategy.plan(round_number, clients, state, view)
        updates = [train_client(plans[c], round_number) for c in clients]
        for c, update in zip(clients, updates, strict=True):  # what the engine's capacity estimates learn from each update
            report = exp.accounting.received(round_number, plans[c], view.workload[c], batches[c], numel(update.weights))[1]
            exp.capacity.observe(c, {**update.metrics, **report})
        state = exp.strategy.aggregate(round_number, state, updates)
        rows.append(evaluated(round_number, state))
    labels = exp.test.labels if hasattr(exp.test, "labels") else exp.test.classes
    majority = float(np.bincount(labels).max()) / len(labels)
    return {"loop_s": time.perf_counter() - started, "majority_rate": majority, **reached(rows, config.eval.target_accuracy)}


# --- the run of the benchmark ----------------------------------------------------------------------


def timed(argv: list[str], log: Path) -> tuple[float, float]:
    """Run a command to its end: (wall seconds, peak RSS in GB)."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed: see {log}")
    return time.perf_counter() - started, usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def inner(variant: str, base: Path, overrides: list[str], out: Path) -> list[str]:
    return [
        sys.executable,
        __file__,
        *("--variant", variant, "--base", str(base), "--result", str(out / "result.json"), "--out", str(out), "--", *overrides),
    ]


def matmul_flops(size: int = 2048, repeats: int = 10) -> float:
    """This machine's float32 matmul FLOP/s (all threads), the best of ``repeats``."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_time(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _time(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def measure(out: Path, name: str, rounds: int, target: float) -> dict:
    results = {"matmul_flops": matmul_flops()}
    for strategy in STRATEGIES:
        base, settings = workload(name, strategy, rounds, target)
        for variant, argv in (
            ("ours", inner("ours", base, settings, out / strategy / "ours")),
            ("naive", inner("naive", base, settings, out / strategy / "naive")),
            (
                "flower-sim",
                [str(BIN / "legend"), "deploy", "simulation", str(base), *settings, "--out", str(out / strategy / "flower-sim")],
            ),
        ):
            (out / strategy / variant).mkdir(parents=True, exist_ok=True)
            print(f"{strategy} {variant} ...", file=sys.stderr, flush=True)
            wall, rss = timed(argv, out / strategy / f"{variant}.log")
            if variant == "flower-sim":  # Flower's processes are not the one timed: read the rounds from the run's metrics
                rows = read_metrics(out / strategy / variant)
                detail = {"loop_s": sum(row["wall_s"] for row in rows[1:]), **reached(rows, target)}
                rss = None
            else:
                detail = json.loads((out / strategy / variant / "result.json").read_text())
            results[strategy, variant] = {"wall_s": wall, "peak_rss_gb": rss, **detail}
    for clients, per_round in ((10, 10), (1000, 100)):
        print(f"memory with {clients} clients ...", file=sys.stderr, flush=True)
        argv = [str(BIN / "legend"), "run", str(BASE), *memory_workload(clients, per_round), "--out", str(out / f"clients-{clients}")]
        results["rss", clients] = timed(argv, out / f"clients-{clients}.log")[1]
    return results


def ratio(slower: dict, faster: dict) -> float | None:
    """How many times sooner ``faster`` held the target; None where either missed it."""
    both = slower["round_to_target"] is not None and faster["round_to_target"] is not None
    return slower["wall_s"] / faster["wall_s"] if both else None


def report(results: dict, target: float) -> dict:
    print(
        f"| workload (target {target}) | way | wall s to the held target, start to exit | rounds to it (run) | s per round | peak RSS GB | "
        "test accuracy at the end |"
    )
    print("|---|---|---|---|---|---|---|")
    for strategy in STRATEGIES:
        for variant in ("ours", "naive", "flower-sim"):
            r = results[strategy, variant]
            rss = "-" if r["peak_rss_gb"] is None else f"{r['peak_rss_gb']:.2f}"
            wall = f"{r['wall_s']:.1f}" if r["round_to_target"] is not None else f"missed ({r['wall_s']:.1f})"
            print(
                f"| {strategy} | {variant} | {wall} | {r['round_to_target']} ({r['rounds']}) | {r['loop_s'] / r['rounds']:.1f} | {rss} | "
                f"{r['final_accuracy']:.4f} |"
            )
    ours = results["legend", "ours"]
    matmul = results["matmul_flops"]
    summary = {
        "vs_naive": ratio(results["legend", "naive"], ours),
        "vs_flower_sim": ratio(results["legend", "flower-sim"], ours),
        "vs_naive_fedit": ratio(results["fedit", "naive"], results["fedit", "ours"]),
        "vs_flower_sim_fedit": ratio(results["fedit", "flower-sim"], results["fedit", "ours"]),
        "overhead_fraction": 1 - ours["forward_backward_s"] / ours["loop_s"],
        "overhead_fraction_fedit": 1 - results["fedit", "ours"]["forward_backward_s"] / results["fedit", "ours"]["loop_s"],
        "mfu": ours["train_flops"] / ours["train_s"] / matmul,
        "mfu_fedit": results["fedit", "ours"]["train_flops"] / results["fedit", "ours"]["train_s"] / matmul,
        "matmul_gflops": matmul / 1e9,
        "rss_ratio_1000_vs_10": results["rss", 1000] / results["rss", 10],
        "rss_gb_10_clients": results["rss", 10],
        "rss_gb_1000_clients": results["rss", 1000],
    }
    majority = results["legend", "naive"]["majority_rate"]
    learnt = all(
        results[strategy, variant]["final_accuracy"] > majority for strategy in STRATEGIES for variant in ("ours", "naive", "flower-sim")
    )
    summary.update(majority_rate=majority, all_above_majority=float(learnt))
    curves = {
        f"{strategy} {variant}": results[strategy, variant]["curve"]
        for strategy in STRATEGIES
        for variant in ("ours", "naive", "flower-sim")
    }
    print()
    print(json.dumps({**{k: v if v is None else round(v, 4) for k, v in summary.items()}, "curves": curves}))
    if not learnt:
        sys.exit(
            f"FAILED: a final accuracy is at or below the majority rate {majority:.4f}: the runs learnt nothing, so their equal "
            "accuracy proves nothing; give more --rounds"
        )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/engine-speed"))
    parser.add_argument("--rounds", type=int, default=40, help="the most rounds a way may run to reach the target")
    parser.add_argument("--target", type=float, default=0.80, help="validation accuracy each way must hold")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="sst2", help="MiniLM-L6 classifying, or SmolLM2-135M instructed")
    parser.add_argument("--variant", choices=["ours", "naive"], help=argparse.SUPPRESS)  # one timed process of the benchmark
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        result = run_ours(args.base, args.overrides, args.out) if args.variant == "ours" else run_naive(args.base, args.overrides)
        args.result.write_text(json.dumps(result))
        return
    report(measure(args.out.resolve(), args.workload, args.rounds, args.target), args.target)


if __name__ == "__main__":
    main()
