"""Devices: the catalog and fleets, the cost model against the real model, and the virtual clock."""

import contextlib
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tests.conftest import ROOT, tiny_overrides
from torch.utils.flop_counter import FlopCounterMode

from legend.compat import check_layout
from legend.config import DevicesConfig, load_config
from legend.core import numel
from legend.devices.calibrate import BlockTimer
from legend.devices.capacity import lora_numel
from legend.devices.clock import RoundTime, synchronous_round
from legend.devices.cost import (
    Batches,
    ModelSpec,
    block_backward_flops,
    block_forward_flops,
    layout_numel,
    require_fits,
    training_flops,
    training_memory_bytes,
)
from legend.devices.fleet import Link, build_fleet
from legend.devices.profiles import CATALOG
from legend.engine.simulation import run_experiment
from legend.errors import LegendError
from legend.lora import AdapterLayout
from legend.models.placement import QUANTIZED_BYTES
from legend.models.shared import SharedModel
from legend.strategies.registry import strategy_class
from legend.wire import wire_bytes

QUICKSTART = ROOT / "configs" / "quickstart.toml"


@pytest.fixture(scope="module")
def model():
    shared = SharedModel.build("minilm-l6", num_labels=2, seed=0)
    shared.add_adapters(AdapterLayout.uniform_lora(shared.info.num_blocks, 8), lora_alpha=16, lora_dropout=0.0, seed=0)
    return shared


def top(depth, rank=8, blocks=6):
    return AdapterLayout("lora", (0,) * (blocks - depth) + (rank,) * depth)


def times(*totals):
    return [RoundTime(client, "x", 0.0, total, 0.0, 0, 0) for client, total in enumerate(totals)]


def test_round_lasts_as_long_as_its_slowest_participant():
    assert synchronous_round(times(3.0, 7.5, 1.0)) == (7.5, set())


def test_deadline_drops_late_devices_and_the_round_ends_at_the_deadline():
    assert synchronous_round(times(3.0, 7.5, 9.0), deadline_s=5.0) == (5.0, {1, 2})
    assert synchronous_round(times(3.0, 4.0), deadline_s=5.0) == (4.0, set())


def test_spec_reads_minilm_sizes(model):
    spec = ModelSpec.of(model)
    h, ffn = 384, 1536
    assert (spec.num_blocks, spec.hidden, spec.heads, spec.ffn, spec.attention_width) == (6, h, 12, ffn, h)
    assert spec.block_linear_params == 4 * h * h + 2 * h * ffn
    assert spec.lora_features == 2 * (h + h)  # query and value
    assert spec.outside_linear_params == h * h + h * 2  # pooler and classifier
    assert spec.total_params == 22_713_986


def test_no_backward_flops_below_the_lowest_trained_block(model):
    spec, work, applied = ModelSpec.of(model), Batches.uniform(3, 16, 40), (8,) * 6
    head_only = training_flops(spec, top(0), work, applied)  # forward everywhere, backward nowhere in the blocks
    for depth in range(1, 7):
        backward = training_flops(spec, top(depth), work, applied) - head_only
        adapter = 8 * spec.lora_features
        assert backward == (depth - 1) * block_backward_flops(spec, work, adapter, False) + block_backward_flops(
            spec, work, adapter, False, lowest=True
        )
    assert training_flops(spec, AdapterLayout("full"), work) > training_flops(spec, top(6), work)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_autograd_runs_no_backward_below_the_lowest_trained_block(model):
    """What the cost model assumes, observed on the real model: blocks below the region get no backward pass."""
    timer = BlockTimer(model.module.get_submodule(model.blocks_prefix))
    try:
        model.set_trainable(top(2))
        ids = torch.randint(1000, 2000, (2, 8))
        model.module(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1])).loss.backward()
        reached = {block for event, block in timer.marks if event == "backward start"}
    finally:
        timer.remove()
        model.module.zero_grad(set_to_none=True)
    assert reached == {4, 5}


