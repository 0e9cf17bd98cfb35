"""Simulated poisoned devices (``faults.malicious``, ``faults.attack``): what a robust aggregator must withstand.

Each sampled device is an attacker in a round with probability ``faults.malicious``, drawn from
(seed, round, client) like the other simulated faults, so a resumed run draws the same attackers.
An attacker sends a well-formed update (the right keys, shapes and dtypes, finite values), which
validation cannot refuse:

- ``label_flip``: it trains honestly on its data with every label y replaced by C - 1 - y;
- ``sign_flip``: it sends the opposite of its change, w0 - (w - w0);
- ``scale``: it sends its change multiplied by ``faults.attack_scale``, w0 + k (w - w0).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from legend.config import FaultsConfig
from legend.data.batching import EncodedSplit

MALICIOUS = "malicious"  # metric an attacker's update carries (1.0), so the round's record can list the attackers


def is_attacker(faults: FaultsConfig, job_seed: int) -> bool:
    """Whether this device attacks in this round (the job's seed is derived from (seed, round, client))."""
    return faults.malicious > 0 and np.random.default_rng([job_seed, 29]).random() < faults.malicious


def flipped_labels(data: EncodedSplit, num_classes: int) -> EncodedSplit:
    """The same examples with every label y replaced by C - 1 - y."""
    return replace(data, labels=num_classes - 1 - data.labels)


def poison(trained: dict[str, torch.Tensor], start: dict[str, torch.Tensor], faults: FaultsConfig) -> dict[str, torch.Tensor]:
    """The tensors an attacker sends instead of ``trained`` (``start``: what it was sent, cut to the same shapes)."""
    factor = -1.0 if faults.attack == "sign_flip" else faults.attack_scale
    return {key: start[key] + factor * (value - start[key]) for key, value in trained.items()}
