"""Secure aggregation (flower.secure_aggregation): the server gets the sum of the round's updates and nothing else.

The deployment itself (real SuperLink and SuperNodes, LEGEND and FedIT against the embedded engine) is in
test_flower.py; here legend's real ServerApp runtime and ClientApp exchange Flower's SecAgg+ messages in this
process, so the test can read every message the server receives.
"""

import json

import numpy as np
import pytest
import torch
from tests.conftest import ROOT, NodesInThisProcess, tiny_overrides

from legend.config import load_config
from legend.core import Update
from legend.engine.runtime import InProcess
from legend.engine.simulation import build_experiment, run_experiment, run_round
from legend.errors import LegendError
from legend.strategies.aggregate import add_masked_terms

pytest.importorskip("flwr", reason="the Flower extra is not installed: pip install -e '.[flower]'")
from flwr.app import Context, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from legend.flower.runtime import FlowerRuntime
from legend.flower.secure import MODULUS

QUICKSTART = ROOT / "configs" / "quickstart.toml"
THREE = {"data.train_size": 300, "fl.num_clients": 3, "fl.clients_per_round": 3}


@pytest.mark.parametrize("strategy", ["legend", "fedit"])
def test_the_server_receives_only_masked_vectors_whose_sum_is_the_embedded_aggregate(tmp_path, server_identity, strategy):
    config = load_config(QUICKSTART, tiny_overrides(**THREE, **{"strategy.name": strategy, "flower.secure_aggregation": "true"}))
    exp = build_experiment(config)
    nodes = {1000 + c: {"client-id": c, "device": exp.fleet.device_of(c).kind, "state-dir": str(tmp_path)} for c in range(3)}
    grid = NodesInThisProcess(nodes, {"experiment": json.dumps(config.model_dump(mode="json"))})
    runtime = FlowerRuntime(grid, config.flower, Context(1, 0, {}, RecordDict(), {}))
    runtime.connect(exp)
    start = exp.strategy.initial_state(exp.model)
    grid.received.clear()  # the nodes' adverts
    secure_state, row = run_round(exp, runtime, 1, start, 0.0)

    plain = load_config(QUICKSTART, tiny_overrides(**THREE, **{"strategy.name": strategy}))
    embedded = build_experiment(plain)
    embedded_state, embedded_row = run_round(embedded, InProcess(plain.faults), 1, embedded.strategy.initial_state(embedded.model), 0.0)

    assert row["clients"] == [0, 1, 2] and row["lost"] == [] and row["secure_aggregation"]["bytes_up"] > 0
    assert (row["bytes_up"], row["train_loss"]) == (embedded_row["bytes_up"], pytest.approx(embedded_row["train_loss"], abs=1e-7))
    assert max((secure_state[k] - embedded_state[k]).abs().max().item() for k in embedded_state) <= 1e-5
    moved = max((embedded_state[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3  # training moved the model far beyond the tolerance

    masked = []
    for reply in grid.received:  # four stages x three nodes
        assert all(len(record) == 0 for record in reply.content.array_records.values()), "a node sent arrays in the clear"
        configs = reply.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in configs:
            masked.append(np.concatenate([bytes_to_ndarray(b).ravel() for b in configs[Key.MASKED_PARAMETERS]]))
    assert len(grid.received) == 12 and len(masked) == 3
    for vector in masked:  # uniform over the modulus: without the masks a quantised update sits near a few 2^26 levels
        share = vector[1:] / MODULUS
        assert abs(share.mean() - 0.5) < 0.01 and abs(share.std() - 12**-0.5) < 0.01


@pytest.mark.parametrize(("overrides", "message"), [
    ({"strategy.name": "hetlora"}, "flower.secure_aggregation gives the server only a sum of updates, and hetlora does not aggregate by coordinate means"),
    ({"fl.aggregator": "median"}, "flower.secure_aggregation hides each update from the server, and fl.aggregator needs it"),
    ({"fl.max_update_norm": 5}, "flower.secure_aggregation hides each update from the server, and fl.max_update_norm needs it"),
    ({"privacy.clip_norm": 1}, "flower.secure_aggregation hides each update from the server, and privacy.clip_norm needs it"),
    ({}, "flower.secure_aggregation runs on a Flower deployment"),
])
def test_secure_aggregation_refuses_what_needs_each_update_and_the_embedded_engine(tmp_path, overrides, message):
    config = load_config(QUICKSTART, tiny_overrides(**{"flower.secure_aggregation": "true", **overrides}))
    with pytest.raises(LegendError, match=message):
        run_experiment(config, tmp_path) if not overrides else build_experiment(config)


def test_aggregating_from_sums_is_the_strategys_own_mean():
    """LEGEND's masked average (devices of different depth and rank) and FedIT's mean, from the two sums alone."""
    for strategy in ("legend", "fedit"):
        exp = build_experiment(load_config(QUICKSTART, tiny_overrides(**{"strategy.name": strategy})))
        state = exp.strategy.initial_state(exp.model)
        generator = torch.Generator().manual_seed(0)
        updates = []
        for client, keep in enumerate((1.0, 0.5, 0.25)):  # under LEGEND each device carries leading slices of some tensors
            weights = {}
            for index, (key, tensor) in enumerate(sorted(state.items())):
                if strategy == "fedit":
                    weights[key] = torch.randn(tensor.shape, generator=generator)
                elif (index + client) % 3:
                    weights[key] = torch.randn(tuple(max(1, int(n * keep)) for n in tensor.shape), generator=generator)
            updates.append(Update(client, weights, 10 * (client + 1)))
        totals = {key: torch.zeros_like(t) for key, t in state.items()}
        masses = {key: torch.zeros_like(t) for key, t in state.items()}
        for update in updates:
            for key, tensor in update.weights.items():
                add_masked_terms(totals[key], masses[key], tensor, update.num_samples / 60)
        direct = exp.strategy.aggregate(1, state, updates)
        summed = exp.strategy.aggregate_sums(1, state, totals, masses)
        assert max((direct[k] - summed[k]).abs().max().item() for k in state) <= 1e-5
