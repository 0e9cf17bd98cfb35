"""Central (one-device) instruction tuning of a config's decoder on its top blocks: the orientation runs of
docs/instruct.md, and how a learning rate for the federated configs is chosen on the validation split.

For each learning rate: uniform-rank LoRA on the top ``--blocks`` blocks, AdamW on batches of the config's
training data (engine's own local training, objective and frozen-prefix cache), validation accuracy and
response loss every ``--every`` steps. Prints one JSON line per evaluation.

    python benchmarks/instruct_central.py configs/instruct-sst2.toml --blocks 8 --lrs 1e-3,3e-3 --steps 60
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from legend.config import load_config
from legend.core import ClientPlan
from legend.data import length_buckets, load_task, subsample
from legend.engine.client import client_batches, evaluate, train_client
from legend.engine.prefix_cache import PrefixCache
from legend.lora.layout import AdapterLayout
from legend.models.shared import SharedModel
from legend.objectives import objective_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--blocks", type=int, default=8, help="LoRA on this many blocks, counted from the output")
    parser.add_argument("--lrs", default="1e-3,3e-3")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20)
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    if not config.data.val_size:
        raise SystemExit("set data.val_size: learning rates are chosen on the validation split")
    task = subsample(load_task(config.data), config.data, config.seed)
    model = SharedModel.build(config.model.name, len(task.label_names), tuple(config.lora.target_modules), config.seed, config.model.dropout,
                              causal_lm=config.data.format == "instruct")
    objective = objective_for(config, task.label_names, model.tokenizer)
    n = model.info.num_blocks
    layout = AdapterLayout("lora", (0,) * (n - args.blocks) + (config.lora.r,) * args.blocks, train_head=False)
    model.add_adapters(layout, config.lora.alpha, 0.0, config.seed)
    initial = model.read(layout)
    train = objective.encode(task.train, config.data.max_length)
    validation = objective.encode(task.validation, config.data.max_length)
    buckets = length_buckets(validation, config.eval.batch_size)
    cache = PrefixCache(model, n - args.blocks, 4096, "float16")
    everything = np.arange(len(train))
    for lr in (float(x) for x in args.lrs.split(",")):
        state, started = dict(initial), time.perf_counter()
        for done in range(0, args.steps, args.every):
            steps = min(args.every, args.steps - done)
            cfg = config.train.model_copy(update={"local_steps": steps, "local_epochs": 0})
            batches = client_batches(train, everything, cfg, config.seed * 1000 + done)
            update = train_client(model, objective, ClientPlan(0, layout, state, lr), train, batches, len(train), cfg, config.seed + done,
                                  cache.view("train", train, fixed_batches=False))
            state = update.weights
            scored = evaluate(model, objective, state, validation, buckets, cache.view("validation", validation, fixed_batches=True))
            print(json.dumps({"lr": lr, "blocks": args.blocks, "steps": done + steps, "val_accuracy": scored.accuracy, "val_loss": round(scored.loss, 4),
                              "train_loss": round(update.metrics["train_loss"], 4), "wall_s": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
