"""Secure aggregation (flower.secure_aggregation): the server gets the sum of the round's updates and nothing else.

The deployment itself (real SuperLink and SuperNodes, LEGEND and FedIT against the embedded engine) is in
test_flower.py; here legend's real ServerApp runtime and ClientApp exchange Flower's SecAgg+ messages in this
process, so the test can read every message the server receives.
"""

import json
import random

import numpy as np
import pytest
import torch
from tests.conftest import ROOT, NodesInThisProcess, tiny_overrides

from legend.config import load_config
from legend.core import Update
from legend.engine.round import run_round
from legend.engine.runtime import InProcess
from legend.engine.simulation import build_experiment, run_experiment
from legend.errors import LegendError
from legend.lora.layout import AdapterLayout
from legend.strategies.aggregate import add_masked_terms
from legend.strategies.coverage import covered_layouts

pytest.importorskip("flwr", reason="the Flower extra is not installed: pip install -e '.[flower]'")
from flwr.app import Context, Error, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from legend.flower.runtime import FlowerRuntime
from legend.flower.secure import MODULUS
from legend.records import MEASURED

QUICKSTART = ROOT / "configs" / "quickstart.toml"
THREE = {"data.train_size": 300, "fl.num_clients": 3, "fl.clients_per_round": 3, "fl.min_clients": 2}


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

    plain = load_config(QUICKSTART, tiny_overrides(**THREE, **{"strategy.name": strategy, "fl.min_coverage": 2}))  # secure runs guard
    embedded = build_experiment(plain)
    embedded_state, embedded_row = run_round(embedded, InProcess(plain.faults), 1, embedded.strategy.initial_state(embedded.model), 0.0)

    assert row["clients"] == [0, 1, 2] and row["lost"] == []
    # compact: the weights per rank row; secure: each device's vector padded to the global layout in 32-bit words, and
    # the key exchange on top
    padded = 3 * 4 * sum(tensor.numel() for tensor in start.values())
    assert row["bytes_up"] < row["secure_aggregation"]["bytes_up"] <= 1.1 * padded
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


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"strategy.name": "hetlora"},
            "flower.secure_aggregation gives the server only a sum of updates, and hetlora does not aggregate by coordinate means",
        ),
        ({"fl.aggregator": "median"}, "flower.secure_aggregation hides each update from the server, and fl.aggregator needs it"),
        ({"fl.max_update_norm": 5}, "flower.secure_aggregation hides each update from the server, and fl.max_update_norm needs it"),
        ({"privacy.clip_norm": 1}, "flower.secure_aggregation hides each update from the server, and privacy.clip_norm needs it"),
        ({}, "flower.secure_aggregation runs on a Flower deployment"),
    ],
)
def test_secure_aggregation_refuses_what_needs_each_update_and_the_embedded_engine(tmp_path, overrides, message):
    config = load_config(QUICKSTART, tiny_overrides(**{"flower.secure_aggregation": "true", "fl.min_clients": 2, **overrides}))
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


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"fl.clients_per_round": 1}, r"fl.clients_per_round \(1\) is below 2, the fewest devices a secure round sums"),
        ({"fl.clients_per_round": 2, "flower.secure_min_coverage": 3}, r"fl.clients_per_round \(2\) is below 3"),
        ({"fl.min_clients": 1}, r"fl.min_clients \(1\) would let a secure round aggregate one device's update"),
    ],
)
def test_a_secure_run_is_refused_where_a_round_could_sum_one_device(overrides, message):
    with pytest.raises(LegendError, match=message):
        load_config(QUICKSTART, tiny_overrides(**{"flower.secure_aggregation": "true", "fl.min_clients": 2, **overrides}))


def test_the_coverage_guard_is_refused_where_a_strategy_would_not_keep_a_withheld_rows_value():
    with pytest.raises(LegendError, match="fl.min_coverage keeps a coordinate that fewer devices would train at its old value"):
        build_experiment(load_config(QUICKSTART, tiny_overrides(**{"strategy.name": "hetlora", "fl.min_coverage": 2})))


def in_process_runtime(config, exp, tmp_path, clients):
    """legend's FlowerRuntime over the in-process grid, with a node for each of ``clients``."""
    nodes = {1000 + c: {"client-id": c, "device": exp.fleet.device_of(c).kind, "state-dir": str(tmp_path)} for c in clients}
    grid = NodesInThisProcess(nodes, {"experiment": json.dumps(config.model_dump(mode="json"))})
    runtime = FlowerRuntime(grid, config.flower, Context(1, 0, {}, RecordDict(), {}))
    runtime.connect(exp)
    grid.received.clear()  # the nodes' adverts
    return grid, runtime


