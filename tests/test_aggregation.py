"""Each aggregation rule against its formula in ../shared/docs/algorithms.md, on small random tensors."""

import pytest
import torch

from legend.core import Update
from legend.strategies.aggregate import (
    average_updates,
    fedex_residual,
    hetlora_factors,
    lora_delta,
    pad_factors,
    sample_weights,
    stack_factors,
    svd_factors,
)

OUT, IN = 6, 5


def random_updates(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        Update(
            client=k,
            weights={"x.lora_A.w": torch.randn(2, IN, generator=gen), "x.lora_B.w": torch.randn(OUT, 2, generator=gen)},
            num_samples=n,
        )
        for k, n in enumerate(sizes)
    ]


def random_factors(ranks, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, IN, generator=gen), torch.randn(OUT, r, generator=gen)) for r in ranks]


def exact_average(factors, p):
    """sum_k p_k B_k A_k, written out."""
    out = torch.zeros(OUT, IN)
    for (a, b), pk in zip(factors, p, strict=True):
        out += pk * b @ a
    return out


P = [0.1, 0.3, 0.6]


def test_sample_weights_are_shares_of_reported_samples():
    assert sample_weights(random_updates([10, 30, 60])) == P


def test_fedit_averages_a_and_b_separately_and_is_inexact_for_the_product():
    updates = random_updates([10, 30, 60])
    merged = average_updates(updates)
    expected_a = sum(pk * u.weights["x.lora_A.w"] for pk, u in zip(P, updates, strict=True))
    expected_b = sum(pk * u.weights["x.lora_B.w"] for pk, u in zip(P, updates, strict=True))
    torch.testing.assert_close(merged["x.lora_A.w"], expected_a)
    torch.testing.assert_close(merged["x.lora_B.w"], expected_b)
    factors = [(u.weights["x.lora_A.w"], u.weights["x.lora_B.w"]) for u in updates]
    assert (merged["x.lora_B.w"] @ merged["x.lora_A.w"] - exact_average(factors, P)).abs().max() > 1e-3  # FedIT's known inexactness


def test_lora_delta_is_the_weighted_sum_of_products():
    factors = random_factors([2, 2, 2])
    torch.testing.assert_close(lora_delta(factors, P), exact_average(factors, P))


def test_ffa_averaging_b_under_one_shared_a_is_exact():
    shared_a = torch.randn(2, IN)
    updates = [Update(k, {"x.lora_B.w": b}, n) for k, ((_, b), n) in enumerate(zip(random_factors([2, 2, 2]), [10, 30, 60], strict=True))]
    b = average_updates(updates)["x.lora_B.w"]
    torch.testing.assert_close(b @ shared_a, exact_average([(shared_a, u.weights["x.lora_B.w"]) for u in updates], P))


def test_fedex_residual_makes_the_mean_adapter_exact():
    factors = random_factors([2, 2, 2])
    a = sum(pk * ak for pk, (ak, _) in zip(P, factors, strict=True))
    b = sum(pk * bk for pk, (_, bk) in zip(P, factors, strict=True))
    residual = fedex_residual(factors, P)
    torch.testing.assert_close(residual, exact_average(factors, P) - b @ a)
    torch.testing.assert_close(b @ a + residual, exact_average(factors, P))
    assert residual.abs().max() > 1e-3  # the residual is what FedIT loses


def test_flora_stacking_is_exact_and_grows_the_rank():
    factors = random_factors([2, 3, 1])  # stacking also takes heterogeneous ranks
    a, b = stack_factors(factors, P)
    assert a.shape == (6, IN) and b.shape == (OUT, 6)
    torch.testing.assert_close(a[2:5], P[1] * factors[1][0])  # rows of client 1, scaled by its p
    torch.testing.assert_close(b[:, 2:5], factors[1][1])  # its columns, unscaled
    torch.testing.assert_close(b @ a, exact_average(factors, P))


def test_pad_factors_keeps_the_product():
    a, b = random_factors([2])[0]
    padded_a, padded_b = pad_factors((a, b), 4)
    assert padded_a.shape == (4, IN) and padded_b.shape == (OUT, 4)
    assert padded_a[2:].abs().sum() == 0 and padded_b[:, 2:].abs().sum() == 0
    torch.testing.assert_close(padded_b @ padded_a, b @ a)


def test_hetlora_pads_to_the_largest_rank_and_weights_by_product_norm():
    factors = random_factors([1, 2, 4])
    a, b = hetlora_factors(factors, rank=4)
    norms = [torch.linalg.norm(bk @ ak).item() for ak, bk in factors]
    w = [n / sum(norms) for n in norms]
    expected_a, expected_b = torch.zeros(4, IN), torch.zeros(OUT, 4)
    for wk, (ak, bk) in zip(w, factors, strict=True):
        expected_a[: ak.shape[0]] += wk * ak
        expected_b[:, : bk.shape[1]] += wk * bk
    torch.testing.assert_close(a, expected_a)
    torch.testing.assert_close(b, expected_b)
    assert a.shape == (4, IN) and b.shape == (OUT, 4)


def test_hetlora_with_every_b_zero_averages_equally():
    factors = [(a, torch.zeros_like(b)) for a, b in random_factors([2, 2])]
    a, _ = hetlora_factors(factors, rank=2)
    torch.testing.assert_close(a, (factors[0][0] + factors[1][0]) / 2)


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_flexlora_redistributes_the_best_rank_r_approximation(rank):
    factors, scaling = random_factors([1, 2, 4]), 2.0
    delta = lora_delta(factors, [pk * scaling for pk in P])  # dW = sum_k p_k s B_k A_k
    torch.testing.assert_close(delta, scaling * exact_average(factors, P))
    a, b = svd_factors(delta, rank, scaling)
    assert a.shape == (rank, IN) and b.shape == (OUT, rank)
    u, s, vh = torch.linalg.svd(delta)
    torch.testing.assert_close(a, vh[:rank])
    torch.testing.assert_close(b, u[:, :rank] @ torch.diag(s[:rank]) / scaling)
    # Eckart-Young: the error of s * B A is exactly the discarded singular values
    error = torch.linalg.norm(delta - scaling * b @ a)
    torch.testing.assert_close(error, s[rank:].square().sum().sqrt())
    if rank == 5:  # full rank (min(OUT, IN) = 5): exact
        torch.testing.assert_close(scaling * b @ a, delta)