@pytest.mark.parametrize(
    "layout",
    [top(1), top(3), AdapterLayout("lora", (0, 0, 0, 2, 4, 8)), top(6), AdapterLayout("full"), AdapterLayout("bitfit")],
    ids=["lora-top1", "lora-top3", "lora-ramp", "lora-all", "full", "bitfit"],
)
def test_charged_flops_are_those_torch_counts_in_a_real_step(model, layout):
    """The cost model against torch's FLOP counter on a real forward and backward (eager attention, so its matrix
    products are counted too): within 1%, where charging the lowest block's Q/K/V input gradients was 4% over."""
    assert_charged_flops_are_counted(model, layout, (8,) * 6 if layout.method == "lora" else None)


@pytest.mark.parametrize("depth", [1, 3])
def test_charged_flops_of_a_decoder_are_those_torch_counts(tiny_decoder, depth):
    """The same on a decoder's blocks: grouped-query attention, gated MLP, LoRA on every projection."""
    decoder = SharedModel.build(str(tiny_decoder), num_labels=2, seed=0)
    decoder.add_adapters(AdapterLayout.uniform_lora(3, 4), lora_alpha=8, lora_dropout=0.0, seed=0)
    assert_charged_flops_are_counted(decoder, AdapterLayout("lora", (0,) * (3 - depth) + (4,) * depth), (4,) * 3)


