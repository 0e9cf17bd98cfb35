"""Each aggregation rule against its formula in ../shared/docs/algorithms.md, on small random tensors."""

import torch

from legend.strategies.aggregate import average_updates, sample_weights
from legend.strategies.base import Update


def random_updates(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        Update(client=k, weights={"x.lora_A.w": torch.randn(2, 5, generator=gen), "x.lora_B.w": torch.randn(5, 2, generator=gen)}, num_samples=n)
        for k, n in enumerate(sizes)
    ]


def test_sample_weights_are_shares_of_reported_samples():
    assert sample_weights(random_updates([10, 30, 60])) == [0.1, 0.3, 0.6]


def test_fedit_averages_a_and_b_separately_and_is_inexact_for_the_product():
    updates = random_updates([10, 30, 60])
    p = [0.1, 0.3, 0.6]
    merged = average_updates(updates)
    expected_a = sum(pk * u.weights["x.lora_A.w"] for pk, u in zip(p, updates, strict=True))
    expected_b = sum(pk * u.weights["x.lora_B.w"] for pk, u in zip(p, updates, strict=True))
    torch.testing.assert_close(merged["x.lora_A.w"], expected_a)
    torch.testing.assert_close(merged["x.lora_B.w"], expected_b)
    exact = sum(pk * u.weights["x.lora_B.w"] @ u.weights["x.lora_A.w"] for pk, u in zip(p, updates, strict=True))
    assert (merged["x.lora_B.w"] @ merged["x.lora_A.w"] - exact).abs().max() > 1e-3  # FedIT's known inexactness
