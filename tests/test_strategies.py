"""Every registered strategy end to end on the tiny real config, and the strategies' own bookkeeping.

The matrix checks each method's wire format byte for byte and that checkpoint + resume (with the
strategy's private state) reproduces the uninterrupted run.
"""

import json
import shutil

import pytest
import torch
from tests.conftest import ROOT, tiny_overrides

from legend.config import load_config
from legend.core import ModelInfo, Update
from legend.engine.checkpoint import CHECKPOINT
from legend.engine.simulation import run_experiment
from legend.errors import LegendError
from legend.records import MEASURED
from legend.strategies import STRATEGIES
from legend.strategies.fedsa import FedSALoRA
from legend.strategies.flora import FLoRA

QUICKSTART = ROOT / "configs" / "quickstart.toml"

# MiniLM-L6 as the tiny config trains it: 6 blocks, hidden 384, LoRA r=8 on query and value, 2 labels.
H, R, MODULES = 384, 8, 6 * 2
HEAD = 2 * H + 2  # classifier weight and bias
A = B = R * H  # one LoRA factor: A is r x in, B is out x r
LORA = MODULES * (A + B)
DENSE = MODULES * H * H  # the base weights W of the adapted layers
BIASES = (
    H + 6 * (3 * H + H + H + 4 * H + H + H) + H
)  # embeddings LayerNorm; per block q, k, v, attention out, LayerNorm, FFN in (4H), FFN out, LayerNorm; pooler
BOTTLENECK = 6 * (H * 16 + 16 + 16 * H + H)  # per block down (H -> 16) and up (16 -> H) with biases; adapter.size 16
ALL = 22_713_986  # every parameter of MiniLM-L6 with its 2-label head

# numbers sent to one client (down) and from one client (up) in rounds 1 and 2
WIRE = {
    "fedit": ([LORA + HEAD] * 2, [LORA + HEAD] * 2),
    "federa": ([LORA + HEAD] * 2, [LORA + HEAD] * 2),  # FedIT's wire: the SVD initialisation is derived, not sent
    "fedprox": ([LORA + HEAD] * 2, [LORA + HEAD] * 2),  # FedIT's wire: the proximal term is local
    "fedavg-full": ([ALL] * 2, [ALL] * 2),
    "ffa": ([MODULES * B + HEAD] * 2, [MODULES * B + HEAD] * 2),  # only B: A is known from the seed
    "fedsa": ([MODULES * A + HEAD] * 2, [MODULES * A + HEAD] * 2),  # only A: B stays on the device
    "fedex": ([LORA + HEAD + DENSE] * 2, [LORA + HEAD] * 2),  # W with the folded residuals goes down
    # round 1: nothing merged yet; round 2: round 1's stack of 2 clients, rank 2 r
    "flora": ([HEAD, HEAD + MODULES * 2 * (A + B)], [LORA + HEAD] * 2),
    "bitfit": ([BIASES + HEAD] * 2, [BIASES + HEAD] * 2),
    "adapter": ([BOTTLENECK + HEAD] * 2, [BOTTLENECK + HEAD] * 2),
    "legend": None,  # per device, from its depth: tests/test_legend.py
    "hetlora": None,  # per device, from its rank: tests/test_heterogeneous_ranks.py
    "flexlora": None,
    "fedra": None,  # per device, from its allocated layers: tests/test_fedra.py
}


# Summaries of the tiny run of each strategy as legend wrote them before issue 20's refactor (tests/golden/README.md).
GOLDEN = json.loads((ROOT / "tests" / "golden" / "tiny_summaries.json").read_text())
# The settings they were written under, pinned where a default has changed since (batching changes which rows share a pass,
# so float rounding; the precision changes the matrix multiplies).
GOLDEN_SETTINGS = {
    "train.group_by_length": "true",
    "train.split_by_length": "false",
    "engine.precision": '"float32"',
    "legend.download": '"all"',
}


ADDED_SINCE = {
    "malicious_updates",
    "final_val_accuracy",
    "best_val_accuracy",
    "target_split",
    "final_perplexity",
    "round_to_target_held",
    "time_to_target_held_s",
    "bytes_to_target_held",
}  # summary keys of features added after the golden summaries were written


