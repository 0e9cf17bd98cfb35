"""What each batching computes and costs, the numbers behind docs/performance.md's "No padding beyond the batch".

    python benchmarks/batching.py

On the paper SST-2 config (MiniLM-L6), round 3's batches of every fourth client: padded tokens, passes and the
largest pass, for grouped or random batches, whole or in pieces (``train.group_by_length``, ``train.split_by_length``).
Then on one CPU thread: the seconds of forward and backward over 30 random batches of 16, whole, in pieces and as
one client's grouped batches; and a pass's fixed cost and per-token cost, fitted on two shapes (what
``PIECE_OVERHEAD_TOKENS`` weighs). Prints one JSON object.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from legend.config import load_config
from legend.devices.cost import Batches
from legend.engine.client import batch_shapes, client_batches, derived_seed, forward_passes, length_pieces, passes
from legend.engine.simulation import build_experiment

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper-sst2.toml"
MODES = {"grouped": (True, False), "grouped_pieces": (True, True), "random": (False, False), "random_pieces": (False, True)}


def seconds(exp, steps: list[list[np.ndarray]]) -> float:
    """Forward and backward of every pass of every step, best of two."""
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        for step in steps:
            for rows in step:
                with forward_passes(exp.model, rows):
                    exp.objective.loss(exp.model.module, exp.model.on_device(exp.train.batch(rows))).backward()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    exp = build_experiment(load_config(PAPER, ["engine.threads=1", "strategy.name=fedit", "engine.cache_mb=0"]))
    result = {}
    for name, (grouped, split) in MODES.items():
        cfg = load_config(PAPER, [f"train.group_by_length={str(grouped).lower()}", f"train.split_by_length={str(split).lower()}"]).train
        shapes = [
            shape
            for client in range(0, 80, 4)
            for shape in batch_shapes(
                exp.train, passes(exp.train, client_batches(exp.train, exp.partitions[client], cfg, derived_seed(0, 3, client)), cfg)
            )
        ]
        work = Batches.of(shapes)
        result[name] = {"padded_tokens": work.tokens, "passes": len(shapes), "largest_pass_tokens": work.peak_tokens}
    exp.model.set_trainable(exp.strategy.global_layout())
    exp.model.module.train()
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(exp.train), 16, replace=False) for _ in range(30)]
    lengths = exp.train.lengths
    windows = [np.concatenate(batches[i : i + 5]) for i in range(0, 30, 5)]  # a client's round: 5 batches of 16, sorted, cut
    grouped = [[w[np.argsort(lengths[w], kind="stable")][j : j + 16]] for w in windows for j in range(0, 80, 16)]
    result["seconds_30_batches_whole"] = seconds(exp, [[b] for b in batches])
    result["seconds_30_batches_pieces"] = seconds(exp, [length_pieces(lengths, b) for b in batches])
    result["seconds_30_batches_grouped"] = seconds(exp, grouped)
    short, long = (np.flatnonzero(lengths == 8)[:2], 2 * 8), (np.flatnonzero(lengths == 48)[:16], 16 * 48)
    (t_short, n_short), (t_long, n_long) = ((seconds(exp, [[rows]] * 10) / 10, n) for rows, n in (short, long))
    per_token = (t_long - t_short) / (n_long - n_short)
    result.update(ms_per_pass=1e3 * (t_short - per_token * n_short), ms_per_token=1e3 * per_token)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
