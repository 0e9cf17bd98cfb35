"""LEGEND: the rank ramp, the greedy depth planner, masked layer-wise aggregation, and a real run."""

import json
import subprocess
import sys

import pytest
import torch
from peft.tuners.lora import LoraLayer
from tests.conftest import ROOT, tiny_overrides

from legend.config import load_config
from legend.core import ModelInfo, Update
from legend.devices.capacity import Capacity, DeviceView
from legend.devices.cost import Batches, ModelSpec
from legend.engine.simulation import run_experiment
from legend.errors import LegendError
from legend.lora.layout import cut_to_layout
from legend.models.shared import SharedModel
from legend.strategies.aggregate import masked_average
from legend.strategies.legend import (
    Legend,
    Worth,
    configure_depth,
    configure_joint,
    device_layout,
    estimate_layout,
    greedy_path,
    rank_distribution,
    within,
)

QUICKSTART = ROOT / "configs" / "quickstart.toml"

# MiniLM-L6's sizes (tests/test_devices.py reads them from the real model)
H, FFN = 384, 1536
SPEC = ModelSpec(
    num_blocks=6,
    hidden=H,
    heads=12,
    ffn=FFN,
    attention_width=H,
    block_linear_params=4 * H * H + 2 * H * FFN,
    input_projection_params=3 * H * H,
    lora_features=2 * (H + H),
    outside_linear_params=H * H + 2 * H,
    output_features=2,
    frozen_output=False,
    total_params=22_713_986,
    head_params=2 * H + 2,
    bias_params=0,
)
GLOBAL = (2, 5, 8, 10, 13, 16)  # legend.ranks = "linear" from 2 to 16


def view(flops, uplink=1.25e6, memory_gb=8.0):
    """Devices that differ in compute (FLOP/s each), on the same link, all training 5 batches of 16 x 32 tokens."""
    capacity = {c: Capacity(f"d{c}", f, uplink, 2 * uplink, memory_gb) for c, f in enumerate(flops)}
    return DeviceView(SPEC, capacity, {c: Batches.uniform(5, 16, 32) for c in capacity}, wire_dtype="float32")


@pytest.mark.parametrize("shape", ["linear", "geometric", "uniform"])
def test_ranks_are_zero_below_the_depth_and_never_decrease_toward_the_output(shape):
    for depth in range(1, 7):
        ranks = rank_distribution(6, depth, 2, 16, shape)
        assert ranks[: 6 - depth] == (0,) * (6 - depth) and all(r > 0 for r in ranks[6 - depth :])
        assert list(ranks) == sorted(ranks) and ranks[-1] == 16
    assert rank_distribution(6, 6, 2, 16, "linear") == GLOBAL
    assert rank_distribution(6, 4, 2, 16, "geometric") == (0, 0, 2, 4, 8, 16)


def test_plans_fit_the_target_time_and_memory_and_faster_devices_go_deeper():
    devices = view([80e9, 120e9, 250e9, 500e9, 2000e9])
    plan = configure_depth(devices, list(range(5)), GLOBAL, slack=0.2, rank_cap=False)
    global_layout = device_layout(GLOBAL, 6, 16)
    depth_one = [estimate_layout(devices, c, device_layout(GLOBAL, 1, 16), global_layout).total_s for c in range(5)]
    target = 1.2 * max(depth_one)
    assert all(a.estimate.total_s <= target for a in plan.values())
    depths = [plan[c].depth for c in range(5)]
    assert depths == sorted(depths) and depths[0] >= 1 and depths[-1] == 6 and depths[0] < 6
    for a in plan.values():  # the layout is the top `depth` blocks at the global ranks
        assert a.layout.rank_by_block == (0,) * (6 - a.depth) + GLOBAL[6 - a.depth :]


def test_memory_limits_depth_even_when_time_allows():
    roomy = configure_depth(view([2000e9, 80e9]), [0, 1], GLOBAL, 0.2, False)[0]
    tight_memory = roomy.estimate.memory_bytes / 1e9 - 1e-3  # just below what its deepest plan needs
    tight = configure_depth(view([2000e9, 80e9], memory_gb=tight_memory), [0, 1], GLOBAL, 0.2, False)[0]
    assert roomy.depth == 6 and tight.depth < 6 and tight.estimate.memory_bytes <= tight_memory * 1e9