def assert_charged_flops_are_counted(model, layout, applied):
    spec, (sequences, length) = ModelSpec.of(model), (4, 32)
    attention = model.module.config._attn_implementation
    model.module.config._attn_implementation = "eager"
    try:
        model.set_trainable(layout)
        ids = torch.randint(1000, 2000, (sequences, length))
        with FlopCounterMode(display=False) as counter:
            model.module(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1] * (sequences // 2))).loss.backward()
    finally:
        model.module.config._attn_implementation = attention
        model.module.zero_grad(set_to_none=True)
    assert training_flops(spec, layout, Batches.of([(sequences, length)]), applied) == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_forward_flops_grow_with_the_attention_length_term(model):
    spec = ModelSpec.of(model)
    short, long = Batches.of([(4, 32)]), Batches.of([(2, 64)])  # same tokens, longer sequences
    assert short.tokens == long.tokens
    assert (
        block_forward_flops(spec, long, 0) - block_forward_flops(spec, short, 0)
        == 4 * (long.token_pairs - short.token_pairs) * spec.attention_width
    )


def test_a_layouts_numbers_are_those_of_its_adapter_tensors(model):
    for layout in (top(6), top(2), AdapterLayout("lora", (0, 0, 2, 4, 8, 8)), AdapterLayout("lora", (8,) * 6, train_factors=("lora_B",))):
        assert layout_numel(model, layout) == numel(model.read(layout))
        assert layout_numel(model, layout) == lora_numel(ModelSpec.of(model), layout.rank_by_block, layout.train_factors)
    h, head = 384, 2 * 384 + 2
    assert wire_bytes(layout_numel(model, AdapterLayout("lora", (0, 0, 2, 4, 8, 8))), "float16") == 2 * (2 * 2 * h * (2 + 4 + 8 + 8) + head)


def test_quantized_block_weights_shrink_the_memory_estimate_by_their_bytes(model):
    """model.quantize: the blocks' linear weights at NF4's 4.127 bits (or 8 bits); embeddings, norms and head stay float32."""
    spec, work = ModelSpec.of(model), Batches.uniform(5, 16, 64)
    full = training_memory_bytes(spec, top(2), work)
    for quantize, saved_per_weight in (("4bit", 4 - 4.127 / 8), ("8bit", 3.0)):
        quantized = training_memory_bytes(dataclasses.replace(spec, block_weight_bytes=QUANTIZED_BYTES[quantize]), top(2), work)
        assert full - quantized == pytest.approx(saved_per_weight * spec.num_blocks * spec.block_linear_params)


@pytest.mark.parametrize("strategy", ["federa", "flora", "fedex", "bitfit", "fedavg-full", "legend"])
def test_qlora_refuses_strategies_that_touch_the_base_weights(model, strategy):
    """Checked once the strategy exists, on the GPU (on a CPU the missing GPU is the first line)."""
    config = load_config(QUICKSTART, ["model.quantize=4bit", f"strategy.name={strategy}"])
    with (
        contextlib.nullcontext()
        if strategy == "legend"
        else pytest.raises(LegendError, match=rf"model.quantize '4bit' keeps the base weights frozen .* and {strategy} ")
    ):
        check_layout(config, strategy_class(strategy)(config, model.info), model.info.num_blocks)


def test_memory_grows_with_depth_and_a_plan_that_does_not_fit_is_refused(model):
    spec, work = ModelSpec.of(model), Batches.uniform(5, 16, 64)
    sizes = [training_memory_bytes(spec, top(d), work) for d in range(1, 7)]
    assert sizes == sorted(sizes) and sizes[0] > 4 * spec.total_params
    require_fits(spec, top(6), work, CATALOG["jetson-nano"].memory_gb, "client 0")
    with pytest.raises(LegendError, match=r"client 3 \(tiny\) cannot train this plan: it needs .* GB .* lower train.batch_size"):
        require_fits(spec, AdapterLayout("full"), work, 0.2, "client 3 (tiny)")


def test_jetson_mix_80_binds_clients_seeded_and_links_fluctuate_per_round():
    fleet = build_fleet(DevicesConfig(), num_clients=80, seed=0)
    assert len(fleet.devices) == 80 and sorted(fleet.binding) == list(range(80))
    assert {d.kind for d in fleet.devices} == {"jetson-nano", "jetson-tx2", "jetson-xavier-nx", "jetson-agx-xavier", "jetson-agx-orin"}
    assert fleet.binding == build_fleet(DevicesConfig(), 80, seed=0).binding != build_fleet(DevicesConfig(), 80, seed=1).binding
    links = [fleet.link(3, r, seed=0) for r in range(1, 50)]
    assert links[0] == fleet.link(3, 1, seed=0)
    up = np.array([link.uplink for link in links]) * 8 / 1e6
    assert len(set(up)) == len(up) and 5 < np.median(up) < 20  # around the Jetsons' median of 10 Mbit/s


def test_user_profiles_and_lists_make_a_fleet_and_availability_thins_rounds():
    cfg = DevicesConfig.model_validate(
        {
            "fleet": [{"profile": "my-phone", "count": 30}, {"profile": "laptop-cpu", "count": 10}],
            "profiles": {
                "my-phone": {
                    "peak_flops": 1e11,
                    "efficiency": 0.3,
                    "memory_gb": 2,
                    "uplink_mbps": 5,
                    "downlink_mbps": 20,
                    "availability": 0.5,
                }
            },
        }
    )
    fleet = build_fleet(cfg, num_clients=40, seed=0)
    assert [d.kind for d in fleet.devices].count("my-phone") == 30 and fleet.devices[0].profile.flops == pytest.approx(3e10)
    shares = [len(fleet.available(r, seed=0)) / 40 for r in range(1, 200)]
    assert 0.5 < np.mean(shares) < 0.75  # 30 at 0.5 and 10 at 0.9 -> 0.6
    with pytest.raises(LegendError, match="unknown device profile 'nope'"):
        build_fleet(DevicesConfig(fleet=[{"profile": "nope", "count": 1}]), 1, 0)


def test_metrics_carry_virtual_time_and_summary_the_time_to_target(tmp_path):
    config = load_config(QUICKSTART, tiny_overrides(**{"eval.target_accuracy": 0.0, "eval.every": 1}))
    summary = run_experiment(config, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["virtual_time_s"] == 0
    for row in rows[1:]:
        assert row["round_time_s"] == max(d["total_s"] for d in row["devices"]) > 0
        assert row["bytes_up"] == sum(d["bytes_up"] for d in row["devices"])
        for d in row["devices"]:
            assert d["total_s"] == pytest.approx(d["download_s"] + d["compute_s"] + d["upload_s"], abs=1e-3)
    assert rows[2]["virtual_time_s"] == pytest.approx(rows[1]["round_time_s"] + rows[2]["round_time_s"], abs=1e-3)
    assert summary["time_to_target_s"] == rows[1]["virtual_time_s"] and summary["virtual_time_s"] == rows[2]["virtual_time_s"]


def test_deadline_drops_devices_from_the_aggregate(tmp_path):
    config = load_config(QUICKSTART, tiny_overrides(**{"devices.deadline_s": 1e-3}))
    summary = run_experiment(config, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["dropped"] == r["clients"] and r["bytes_up"] == 0 and r["round_time_s"] == 1e-3 for r in rows[1:])
    assert summary["final_accuracy"] == summary["initial_accuracy"]  # nothing arrived, nothing changed


def test_a_plan_too_big_for_the_device_is_one_error_line(tmp_path):
    overrides = tiny_overrides(**{"devices.fleet": "tiny", "strategy.name": "fedavg-full"})
    overrides += ["devices.profiles.tiny={peak_flops=1e11, efficiency=1.0, memory_gb=0.1, uplink_mbps=10, downlink_mbps=10}"]
    config_file = tmp_path / "c.toml"
    config_file.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "legend", "run", str(config_file), *overrides, "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip().startswith("error: client")
        and "(tiny) cannot train this plan" in result.stderr
        and len(result.stderr.strip().splitlines()) == 1
    )


def test_devices_command_prints_the_fleet():
    result = subprocess.run([sys.executable, "-m", "legend", "devices"], capture_output=True, text=True, check=True)
    for kind in ("jetson-nano", "jetson-agx-orin"):
        assert kind in result.stdout
    assert "80 devices" in result.stdout


def test_links_are_in_bytes_per_second():
    fleet = build_fleet(DevicesConfig(fleet="laptop-cpu"), num_clients=1, seed=0)
    link = fleet.link(0, 1, seed=0)
    assert isinstance(link, Link) and 1e6 < link.uplink < 1e7  # 20 Mbit/s is 2.5 MB/s, times exp(N(0, 0.5^2))


@pytest.mark.parametrize("strategy", ["legend", "hetlora", "flexlora", "fedit", "federa"])
def test_each_device_is_charged_the_compute_of_its_own_layout_in_a_real_run(tmp_path, strategy):
    """The path every speedup rests on: a run's recorded compute seconds per device are training_flops of that device's
    own layout (LEGEND's depth and ranks, HetLoRA's and FlexLoRA's ranks, the frozen global adapters applied above) on its
    own batches, at its profile's FLOP/s. Where layouts differ, the mutant that charges the global layout instead is shown
    to differ on every device below it, so the check can fail; FedIT and FeDeRA give every device the global layout."""
    from legend.devices.cost import applied_ranks
    from legend.engine.client import batch_shapes, client_batches, derived_seed, passes
    from legend.engine.simulation import build_experiment

    overrides = tiny_overrides(
        **{"strategy.name": strategy, "fl.clients_per_round": 4, "train.local_steps": 4, "devices.fleet": '"jetson-mix-80"'}
    )
    config = load_config(QUICKSTART, overrides)
    run_experiment(config, tmp_path)
    exp = build_experiment(config)
    global_layout = exp.strategy.global_layout()
    charged = own = mutant = 0
    for row in [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][1:]:
        for device in row["devices"]:
            client = device["client"]
            layout = AdapterLayout("lora", tuple(device["rank_by_block"]))
            work = Batches.of(
                batch_shapes(
                    exp.train,
                    passes(
                        exp.train,
                        client_batches(exp.train, exp.partitions[client], config.train, derived_seed(config.seed, row["round"], client)),
                        config.train,
                    ),
                )
            )
            flops_per_s = exp.fleet.device_of(client).profile.flops
            expected = training_flops(exp.spec, layout, work, applied_ranks(layout, global_layout)) / flops_per_s
            assert device["compute_s"] == pytest.approx(expected, abs=5.1e-5), (row["round"], client)  # the row keeps 4 decimals
            charged, own = charged + 1, own + (layout != global_layout)
            mutant += (
                abs(training_flops(exp.spec, global_layout, work, global_layout.rank_by_block) / flops_per_s - device["compute_s"]) > 5.1e-5
            )  # beyond the check's tolerance: the assert above would catch it
    assert charged == 8 and mutant == own  # every device below the global layout would be charged wrongly by the mutant
    assert (own > 0) == (strategy in ("legend", "hetlora", "flexlora"))