def assert_matches_golden(summary, golden):
    assert {k for k in summary if k not in MEASURED} - ADDED_SINCE == set(golden)
    for key, expected in golden.items():
        if isinstance(expected, float):
            assert summary[key] == pytest.approx(expected, rel=1e-6, abs=1e-9), key
        else:
            assert summary[key] == expected, key


def run_tiny(out, resume=False, on_round=None, **extra):
    return run_experiment(load_config(QUICKSTART, tiny_overrides(**extra)), out, resume=resume, on_round=on_round)


def keep_checkpoint_of_round_1(out, copy):
    """An on_round callback that copies the run folder after round 1 (checkpoint, per-client files), as a run killed then would leave it."""

    def on_round(row):
        if row["round"] == 1:
            shutil.copytree(out, copy)

    return on_round


def assert_same(a, b):
    """Equal nested dicts of tensors and plain values."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_every_strategy_has_its_wire_format_here():
    assert set(WIRE) == set(STRATEGIES)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_sends_its_wire_format_and_resumes(tmp_path, name):
    whole = run_tiny(
        tmp_path / "whole",
        on_round=keep_checkpoint_of_round_1(tmp_path / "whole", tmp_path / "resumed"),
        **{"strategy.name": name, **GOLDEN_SETTINGS},
    )
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    if name in GOLDEN:  # every strategy that existed before the refactor gives the summary it gave then
        assert_matches_golden(whole, GOLDEN[name])
    if WIRE[name] is not None:
        down, up = WIRE[name]
        assert [r["bytes_down"] for r in rows[1:]] == [2 * 4 * n for n in down]  # 2 clients, float32
        assert [r["bytes_up"] for r in rows[1:]] == [2 * 4 * n for n in up]

    resumed = run_tiny(tmp_path / "resumed", resume=True, **{"strategy.name": name, **GOLDEN_SETTINGS})
    assert {k: v for k, v in resumed.items() if k not in MEASURED} == {k: v for k, v in whole.items() if k not in MEASURED}
    first, second = (torch.load(tmp_path / run / CHECKPOINT, weights_only=True) for run in ("whole", "resumed"))
    assert_same(first["global_state"], second["global_state"])
    assert_same(first["strategy_state"], second["strategy_state"])


# Strategy bookkeeping on small synthetic tensors: one adapted module "m" (6 x 6), rank 1, and a head.
MODULE_A, MODULE_B, MODULE_W = "m.lora_A.default.weight", "m.lora_B.default.weight", "m.base_layer.weight"
INFO = ModelInfo("bert", 1, 6, ("m",))
NO_DEVICES = None  # these strategies plan without capacity estimates


def strategy(cls):
    return cls(load_config(None, ["lora.r=1", "lora.alpha=2.0"]), INFO)


def trained(client, state, seed, n=10):
    """An update as a device would send it: the state's tensors moved by a seeded random step."""
    gen = torch.Generator().manual_seed(seed)
    return Update(client, {k: v + torch.randn(v.shape, generator=gen) for k, v in state.items()}, n)


