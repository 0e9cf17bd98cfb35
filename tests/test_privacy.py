"""Client-level DP: clipping, calibrated noise, and an accountant that agrees with Google's dp-accounting."""

import json
import math

import dp_accounting
import pytest
import torch
from tests.conftest import ROOT, tiny_overrides

from legend.config import load_config
from legend.core import Update
from legend.engine.privacy import ORDERS, add_noise, clip_update, epsilon
from legend.engine.simulation import run_experiment
from legend.errors import LegendError

QUICKSTART = ROOT / "configs" / "quickstart.toml"


@pytest.mark.parametrize(
    "rate, noise, rounds, delta", [(0.2, 1.0, 30, 1e-5), (0.05, 0.8, 100, 1e-5), (1.0, 2.0, 10, 1e-6), (0.4, 0.3, 5, 1e-5)]
)
def test_epsilon_matches_dp_accounting(rate, noise, rounds, delta):
    reference = dp_accounting.rdp.RdpAccountant(orders=list(ORDERS))
    reference.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), rounds)
    assert epsilon(noise, rate, rounds, delta) == pytest.approx(reference.get_epsilon(delta), rel=1e-9)


def test_epsilon_without_noise_is_infinite_and_before_any_round_zero():
    assert epsilon(0.0, 0.2, 10, 1e-5) == math.inf and epsilon(1.0, 0.2, 0, 1e-5) == 0.0


def test_clipping_scales_the_change_not_the_start_and_weighs_every_update_equally():
    start = {"a": torch.ones(3), "b": torch.zeros(2, 2)}
    update = Update(4, {"a": torch.ones(3) + torch.tensor([3.0, 0, 0]), "b": torch.full((2, 2), 2.0)}, 57)  # change norm 5
    clipped = clip_update(update, start, clip_norm=1.0)
    assert torch.allclose(clipped.weights["a"], torch.tensor([1.6, 1.0, 1.0])) and torch.allclose(
        clipped.weights["b"], torch.full((2, 2), 0.4)
    )
    assert clipped.num_samples == 1 and clipped.metrics["clip_scale"] == pytest.approx(0.2)
    assert clip_update(update, start, clip_norm=10.0).weights["b"].equal(update.weights["b"])  # within the norm: unchanged


def test_noise_is_calibrated_to_how_many_updates_carry_each_coordinate():
    state = {"a": torch.zeros(4, 50_000), "untouched": torch.zeros(3)}
    updates = [Update(0, {"a": torch.zeros(4, 50_000)}, 1), Update(1, {"a": torch.zeros(2, 50_000)}, 1)]  # rows 0-1: 2 updates, rows 2-3: 1
    noisy = add_noise(state, updates, noise_multiplier=0.5, clip_norm=2.0, generator=torch.Generator().manual_seed(0))
    assert noisy["a"][:2].std().item() == pytest.approx(0.5, rel=0.02)  # z C / 2
    assert noisy["a"][2:].std().item() == pytest.approx(1.0, rel=0.02)  # z C / 1
    assert noisy["untouched"].equal(state["untouched"])


def test_a_private_legend_run_reports_its_epsilon_and_stays_deterministic(tmp_path):
    overrides = tiny_overrides(**{"strategy.name": "legend", "privacy.clip_norm": 0.5, "privacy.noise_multiplier": 1.0})
    summary = run_experiment(load_config(QUICKSTART, overrides), tmp_path / "a")
    again = run_experiment(load_config(QUICKSTART, overrides), tmp_path / "b")
    assert summary["dp_epsilon"] == pytest.approx(epsilon(1.0, 2 / 4, 2, 1e-5)) and summary["dp_delta"] == 1e-5
    assert summary["final_loss"] == again["final_loss"] and math.isfinite(summary["final_loss"])
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] != rows[0]["loss"]


def test_privacy_refuses_a_strategy_that_does_not_average_and_noise_without_clipping(tmp_path):
    with pytest.raises(LegendError, match="privacy: hetlora does not aggregate by averaging.*use one of .*legend"):
        run_experiment(load_config(QUICKSTART, tiny_overrides(**{"strategy.name": "hetlora", "privacy.clip_norm": 1.0})), tmp_path)
    with pytest.raises(LegendError, match="privacy.noise_multiplier needs privacy.clip_norm > 0"):
        load_config(QUICKSTART, ["privacy.noise_multiplier=1.0"])