def test_a_secure_round_with_one_reachable_client_is_skipped_before_anyone_trains(tmp_path, server_identity):
    config = load_config(QUICKSTART, tiny_overrides(**THREE, **{"flower.secure_aggregation": "true", "flower.connect_timeout_s": 0.5}))
    exp = build_experiment(config)
    grid, runtime = in_process_runtime(config, exp, tmp_path, [1])  # the other two clients' nodes never connect
    start = exp.strategy.initial_state(exp.model)
    state, row = run_round(exp, runtime, 1, start, 0.0)
    assert row["skipped"] and row["clients"] == [] and row["lost"] == [] and grid.received == []  # no job went out
    assert all(torch.equal(state[key], start[key]) for key in start)


@pytest.mark.parametrize("k", [2, 3])
def test_every_rank_row_block_and_head_left_is_trained_by_k_devices_and_only_those_are_cut(k):
    rng = random.Random(k)
    for _ in range(200):
        layouts = {}
        for client in range(rng.randint(1, 6)):
            method = rng.choice(["lora", "lora", "adapter"]) if client == 0 else layouts[0].method
            layouts[client] = AdapterLayout(method, tuple(rng.choice([0, 0, 2, 4, 8]) for _ in range(4)), train_head=rng.random() < 0.8)
        cut = covered_layouts(layouts, k)
        for block in range(4):
            ranks = [layout.rank_by_block[block] for layout in cut.values()]
            rows = range(max(ranks)) if layouts[0].method == "lora" else range(min(max(ranks), 1))  # a bottleneck block trains whole
            assert all(sum(rank > row for rank in ranks) >= k for row in rows)
            for client, layout in layouts.items():  # nothing that k devices trained was cut
                before = [other.rank_by_block[block] for other in layouts.values()]
                if layout.method == "lora":
                    kept = min(layout.rank_by_block[block], sorted(before, reverse=True)[k - 1] if len(before) >= k else 0)
                else:
                    kept = layout.rank_by_block[block] if sum(r > 0 for r in before) >= k else 0
                assert cut[client].rank_by_block[block] == kept
        heads = sum(layout.train_head for layout in layouts.values())
        assert [layout.train_head for layout in cut.values()] == [layout.train_head and heads >= k for layout in layouts.values()]


# LEGEND capping ranks, without slack: client 2 trains (0, 0, 8, 10, 10, 10), deeper and with more rank rows than
# clients 1 (0, 0, 0, 8, 8, 8) and 0 (0, 0, 0, 0, 8, 8): block 2 and rows 8-9 of blocks 3-5 would be its own.
# whole batches: the devices' plans the tests below describe come from these batches' compute
DEEP = {
    **THREE,
    "strategy.name": "legend",
    "legend.rank_cap": "true",
    "legend.download": '"all"',  # the plans below are those of the whole download; the region's own test is further down
    "legend.slack": 0,
    "legend.r_min": 8,
    "train.split_by_length": "false",
}


def private_regions(row, block_of, state):
    """Per tensor, the slices of coordinates some device's plan held that the coverage guard cut: rank rows (of A; columns
    of B) from the rank it trained up to the rank it was planned, in each block where the two differ."""
    regions = []
    for cut in row["withheld"]:
        for key in state:
            block = block_of(key)
            if block is None or ".lora_" not in key or cut["rank_by_block"][block] == cut["planned_rank_by_block"][block]:
                continue
            rows = slice(cut["rank_by_block"][block], cut["planned_rank_by_block"][block])
            regions.append((key, (rows, slice(None)) if ".lora_A." in key else (slice(None), rows)))
    return regions


