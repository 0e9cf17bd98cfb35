"""FedProx: the proximal term's gradient is mu (w - w_global), and with mu = 0 a run is FedIT's exactly."""

from types import SimpleNamespace

import torch
from tests.test_strategies import assert_same, run_tiny

from legend.core import ClientPlan
from legend.engine.checkpoint import CHECKPOINT
from legend.records import MEASURED
from legend.strategies.fedprox import proximal_term


def test_proximal_gradient_is_mu_times_the_distance_to_the_global_model():
    gen = torch.Generator().manual_seed(0)
    start = {"a": torch.randn(3, 5, generator=gen), "b": torch.randn(4, 2, generator=gen), "frozen": torch.randn(2, generator=gen)}
    params = {k: (v + torch.randn(v.shape, generator=gen)).requires_grad_(k != "frozen") for k, v in start.items()}
    model = SimpleNamespace(params=params, keys=lambda layout: ["a", "b"])  # trains a and b only
    mu = 0.3
    term = proximal_term(model, ClientPlan(0, None, start, 1e-3), mu)
    term.backward()
    for key in ("a", "b"):
        torch.testing.assert_close(params[key].grad, mu * (params[key].detach() - start[key]))
    distance = sum(((params[k].detach() - start[k]) ** 2).sum() for k in ("a", "b"))
    torch.testing.assert_close(term.detach(), mu / 2 * distance)


def test_fedprox_with_mu_zero_is_fedit(tmp_path):
    fedit = run_tiny(tmp_path / "fedit", **{"strategy.name": "fedit"})
    fedprox = run_tiny(tmp_path / "fedprox", **{"strategy.name": "fedprox", "fedprox.mu": 0.0})
    same = {k for k in fedit if k not in (*MEASURED, "strategy")}
    assert {k: fedprox[k] for k in same} == {k: fedit[k] for k in same}
    first, second = (torch.load(tmp_path / run / CHECKPOINT, weights_only=True) for run in ("fedit", "fedprox"))
    assert_same(first["global_state"], second["global_state"])
