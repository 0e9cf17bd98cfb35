"""Robust aggregation (fl.aggregator) checked against its definitions, and the simulated attackers it must withstand."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import ROOT, tiny_overrides

from legend.config import load_config
from legend.core import ModelInfo, Update
from legend.engine.simulation import build_experiment, run_experiment
from legend.errors import LegendError
from legend.strategies.aggregate import robust_average
from legend.strategies.flexlora import FlexLoRA
from legend.strategies.hetlora import TAIL_NORM, HetLoRA


def by_definition(values: list[float], rule: str, trim: float) -> float:
    values = sorted(values)
    if rule == "median":
        return float(np.median(values))
    cut = int(np.floor(trim * len(values)))
    return float(np.mean(values[cut : len(values) - cut]))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 9), st.sampled_from(["median", "trimmed_mean"]), st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.4]), st.integers(0, 2**31 - 1)
)
def test_each_coordinate_is_the_rule_over_the_tensors_that_cover_it(clients, rule, trim, seed):
    generator = torch.Generator().manual_seed(seed)
    current = torch.randn(5, 4, generator=generator)
    rows = torch.randint(0, 6, (clients,), generator=generator)  # each client covers a leading block of rows (0: none)
    tensors = [torch.randn(int(r), 4, generator=generator) * 10 for r in rows]
    out = robust_average(current, tensors, rule, trim)
    for i in range(5):
        for j in range(4):
            covering = [t[i, j].item() for t in tensors if i < t.shape[0]]
            expected = by_definition(covering, rule, trim) if covering else current[i, j].item()
            assert out[i, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_a_scaled_update_moves_the_mean_but_not_the_robust_rules():
    honest = [torch.full((3,), v) for v in (1.0, 1.1, 0.9, 1.05, 0.95)]
    poisoned = [*honest, torch.full((3,), 1000.0)]
    mean = torch.stack(poisoned).mean(0)
    assert mean[0] > 100
    for rule in ("median", "trimmed_mean"):
        assert abs(robust_average(torch.zeros(3), poisoned, rule, 0.2)[0].item() - 1.0) < 0.1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy.name": "flora", "fl.aggregator": "median"}, "does not aggregate by coordinate means"),
        ({"fl.aggregator": "trimmed_mean", "privacy.clip_norm": 1.0}, "use fl.aggregator='mean' with privacy.clip_norm"),
    ],
)
def test_robust_rules_are_refused_where_they_do_not_apply(overrides, message):
    with pytest.raises(LegendError, match=message):
        build_experiment(load_config(ROOT / "configs" / "quickstart.toml", tiny_overrides(**overrides)))


# One adapted module "m" (A: r x 6, B: 6 x r) and a head, for the rank-heterogeneous strategies' robust rules.
A, B, HEAD = "m.lora_A.default.weight", "m.lora_B.default.weight", "classifier.weight"


def rank_heterogeneous_round(ranks, seed):
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator)

    state = {A: draw(4, 6), B: draw(6, 4), HEAD: draw(2, 6)}
    updates = [Update(k, {A: draw(r, 6), B: draw(6, r), HEAD: draw(2, 6)}, 10 * (k + 1), {TAIL_NORM: 1.0}) for k, r in enumerate(ranks)]
    return state, updates


@pytest.mark.parametrize(("rule", "ranks"), [("median", (1, 3, 3, 2)), ("trimmed_mean", (2, 3, 1, 3, 3, 1))])
def test_hetlora_takes_each_rank_row_by_the_rule_over_all_devices_zero_padded(rule, ranks):
    state, updates = rank_heterogeneous_round(ranks, 0)
    config = load_config(None, ["lora.r=4", "lora.alpha=8.0", f"fl.aggregator={rule}", "fl.trim_fraction=0.25"])
    new = HetLoRA(config, ModelInfo("bert", 1, 6, ("m",))).aggregate(1, state, updates)
    for row in range(4):  # a device whose rank stops below the row counts as 0 there; rank row 3 is nobody's, so it is 0
        for j in range(6):
            for key, index in ((A, (row, j)), (B, (j, row))):
                values = [u.weights[key][index].item() if u.weights[A].shape[0] > row else 0.0 for u in updates]
                assert new[key][index].item() == pytest.approx(by_definition(values, rule, 0.25), abs=1e-6)
    assert not new[A][3].any() and not new[B][:, 3].any()
    assert torch.allclose(new[HEAD], robust_average(state[HEAD], [u.weights[HEAD] for u in updates], rule, 0.25))


def test_flexlora_redistributes_the_rule_over_the_devices_products():
    state, updates = rank_heterogeneous_round((1, 2, 4, 3, 2), 1)
    config = load_config(None, ["lora.r=4", "lora.alpha=8.0", "fl.aggregator=median"])
    new = FlexLoRA(config, ModelInfo("bert", 1, 6, ("m",))).aggregate(1, state, updates)
    products = np.stack([2.0 * (u.weights[B] @ u.weights[A]).numpy() for u in updates])  # s = alpha / r = 2
    u, s, vh = np.linalg.svd(np.median(products, axis=0))
    best = (u[:, :4] * s[:4]) @ vh[:4]  # the rank-4 part of the per-coordinate median product
    assert np.allclose(2.0 * (new[B] @ new[A]).numpy(), best, atol=1e-5)
    assert np.allclose(new[HEAD].numpy(), np.median(np.stack([u.weights[HEAD].numpy() for u in updates]), axis=0), atol=1e-6)


def round_one_state(out, **overrides):
    """The global state after one round of the tiny config where every sampled device is sampled (and, with faults, attacks)."""
    settings = {"fl.rounds": 1, "fl.clients_per_round": 4, **overrides}
    run_experiment(load_config(ROOT / "configs" / "quickstart.toml", tiny_overrides(**settings)), out)
    return torch.load(out / "checkpoint.pt", weights_only=True)["global_state"]


def test_attackers_send_their_change_flipped_or_scaled_and_are_marked(tmp_path):
    start = round_one_state(tmp_path / "start", **{"fl.rounds": 1, "train.local_steps": 0})  # no step taken: the initial state
    clean = round_one_state(tmp_path / "clean")
    flipped = round_one_state(tmp_path / "flip", **{"faults.malicious": 1.0, "faults.attack": "sign_flip"})
    scaled = round_one_state(tmp_path / "scale", **{"faults.malicious": 1.0, "faults.attack": "scale", "faults.attack_scale": 5.0})
    for key in clean:  # FedIT's mean of the devices' sends: every device attacks, so the mean change is flipped or scaled too
        change = clean[key] - start[key]
        assert torch.allclose(flipped[key] - start[key], -change, atol=1e-6)
        assert torch.allclose(scaled[key] - start[key], 5.0 * change, atol=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "flip" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["malicious"] == rows[1]["clients"] == [0, 1, 2, 3]
    assert json.loads((tmp_path / "flip" / "summary.json").read_text())["malicious_updates"] == 4


def test_label_flip_attackers_train_on_the_other_labels(tmp_path):
    clean = round_one_state(tmp_path / "clean")
    flipped = round_one_state(tmp_path / "flip", **{"faults.malicious": 1.0, "faults.attack": "label_flip"})
    head = "classifier.weight"  # trained toward the other class: its rows move the opposite way from the clean run's
    assert not torch.allclose(clean[head], flipped[head])
    rows = [json.loads(line) for line in (tmp_path / "flip" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["malicious"] == [0, 1, 2, 3]