def test_fedsa_sends_only_a_and_scores_with_the_mean_of_the_devices_b():
    fedsa = strategy(FedSALoRA)
    initial_b = {MODULE_B: torch.zeros(6, 1)}
    fedsa.load_state_dict({"initial_b": initial_b, "local_b": {}, "samples": {}})  # the format before client_state/, still read
    state = {MODULE_A: torch.randn(1, 6), "head": torch.randn(2), **initial_b}
    assert fedsa.device_side().kept(state) == {MODULE_B}  # B stays on the device: its runtime stores it
    plans = fedsa.plan(1, [0, 1], state, NO_DEVICES)
    assert plans[0].weights.keys() == {MODULE_A, "head"}
    b = {c: trained(c, initial_b, 10 + c).weights for c in (0, 1)}
    updates = [Update(c, trained(c, plans[c].weights, c).weights, n, kept=b[c], kept_start=initial_b) for c, n in ((0, 10), (1, 30))]
    state = fedsa.aggregate(1, state, updates)
    torch.testing.assert_close(state[MODULE_A], 0.25 * updates[0].weights[MODULE_A] + 0.75 * updates[1].weights[MODULE_A])
    torch.testing.assert_close(state[MODULE_B], 0.25 * b[0][MODULE_B] + 0.75 * b[1][MODULE_B])
    # round 2: client 1 again, from its own B; client 2 for the first time: the mean holds every client's latest B
    b[1], b[2] = trained(1, b[1], 21).weights, trained(2, initial_b, 22).weights
    plans = fedsa.plan(2, [1, 2], state, NO_DEVICES)
    updates = [
        Update(1, trained(1, plans[1].weights, 1).weights, 30, kept=b[1], kept_start=updates[1].kept),
        Update(2, trained(2, plans[2].weights, 2).weights, 20, kept=b[2], kept_start=initial_b),
    ]
    state = fedsa.aggregate(2, state, updates)
    torch.testing.assert_close(state[MODULE_B], (10 * b[0][MODULE_B] + 30 * b[1][MODULE_B] + 20 * b[2][MODULE_B]) / 60)


def test_flora_sends_pending_stacks_until_dense_w_is_smaller():
    flora = strategy(FLoRA)
    w0 = torch.randn(6, 6)
    fresh = {MODULE_A: torch.randn(1, 6), MODULE_B: torch.zeros(6, 1)}
    state = {**fresh, MODULE_W: w0, "head": torch.randn(2)}
    history = [w0]
    for round_number, clients in ((1, [0, 1]), (2, [0, 2])):
        plans = flora.plan(round_number, clients, state, NO_DEVICES)
        if round_number == 1:
            assert all(plan.wire.keys() == {"head"} for plan in plans.values())  # W is still the pre-trained one
        state = flora.aggregate(round_number, state, [trained(c, plans[c].weights, 100 * round_number + c) for c in clients])
        assert_same({k: state[k] for k in fresh}, fresh)  # fresh adapters every round
        history.append(state[MODULE_W])
    plans = flora.plan(3, [0, 3], state, NO_DEVICES)
    # client 0 merged up to round 1 (it got round 1's stack in round 2): it gets round 2's stack, rank 2 (2 clients x r=1)
    a, b = plans[0].wire[MODULE_A], plans[0].wire[MODULE_B]
    assert a.shape == (2, 6) and b.shape == (6, 2) and MODULE_W not in plans[0].wire
    torch.testing.assert_close(history[1] + 2.0 * b @ a, history[2])  # s = alpha / r = 2
    # client 3 has merged nothing: rounds 1 and 2 stacked (2 x 24 numbers) exceed W (36): it gets W
    assert plans[3].wire.keys() == {"head", MODULE_W}
    assert torch.equal(plans[3].wire[MODULE_W], history[2])


def test_learning_rate_warms_up_linearly_then_follows_the_schedule():
    fedit = STRATEGIES["fedit"](
        load_config(None, ["fl.rounds=10", "train.lr=0.01", "train.lr_schedule=cosine", "train.lr_min_ratio=0.1", "train.warmup_rounds=3"]),
        INFO,
    )
    rates = [fedit.lr(r) for r in range(1, 11)]
    assert rates[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])  # round r <= 3: lr * r / 4, then the full rate
    assert rates[-1] == pytest.approx(0.001)  # the cosine runs over rounds 4-10 and ends at lr_min_ratio * lr
    assert all(a > b for a, b in zip(rates[3:], rates[4:]))
    constant = STRATEGIES["fedit"](load_config(None, ["fl.rounds=10", "train.lr=0.01", "train.warmup_rounds=1"]), INFO)
    assert [constant.lr(r) for r in (1, 2, 10)] == pytest.approx([0.005, 0.01, 0.01])
    with pytest.raises(LegendError, match=r"train.warmup_rounds \(10\) must be below fl.rounds \(10\)"):
        load_config(None, ["fl.rounds=10", "train.warmup_rounds=10"])