def test_rank_cap_lets_a_device_short_of_bandwidth_go_deeper():
    slow_link = view([2000e9, 2000e9], uplink=2e4)  # 160 kbit/s up: the upload dominates
    uncapped = configure_depth(slow_link, [0, 1], GLOBAL, 0.2, rank_cap=False)[0]
    capped = configure_depth(slow_link, [0, 1], GLOBAL, 0.2, rank_cap=True)[0]
    assert capped.depth > uncapped.depth and capped.cap < 16
    assert capped.layout.rank_by_block == tuple(min(r, capped.cap) if i >= 6 - capped.depth else 0 for i, r in enumerate(GLOBAL))


def test_masked_average_is_the_hand_computed_mean_over_the_devices_that_trained_each_coordinate():
    gen = torch.Generator().manual_seed(0)
    current = torch.randn(4, 3, generator=gen)  # an A of global rank 4: rows are rank components
    full, capped = torch.randn(4, 3, generator=gen), torch.randn(2, 3, generator=gen)  # a device at rank 4, one capped at 2
    out = masked_average(current, [full, capped], [0.25, 0.5])
    expected = current.clone()
    expected[:2] = (0.25 * full[:2] + 0.5 * capped) / 0.75
    expected[2:] = full[2:]  # only the uncapped device trained these rows: its own value (weights renormalised)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(masked_average(current, [], []), current)  # no one trained it: unchanged


def test_aggregate_masks_by_depth_and_keeps_untrained_blocks():
    info = ModelInfo("bert", 3, 4, ("m",), "layers")
    legend = Legend(load_config(None, ["legend.r_min=1", "legend.r_max=2", "legend.max_depth=2"]), info)
    assert legend.global_ranks == (0, 1, 2)
    keys = {1: ("layers.1.m.lora_A.default.weight", (1, 4)), 2: ("layers.2.m.lora_A.default.weight", (2, 4))}
    state = {key: torch.zeros(shape) for key, shape in keys.values()} | {"head": torch.zeros(2)}
    deep = Update(0, {keys[1][0]: torch.ones(1, 4), keys[2][0]: torch.ones(2, 4), "head": torch.ones(2)}, num_samples=30)
    shallow = Update(1, {keys[2][0]: 3 * torch.ones(2, 4), "head": 3 * torch.ones(2)}, num_samples=10)
    new = legend.aggregate(1, state, [deep, shallow])
    torch.testing.assert_close(new[keys[1][0]], torch.ones(1, 4))  # block 1: only the deep device, renormalised to its own value
    torch.testing.assert_close(new[keys[2][0]], torch.full((2, 4), 0.75 * 1 + 0.25 * 3))
    torch.testing.assert_close(new["head"], torch.full((2,), 1.5))
    assert all(torch.equal(state[k], torch.zeros_like(state[k])) for k, _ in keys.values())  # arguments untouched


def test_a_shallow_device_receives_every_global_adapter_and_its_region_cut_to_its_cap():
    info = ModelInfo("bert", 2, 4, ("m",), "layers")
    legend = Legend(load_config(None, ["legend.r_min=2", "legend.r_max=4"]), info)
    state = {
        "layers.0.m.lora_A.default.weight": torch.randn(2, 4),
        "layers.1.m.lora_A.default.weight": torch.randn(4, 4),
        "layers.1.m.lora_B.default.weight": torch.randn(4, 4),
        "head": torch.randn(2),
    }
    sent = cut_to_layout(state, device_layout(legend.global_ranks, 1, 3), info.block_of)  # what LEGEND's plan sends
    assert sent.keys() == state.keys() and torch.equal(sent["layers.0.m.lora_A.default.weight"], state["layers.0.m.lora_A.default.weight"])
    assert torch.equal(sent["layers.1.m.lora_A.default.weight"], state["layers.1.m.lora_A.default.weight"][:3])
    assert torch.equal(sent["layers.1.m.lora_B.default.weight"], state["layers.1.m.lora_B.default.weight"][:, :3])


