"""HetLoRA and FlexLoRA: ranks from capacity, self-pruning, redistribution, and each device's wire bytes in a real run."""

import json

import pytest
import torch
from tests.conftest import ROOT, tiny_overrides
from tests.test_legend import view

from legend.config import load_config
from legend.core import ModelInfo, Update
from legend.devices.capacity import ranks_by_capacity
from legend.engine.simulation import run_experiment
from legend.strategies.flexlora import FlexLoRA
from legend.strategies.hetlora import TAIL_NORM, HetLoRA, tail_norm

QUICKSTART = ROOT / "configs" / "quickstart.toml"
H = 384


def test_ranks_follow_estimated_speed_between_r_min_and_r_max():
    ranks = ranks_by_capacity(view([2000e9, 1000e9, 300e9, 10e9]), [0, 1, 2, 3], r_min=2, r_max=8)
    assert ranks[0] == 8 and ranks[3] == 2  # the fastest gets r_max; a far slower one is clipped to r_min
    assert ranks[0] >= ranks[1] >= ranks[2] >= ranks[3]


def test_a_slow_device_gets_a_small_rank_even_when_sampled_alone():
    """Against the whole fleet's estimates, not the round's sample: a lone slow device is still slow."""
    fleet = view([2000e9, 1000e9, 300e9, 10e9])
    assert ranks_by_capacity(fleet, [3], r_min=2, r_max=8) == {3: 2}
    assert ranks_by_capacity(fleet, [2, 3], r_min=2, r_max=8) == {
        c: r for c, r in ranks_by_capacity(fleet, [0, 1, 2, 3], r_min=2, r_max=8).items() if c in (2, 3)
    }


def test_tail_norm_is_the_product_of_the_tail_norms():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 5, generator=gen), torch.randn(6, 8, generator=gen)
    expected = torch.linalg.norm(b[:, 4:6]) * torch.linalg.norm(a[4:6])  # rank 6 in an 8-row A: keep floor(0.8 x 6) = 4
    torch.testing.assert_close(tail_norm((a, b), 6, 0.8), expected)


def test_hetlora_prunes_a_device_whose_tail_norm_shrank():
    info = ModelInfo("bert", 1, 4, ("m",), "layers")
    hetlora = HetLoRA(load_config(None, ["lora.r=8", "hetlora.r_min=2", "hetlora.gamma=0.5"]), info)
    hetlora.ranks = {0: 8, 1: 8}
    a, b = "layers.0.m.lora_A.default.weight", "layers.0.m.lora_B.default.weight"
    state = {a: torch.zeros(8, 4), b: torch.zeros(4, 8), "head": torch.zeros(2)}

    def report(client, norm):
        return Update(client, {a: torch.ones(8, 4), b: torch.ones(4, 8), "head": torch.ones(2)}, 10, {TAIL_NORM: norm})

    hetlora.aggregate(1, state, [report(0, 1.0), report(1, 1.0)])
    hetlora.aggregate(2, state, [report(0, 0.5), report(1, 2.0)])  # client 0's tail shrank, client 1's grew
    assert hetlora.ranks == {0: 4, 1: 8}
    hetlora.aggregate(3, state, [report(0, 0.1)])
    hetlora.aggregate(4, state, [report(0, 0.01)])
    assert hetlora.ranks[0] == 2  # never below hetlora.r_min


def test_flexlora_gives_each_device_the_leading_components_of_the_aggregate():
    info = ModelInfo("bert", 1, 6, ("m",), "layers")
    flexlora = FlexLoRA(load_config(None, ["lora.r=4", "lora.alpha=8.0"]), info)
    a, b = "layers.0.m.lora_A.default.weight", "layers.0.m.lora_B.default.weight"
    gen = torch.Generator().manual_seed(1)
    state = {a: torch.zeros(4, 6), b: torch.zeros(6, 4), "head": torch.zeros(2)}
    updates = [
        Update(0, {a: torch.randn(4, 6, generator=gen), b: torch.randn(6, 4, generator=gen), "head": torch.ones(2)}, 30),
        Update(1, {a: torch.randn(2, 6, generator=gen), b: torch.randn(6, 2, generator=gen), "head": torch.zeros(2)}, 10),
    ]
    new = flexlora.aggregate(1, state, updates)
    s = 8.0 / 4
    delta = s * (0.75 * updates[0].weights[b] @ updates[0].weights[a] + 0.25 * updates[1].weights[b] @ updates[1].weights[a])
    u, sv, vh = torch.linalg.svd(delta)
    for rank in (2, 4):  # a device of this rank gets the leading components: the best rank-r approximation
        torch.testing.assert_close(
            s * new[b][:, :rank] @ new[a][:rank], u[:, :rank] @ torch.diag(sv[:rank]) @ vh[:rank], atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(new["head"], torch.full((2,), 0.75))


@pytest.mark.parametrize("name", ["hetlora", "flexlora"])
def test_each_device_sends_and_receives_its_own_rank(tmp_path, name):
    config = load_config(QUICKSTART, tiny_overrides(**{"strategy.name": name, "fl.clients_per_round": 4, "hetlora.r_min": 1}))
    run_experiment(config, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    head, per_rank = 2 * H + 2, 2 * (H + H)
    ranks = set()
    for device in (d for row in rows[1:] for d in row["devices"]):
        rank = device["rank_by_block"][0]
        ranks.add(rank)
        assert device["rank_by_block"] == [rank] * 6 and 1 <= rank <= 8
        assert device["bytes_down"] == device["bytes_up"] == 4 * (6 * per_rank * rank + head)
    assert len(ranks) > 1  # the mixed fleet gets mixed ranks
