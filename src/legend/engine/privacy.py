"""Client-level differential privacy: DP-FedAvg with fixed clipping (McMahan et al., ICLR 2018) and its
privacy accountant.

Each sound update's change from what its device was sent is clipped to L2 norm C (``privacy.clip_norm``)
and counts with equal weight; after aggregation every coordinate gets Gaussian noise of standard
deviation z C / m_j, where z is ``privacy.noise_multiplier`` and m_j the number of updates that carry
that coordinate. The mean over m_j updates is the sum (sensitivity C) divided by m_j, so this is the
Gaussian mechanism with noise z C on the sum, whatever layouts the devices had (LEGEND's shallow
devices cover fewer coordinates). Clipping and noise happen on the server, which is trusted, as in
Flower's server-side fixed clipping.

The accountant is the Renyi DP of the Poisson-subsampled Gaussian mechanism (Mironov, Talwar and
Zhang 2019) at integer orders, composed over the rounds and converted to (epsilon, delta) as Google's
dp-accounting does. The sampling rate is clients_per_round / num_clients; legend samples a fixed
number of clients per round, for which the Poisson analysis is the usual approximation.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from legend.core import State, Update

ORDERS = tuple(range(2, 257))


def clip_update(update: Update, start: State, clip_norm: float) -> Update:
    """The update with its change from ``start`` scaled to L2 norm at most ``clip_norm``, and unit weight."""
    deltas = {key: update.weights[key].double() - start[key].double() for key in update.weights}
    norm = math.sqrt(sum(float((d**2).sum()) for d in deltas.values()))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    weights = {key: (start[key].double() + scale * d).to(update.weights[key].dtype) for key, d in deltas.items()}
    return replace(update, weights=weights, num_samples=1, metrics={**update.metrics, "clip_scale": scale})


def add_noise(state: State, updates: list[Update], noise_multiplier: float, clip_norm: float, generator: torch.Generator) -> State:
    """Gaussian noise of std z C / m_j on every coordinate j that m_j > 0 of this round's updates carry."""
    noisy = dict(state)
    for key in sorted({k for u in updates for k in u.weights}):
        coverage = torch.zeros_like(state[key], dtype=torch.float32)
        for update in updates:
            if key in update.weights:
                coverage[tuple(slice(0, n) for n in update.weights[key].shape)] += 1
        noise = torch.randn(state[key].shape, generator=generator) * noise_multiplier * clip_norm
        noisy[key] = torch.where(coverage > 0, state[key] + noise / coverage.clamp_min(1), state[key])
    return noisy


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` releases of the subsampled Gaussian mechanism (inf without noise)."""
    if noise_multiplier <= 0:
        return math.inf
    if rounds == 0:
        return 0.0
    best = math.inf
    for order in ORDERS:
        rdp = rounds * _rdp(sample_rate, noise_multiplier, order)
        if delta**2 + math.expm1(-rdp) > 0:
            return 0.0
        best = min(best, rdp + math.log1p(-1 / order) - math.log(delta * order) / (order - 1))
    return max(0.0, best)


def _rdp(q: float, sigma: float, order: int) -> float:
    """Renyi divergence of order ``order`` of one Poisson-subsampled Gaussian release (integer order)."""
    if q >= 1.0:
        return order / (2 * sigma**2)
    log_a = -math.inf
    for i in range(order + 1):
        log_binomial = math.lgamma(order + 1) - math.lgamma(i + 1) - math.lgamma(order - i + 1)
        term = log_binomial + i * math.log(q) + (order - i) * math.log1p(-q) + (i * i - i) / (2 * sigma**2)
        log_a = max(log_a, term) + math.log1p(math.exp(-abs(log_a - term))) if log_a > -math.inf else term
    return log_a / (order - 1)