def test_legend_run_sends_every_global_adapter_down_and_only_its_region_up(tmp_path):
    config = load_config(
        QUICKSTART,
        tiny_overrides(
            **{
                "strategy.name": "legend",
                "legend.ranks": "linear",
                "legend.max_depth": 6,
                "legend.download": "all",
                "fl.clients_per_round": 4,
                "devices.fleet": "jetson-mix-80",
            }
        ),
    )
    summary = run_experiment(config, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    head, per_rank = 2 * H + 2, 2 * (H + H)  # query and value: A (r x 384) and B (384 x r) per rank
    depths = []
    for row in rows[1:]:
        for device in row["devices"]:
            ranks = device["rank_by_block"]
            depth = sum(r > 0 for r in ranks)
            depths.append(depth)
            assert ranks == [0] * (6 - depth) + list(GLOBAL[6 - depth :]) and depth >= 1
            assert device["bytes_down"] == 4 * (per_rank * sum(GLOBAL) + head)
            assert device["bytes_up"] == 4 * (per_rank * sum(ranks) + head)
    assert len(set(depths)) > 1  # the mixed fleet gets mixed depths
    assert summary["final_accuracy"] is not None


def test_plan_command_gives_faster_devices_deeper_adapters_and_a_tighter_round_than_fedit():
    def plan(strategy):
        overrides = tiny_overrides(
            **{"strategy.name": strategy, "fl.num_clients": 80, "fl.clients_per_round": 80, "data.min_partition_size": 2}
        )
        result = subprocess.run(
            [sys.executable, "-m", "legend", "plan", str(QUICKSTART), *overrides, "--json"], capture_output=True, text=True, check=True
        )
        return json.loads(result.stdout)

    legend, fedit = plan("legend"), plan("fedit")
    assert len(legend["clients"]) == 80
    by_class = {}
    for row in legend["clients"]:
        by_class.setdefault(row["device"], []).append(row["depth"])
    mean_depth = {kind: sum(d) / len(d) for kind, d in by_class.items()}
    assert (
        mean_depth["jetson-nano"] < mean_depth["jetson-tx2"] <= mean_depth["jetson-agx-orin"] == 4
    )  # the global depth: top two thirds of 6
    assert legend["round_time"]["max_s"] < fedit["round_time"]["max_s"]
    assert all(row["depth"] == 6 for row in fedit["clients"])


@pytest.mark.parametrize("scaling, expected", [("uniform", lambda r: 16.0 / 8), ("rank", lambda r: 16.0 / r)])
def test_each_block_is_scaled_as_legend_scaling_says(scaling, expected):
    model = SharedModel.build("minilm-l6", num_labels=2, seed=0)
    legend = Legend(load_config(None, [f"legend.scaling={scaling}"]), model.info)
    model.add_adapters(legend.global_layout(), legend.lora_alpha, 0.0)
    layers = [m for m in model.module.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 2 * legend.global_layout().depth  # query and value of each LoRA block
    assert all(layer.scaling["default"] == pytest.approx(expected(layer.r["default"])) for layer in layers)
    assert sorted(layer.r["default"] for layer in layers) == sorted(2 * [r for r in legend.global_ranks if r > 0])


@pytest.mark.parametrize("blocks, max_depth, depth", [(6, 0, 4), (30, 0, 20), (6, 6, 6), (6, 9, 6), (6, 2, 2)])
def test_global_depth_defaults_to_the_top_two_thirds(blocks, max_depth, depth):
    legend = Legend(load_config(None, [f"legend.max_depth={max_depth}"]), ModelInfo("bert", blocks, 384, ("query", "value")))
    assert legend.global_layout().depth == depth and legend.global_ranks[-1] == 16


WORTH = Worth(depth_decay=0.6, rank_scale=4.0)
PAPER_RANKS = (0, 0, 2, 4, 8, 16)  # the default global ranks on MiniLM


def non_decreasing_within(ranks, global_ranks):
    trained = [r for r in ranks if r > 0]
    return trained == sorted(trained) and all(r <= g for r, g in zip(ranks, global_ranks, strict=True)) and ranks[-1] >= 1


def test_joint_planner_gives_each_device_leading_slices_of_the_global_ranks_within_one_deadline():
    devices = view([80e9, 120e9, 250e9, 500e9, 2000e9])
    plan = configure_joint(devices, list(range(5)), PAPER_RANKS, WORTH)
    paths = {c: greedy_path(devices, c, PAPER_RANKS, WORTH) for c in range(5)}
    deadline = max(a.estimate.total_s for a in plan.values())
    assert deadline >= max(path[0].estimate.total_s for path in paths.values())  # every device trains at least its smallest layout
    for client, a in plan.items():
        assert non_decreasing_within(a.layout.rank_by_block, PAPER_RANKS) and a.estimate.total_s <= deadline
        later = paths[client][paths[client].index(a) + 1 :]
        assert not later or later[0].estimate.total_s > deadline  # it stopped only where its next step overran the deadline
    worths = [WORTH.of(plan[c].layout.rank_by_block) for c in range(5)]
    assert worths == sorted(worths) and worths[0] < worths[-1]  # faster devices get layouts worth more
    assert deadline < max(a.estimate.total_s for a in configure_depth(devices, list(range(5)), PAPER_RANKS, 0.2, False).values())


def test_joint_planner_picks_the_deadline_of_most_progress_per_second():
    devices = view([80e9, 250e9, 2000e9])
    plan = configure_joint(devices, [0, 1, 2], PAPER_RANKS, WORTH)
    paths = [greedy_path(devices, c, PAPER_RANKS, WORTH) for c in range(3)]
    floor = max(path[0].estimate.total_s for path in paths)

    def rate(deadline):  # the workloads are equal, so the progress is the plain mean of the worths reached
        return sum(WORTH.of(within(path, deadline).layout.rank_by_block) for path in paths) / 3 / deadline

    chosen = max(a.estimate.total_s for a in plan.values())
    candidates = {p.estimate.total_s for path in paths for p in path if p.estimate.total_s >= floor}
    assert all(rate(chosen) >= rate(t) - 1e-12 for t in candidates)


def test_joint_planner_never_exceeds_a_devices_memory():
    roomy = greedy_path(view([2000e9]), 0, PAPER_RANKS, WORTH)[-1]
    tight_gb = roomy.estimate.memory_bytes / 1e9 - 1e-3  # just below its largest layout's need
    tight = view([2000e9, 2000e9], memory_gb=tight_gb)
    plan = configure_joint(tight, [0, 1], PAPER_RANKS, WORTH)
    assert all(a.estimate.memory_bytes <= tight_gb * 1e9 for a in plan.values())
    assert all(a.layout != roomy.layout for a in plan.values())
    assert all(p.estimate.memory_bytes <= tight_gb * 1e9 for p in greedy_path(tight, 0, PAPER_RANKS, WORTH))


def test_a_device_with_a_slower_link_gets_no_larger_ranks_than_an_equal_device_with_a_faster_one():
    for uplink in (1e5, 3e5, 1.25e6):
        devices = view([500e9, 500e9, 80e9])
        slow = Capacity("slow-link", 500e9, uplink / 10, uplink / 5, 8.0)
        capacity = {**devices.capacity, 0: Capacity("fast-link", 500e9, uplink, 2 * uplink, 8.0), 1: slow}
        plan = configure_joint(DeviceView(SPEC, capacity, devices.workload, "float32"), [0, 1, 2], PAPER_RANKS, WORTH)
        fast_ranks, slow_ranks = plan[0].layout.rank_by_block, plan[1].layout.rank_by_block
        assert all(s <= f for s, f in zip(slow_ranks, fast_ranks, strict=True)), (uplink, slow_ranks, fast_ranks)
        assert plan[1].estimate.bytes_up <= plan[0].estimate.bytes_up


def test_joint_planner_gives_equal_devices_the_same_layout():
    for flops in (80e9, 500e9, 2000e9):
        plan = configure_joint(view([flops] * 6), list(range(6)), PAPER_RANKS, WORTH)
        assert len({a.layout for a in plan.values()}) == 1


def test_ranks_only_planner_keeps_the_global_depth():
    plan = configure_joint(view([80e9, 2000e9]), [0, 1], PAPER_RANKS, WORTH, fixed_depth=True)
    assert all(a.depth == 4 and non_decreasing_within(a.layout.rank_by_block, PAPER_RANKS) for a in plan.values())
    assert plan[0].layout.rank_by_block != plan[1].layout.rank_by_block


def test_samples_times_steps_weights_are_the_formula():
    from legend.strategies.aggregate import sample_step_weights

    updates = [Update(0, {}, 30, {"steps": 5}), Update(1, {}, 10, {"steps": 2}), Update(2, {}, 20, {"steps": 5})]
    assert sample_step_weights(updates) == pytest.approx([150 / 270, 20 / 270, 100 / 270])


def test_legend_weights_samples_steps_changes_only_the_weights_of_the_masked_mean():
    info = ModelInfo("bert", 3, 4, ("m",), "layers")
    key = "layers.2.m.lora_A.default.weight"
    state = {key: torch.zeros(2, 4)}
    updates = [Update(0, {key: torch.ones(2, 4)}, 30, {"steps": 1}), Update(1, {key: 3 * torch.ones(1, 4)}, 10, {"steps": 6})]
    plain = Legend(load_config(None, ["legend.max_depth=2"]), info).aggregate(1, state, updates)
    stepped = Legend(load_config(None, ["legend.max_depth=2", "legend.weights=samples_steps"]), info).aggregate(1, state, updates)
    torch.testing.assert_close(plain[key][0], torch.full((4,), 0.75 * 1 + 0.25 * 3))  # samples: 30 against 10
    torch.testing.assert_close(stepped[key][0], torch.full((4,), (30 * 1 + 60 * 3) / 90))  # samples x steps: 30 against 60
    torch.testing.assert_close(stepped[key][1], torch.ones(4))  # a row only the first device trained keeps its value


def test_rank_by_block_sets_the_global_ranks_and_a_wrong_length_is_one_clear_error():
    info = ModelInfo("bert", 3, 4, ("m",))
    assert Legend(load_config(None, ["legend.rank_by_block=[0,4,8]"]), info).global_ranks == (0, 4, 8)
    with pytest.raises(LegendError, match="one rank >= 0 for each of the model's 3 blocks"):
        Legend(load_config(None, ["legend.rank_by_block=[4,8]"]), info)


def test_legend_run_with_the_joint_planner_trains_per_device_depths_and_ranks(tmp_path):
    config = load_config(
        QUICKSTART,
        tiny_overrides(
            **{"strategy.name": "legend", "legend.planner": "joint", "fl.clients_per_round": 4, "devices.fleet": "jetson-mix-80"}
        ),
    )
    summary = run_experiment(config, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    layouts = [tuple(d["rank_by_block"]) for row in rows[1:] for d in row["devices"]]
    assert all(non_decreasing_within(r, PAPER_RANKS) for r in layouts) and len(set(layouts)) > 1
    head, per_rank = 2 * H + 2, 2 * (H + H)
    assert all(d["bytes_up"] == 4 * (per_rank * sum(d["rank_by_block"]) + head) for row in rows[1:] for d in row["devices"])
    assert summary["final_accuracy"] is not None


def test_region_download_sends_only_the_region_and_zeroes_the_adapters_below_it():
    info = ModelInfo("bert", 3, 4, ("m",), "layers")
    legend = Legend(load_config(None, ["legend.r_min=2", "legend.r_max=4", "legend.max_depth=3", "legend.download=region"]), info)
    keys = [f"layers.{b}.m.lora_{f}.default.weight" for b in range(3) for f in "AB"]
    state = {k: torch.randn((legend.global_ranks[int(k[7])], 4) if "lora_A" in k else (4, legend.global_ranks[int(k[7])])) for k in keys}
    state["head"] = torch.randn(2)
    layout = device_layout(legend.global_ranks, 1, 4)  # the top block only
    plan = legend.client_plan(0, layout, state, 1e-3)
    assert plan.weights.keys() == state.keys() and set(plan.wire) == {
        "layers.2.m.lora_A.default.weight",
        "layers.2.m.lora_B.default.weight",
        "head",
    }
    assert all(torch.count_nonzero(plan.weights[k]) == 0 for k in keys[:4])  # blocks 0 and 1: zero adapters, not applied
    assert torch.equal(plan.wire["head"], state["head"]) and torch.equal(
        plan.weights["layers.2.m.lora_A.default.weight"], state["layers.2.m.lora_A.default.weight"]
    )
    everything = Legend(
        load_config(None, ["legend.r_min=2", "legend.r_max=4", "legend.max_depth=3", "legend.download=all"]), info
    ).client_plan(0, layout, state, 1e-3)
    assert everything.wire is None and torch.equal(everything.weights[keys[0]], state[keys[0]])


def test_region_download_counts_only_the_region_down_in_a_real_run(tmp_path):
    config = load_config(
        QUICKSTART,
        tiny_overrides(
            **{
                "strategy.name": "legend",
                "legend.planner": "joint",
                "legend.download": "region",
                "fl.clients_per_round": 4,
                "devices.fleet": "jetson-mix-80",
            }
        ),
    )
    run_experiment(config, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    head, per_rank = 2 * H + 2, 2 * (H + H)
    devices = [d for row in rows[1:] for d in row["devices"]]
    assert all(d["bytes_down"] == d["bytes_up"] == 4 * (per_rank * sum(d["rank_by_block"]) + head) for d in devices)
