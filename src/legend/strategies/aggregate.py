"""Aggregation math shared by the strategies: pure functions on tensors, no model, no engine."""

from __future__ import annotations

import torch

from legend.core import State, Update


def sample_weights(updates: list[Update]) -> list[float]:
    """p_k = n_k / sum_j n_j over the clients that reported this round."""
    total = sum(u.num_samples for u in updates)
    return [u.num_samples / total for u in updates]


def sample_step_weights(updates: list[Update]) -> list[float]:
    """p_k = n_k t_k / sum_j n_j t_j, with t_k the local steps device k ran (its ``steps`` metric): a device that took
    fewer steps this round (a small partition under train.local_epochs, a crash) moved its tensors less, and weighs less."""
    mass = [u.num_samples * u.metrics["steps"] for u in updates]
    total = sum(mass)
    return [m / total for m in mass]


def weighted_average(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for tensor, weight in zip(tensors, weights, strict=True):
        out.add_(tensor.float(), alpha=weight)
    return out


def average_updates(updates: list[Update], keys=None) -> State:
    """FedAvg: every tensor (or those of ``keys``) is the sample-weighted mean of the clients' tensors of that name."""
    weights = sample_weights(updates)
    return {key: weighted_average([u.weights[key] for u in updates], weights) for key in (updates[0].weights if keys is None else keys)}


def masked_average(current: torch.Tensor, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """LEGEND: per coordinate, the weighted mean over the tensors that cover it, renormalised over them.

    Each tensor covers the leading block of ``current`` (a shallower rank is a leading slice of A's
    rows or B's columns); coordinates no tensor covers keep their value in ``current``.
    """
    total = torch.zeros_like(current, dtype=torch.float32)
    mass = torch.zeros_like(current, dtype=torch.float32)
    for tensor, weight in zip(tensors, weights, strict=True):
        add_masked_terms(total, mass, tensor, weight)
    return from_masked_sums(current, total, mass)


def add_masked_terms(total: torch.Tensor, mass: torch.Tensor, tensor: torch.Tensor, weight: float) -> None:
    """One device's share of a masked average: weight x tensor into ``total`` and weight into ``mass``, on the leading
    block the tensor covers. Sums of these over devices are all secure aggregation lets the server see."""
    region = tuple(slice(0, n) for n in tensor.shape)
    total[region] += weight * tensor.float()
    mass[region] += weight


def from_masked_sums(current: torch.Tensor, total: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """total / mass where some device covered the coordinate (mass > 0); ``current`` elsewhere."""
    return torch.where(mass > 0, total / mass.clamp_min(torch.finfo(torch.float32).tiny), current.float())


def robust_average(current: torch.Tensor, tensors: list[torch.Tensor], rule: str, trim: float) -> torch.Tensor:
    """Per coordinate over the k tensors that cover it, unweighted: the median, or the trimmed mean (drop the
    floor(trim k) smallest and largest values, average the rest; Yin et al. 2018). Coverage as in ``masked_average``.

    Unweighted: a device could claim any sample count, and a robust rule must not let it buy weight."""
    stacked = torch.full((len(tensors), *current.shape), float("nan"))  # (K, *shape): NaN where a tensor does not reach
    for row, tensor in zip(stacked, tensors, strict=True):
        row[tuple(slice(0, n) for n in tensor.shape)] = tensor.float()
    count = (~stacked.isnan()).sum(0)  # (*shape)
    ordered = stacked.sort(dim=0).values  # NaN sort last
    position = torch.arange(len(tensors)).view(-1, *([1] * current.dim()))
    if rule == "median":  # the mean of the two middle values for an even count
        low, high = (
            ordered.gather(0, ((count - 1) // 2).clamp_min(0)[None]),
            ordered.gather(0, (count // 2).clamp_max(len(tensors) - 1)[None]),
        )
        value = ((low + high) / 2)[0]
    else:
        cut = (trim * count).floor().long()
        kept = (position >= cut) & (position < count - cut)
        value = torch.where(kept, ordered, 0.0).sum(0) / (count - 2 * cut).clamp_min(1)
    return torch.where(count > 0, value, current.float())


def robust_updates(global_state: State, updates: list[Update], rule: str, trim: float) -> State:
    """``robust_average`` of every tensor any update carries (a device may carry a leading slice, or none of a tensor)."""
    keys = dict.fromkeys(key for u in updates for key in u.weights)
    return {key: robust_average(global_state[key], [u.weights[key] for u in updates if key in u.weights], rule, trim) for key in keys}


# LoRA factors of one adapted module: A (r x in), B (out x r); the adapter adds s * B @ A.
Factors = tuple[torch.Tensor, torch.Tensor]


def client_factors(updates: list[Update], a_key: str, b_key: str) -> list[Factors]:
    return [(u.weights[a_key].float(), u.weights[b_key].float()) for u in updates]


def lora_delta(factors: list[Factors], weights: list[float]) -> torch.Tensor:
    """sum_k w_k B_k @ A_k (out x in): the update the clients' adapters make together."""
    return sum(w * (b @ a) for (a, b), w in zip(factors, weights, strict=True))


def stack_factors(factors: list[Factors], weights: list[float]) -> Factors:
    """FLoRA: A = concat_k(p_k A_k) on rows, B = concat_k(B_k) on columns, so B @ A = sum_k p_k B_k A_k exactly."""
    a = torch.cat([w * a for (a, _), w in zip(factors, weights, strict=True)], dim=0)  # (sum r_k, in)
    b = torch.cat([b for _, b in factors], dim=1)  # (out, sum r_k)
    return a, b


def fedex_residual(factors: list[Factors], weights: list[float]) -> torch.Tensor:
    """FedEx-LoRA: R = sum_k p_k B_k A_k - B A with A, B the weighted means, so B A + R is exact."""
    a = weighted_average([a for a, _ in factors], weights)
    b = weighted_average([b for _, b in factors], weights)
    return lora_delta(factors, weights) - b @ a


def pad_factors(factors: Factors, rank: int) -> Factors:
    """Zero rows of A and columns of B up to ``rank``: a truncated (nested) adapter inside the full one."""
    a, b = factors
    missing = rank - a.shape[0]
    return torch.nn.functional.pad(a, (0, 0, 0, missing)), torch.nn.functional.pad(b, (0, missing))


def hetlora_factors(factors: list[Factors], rank: int) -> Factors:
    """HetLoRA: zero-pad every client to ``rank``, weight it by w_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F."""
    norms = [torch.linalg.matrix_norm(b @ a).item() for a, b in factors]
    total = sum(norms)
    weights = [n / total for n in norms] if total > 0 else [1 / len(factors)] * len(factors)  # all still zero: equal weights
    padded = [pad_factors(f, rank) for f in factors]
    return weighted_average([a for a, _ in padded], weights), weighted_average([b for _, b in padded], weights)


def robust_hetlora_factors(factors: list[Factors], rank: int, rule: str, trim: float) -> Factors:
    """HetLoRA's zero padding with ``robust_average``'s rule in place of its norm-weighted mean: each rank row of A and B is
    the rule over every device of the round, a device whose rank stops below the row counting as zeros.

    Zeros, not the old row: a row few devices hold is pulled toward 0 as HetLoRA's padding pulls it (the trimmed mean cuts
    a lone holder), and a row nobody holds any more becomes 0, so the global adapter is the devices' pruned one; kept at
    its old value it would go on adding a stale term to every prediction that no device trains against."""
    padded = [pad_factors(f, rank) for f in factors]
    a, b = zip(*padded, strict=True)
    return robust_average(a[0], list(a), rule, trim), robust_average(b[0], list(b), rule, trim)


def svd_factors(delta: torch.Tensor, rank: int, scaling: float) -> Factors:
    """FlexLoRA's redistribution: delta = U S V^T; a client of ``rank`` gets B = U_r diag(S_r) / s, A = V_r^T.

    Then s * B @ A is the best rank-r approximation of delta. Build delta with ``lora_delta`` and
    weights p_k * s_k (FlexLoRA's dW = sum_k p_k s_k B_k A_k).
    """
    u, singular, vh = torch.linalg.svd(delta, full_matrices=False)
    return vh[:rank].clone(), u[:, :rank] * singular[:rank] / scaling