def test_the_coverage_guard_keeps_one_devices_rank_rows_out_of_the_secure_sum_and_gives_the_embedded_summary(tmp_path, server_identity):
    config = load_config(QUICKSTART, tiny_overrides(**DEEP, **{"flower.secure_aggregation": "true"}))
    exp = build_experiment(config)
    grid, runtime = in_process_runtime(config, exp, tmp_path, range(3))
    states, checkpoint = [], tmp_path / "secure" / "checkpoint.pt"
    summary = run_experiment(
        config,
        tmp_path / "secure",
        experiment=exp,
        runtime=runtime,
        on_round=lambda row: states.append(torch.load(checkpoint, weights_only=True)["global_state"]),
    )
    rows = [json.loads(line) for line in (tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["withheld"][0] == {
        "client": 2,
        "planned_rank_by_block": [0, 0, 8, 10, 10, 10],
        "planned_head": True,
        "rank_by_block": [0, 0, 0, 8, 8, 8],
        "head": True,
    }
    for row, before, after in zip(rows[1:], states, states[1:]):
        assert row["lost"] == [] and len(grid.received) > 0
        regions = private_regions(row, exp.model.info.block_of, before)
        assert regions or row["round"] > 1
        for key, region in regions:  # what one device alone would have trained keeps its value, bit for bit
            assert torch.equal(after[key][region], before[key][region]), key
        assert max((after[key] - before[key]).abs().max().item() for key in before) > 1e-4  # the round trained the rest

    plain = load_config(QUICKSTART, tiny_overrides(**DEEP, **{"fl.min_coverage": 2}))
    embedded = run_experiment(plain, tmp_path / "embedded")
    assert summary.keys() == embedded.keys()
    for key in summary.keys() - set(MEASURED):
        assert summary[key] == (pytest.approx(embedded[key], abs=1e-5) if isinstance(embedded[key], float) else embedded[key]), key
    embedded_rows = [json.loads(line) for line in (tmp_path / "embedded" / "metrics.jsonl").read_text().splitlines()]
    assert [row["withheld"] for row in embedded_rows] == [row["withheld"] for row in rows]


def test_the_coverage_guard_cuts_legends_region_plans_and_sends_the_blocks_it_freezes(tmp_path):
    """Under legend.download='region' a device downloads its region only; a block of it that the guard cuts is applied
    frozen, so that block's global tensor still goes down, and is counted."""
    overrides = {**DEEP, "legend.download": '"region"', "legend.rank_cap": "false", "fl.min_coverage": 2, "fl.rounds": 1}
    config = load_config(QUICKSTART, tiny_overrides(**overrides))
    exp = build_experiment(config)
    run_experiment(config, tmp_path, experiment=exp)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])
    assert row["withheld"][0] == {  # block 4 at rank 13 was client 2's alone: it applies that block frozen
        "client": 2,
        "planned_rank_by_block": [0, 0, 0, 0, 13, 16],
        "planned_head": True,
        "rank_by_block": [0, 0, 0, 0, 0, 16],
        "head": True,
    }
    per_rank, head = 4 * 384, 2 * 384 + 2  # MiniLM-L6's query and value: A (r x 384) and B (384 x r) per rank; the head
    frozen = {  # per cut device, the global ranks of the blocks it was planned to train and now applies frozen
        cut["client"]: sum(
            rank
            for rank, planned, trained in zip(exp.strategy.global_ranks, cut["planned_rank_by_block"], cut["rank_by_block"])
            if planned and not trained
        )
        for cut in row["withheld"]
    }
    for device in row["devices"]:
        assert device["bytes_up"] == 4 * (per_rank * sum(device["rank_by_block"]) + head)
        assert device["bytes_down"] == 4 * (per_rank * (sum(device["rank_by_block"]) + frozen.get(device["client"], 0)) + head)


class DroppingAfterMasking(NodesInThisProcess):
    """The in-process grid where one node's reply to SecAgg+'s masked-vector stage never arrives (the node died there)."""

    def __init__(self, node_configs, run_config, dead: int):
        super().__init__(node_configs, run_config)
        self.dead = dead

    def push_messages(self, messages):
        ids = []
        for message in messages:
            configs = message.content.config_records.get(RECORD_KEY_CONFIGS) if message.has_content() else None
            if message.metadata.dst_node_id == self.dead and configs is not None and configs[Key.STAGE] == Stage.COLLECT_MASKED_VECTORS:
                message.metadata.__dict__["_message_id"] = f"lost-{len(self.replies)}"
                self.replies[message.metadata.message_id] = Message(Error(0, "node died"), reply_to=message)
                ids.append(message.metadata.message_id)
            else:
                ids += super().push_messages([message])
        return ids


@pytest.mark.parametrize(("dead", "unmasked"), [(0, True), (1, False)])
def test_a_device_lost_after_masking_stops_the_unmasking_where_it_leaves_rows_to_one_survivor(tmp_path, server_identity, dead, unmasked):
    """After the guard the plans are (0, 0, 0, 0, 8, 8), (0, 0, 0, 8, 8, 8), (0, 0, 0, 8, 8, 8): without client 0 every row
    is still trained by two survivors; without client 1, block 3 would be client 2's alone."""
    config = load_config(QUICKSTART, tiny_overrides(**DEEP, **{"flower.secure_aggregation": "true"}))
    exp = build_experiment(config)
    nodes = {1000 + c: {"client-id": c, "device": exp.fleet.device_of(c).kind, "state-dir": str(tmp_path)} for c in range(3)}
    grid = DroppingAfterMasking(nodes, {"experiment": json.dumps(config.model_dump(mode="json"))}, dead=1000 + dead)
    runtime = FlowerRuntime(grid, config.flower, Context(1, 0, {}, RecordDict(), {}))
    runtime.connect(exp)
    start = exp.strategy.initial_state(exp.model)
    state, row = run_round(exp, runtime, 1, start, 0.0)
    lost = {entry["client"]: entry["reason"] for entry in row["lost"]}
    if unmasked:
        assert list(lost) == [dead] and not row["skipped"]
        assert max((state[key] - start[key]).abs().max().item() for key in start) > 1e-3
    else:
        assert sorted(lost) == [0, 1, 2] and row["skipped"]
        assert "left coordinates of clients [2] to fewer than flower.secure_min_coverage=2 survivors" in lost[0]
        assert all(torch.equal(state[key], start[key]) for key in start)
