"""FedRA: the per-layer aggregation against its formula, the random allocation, skipped blocks in the real model, their cost."""

import json
from collections import Counter

import pytest
import torch
from tests.conftest import ROOT, NodesInThisProcess, tiny_overrides
from tests.test_legend import SPEC, H
from torch.utils.flop_counter import FlopCounterMode

from legend.config import load_config
from legend.core import ClientPlan, ModelInfo, Update
from legend.devices.capacity import Capacity, DeviceView
from legend.devices.cost import Batches, ModelSpec, applied_ranks, training_flops, training_memory_bytes
from legend.engine.runtime import Job
from legend.engine.simulation import build_experiment, run_experiment
from legend.errors import LegendError
from legend.lora.layout import AdapterLayout
from legend.models.shared import SharedModel
from legend.records import MEASURED
from legend.strategies.fedra import FedRA

QUICKSTART = ROOT / "configs" / "quickstart.toml"

MINILM = ModelInfo("bert", 6, H, ("query", "value"), "bert.encoder.layer")
WORK = Batches.uniform(5, 16, 32)


def fedra(*overrides, info=MINILM):
    return FedRA(load_config(None, ["strategy.name=fedra", *overrides]), info)


def view(flops, memory_gb=8.0):
    """Devices that differ in compute (FLOP/s each) on links so fast that compute alone sets their round times."""
    capacity = {
        c: Capacity(f"d{c}", f, 1e15, 1e15, memory_gb[c] if isinstance(memory_gb, list) else memory_gb) for c, f in enumerate(flops)
    }
    return DeviceView(SPEC, capacity, {c: WORK for c in capacity}, wire_dtype="float32")


def lora_key(block, factor):
    return f"layers.{block}.m.lora_{factor}.default.weight"


def test_each_layer_is_averaged_over_exactly_the_devices_that_held_it():
    """theta_l = sum_k M_kl n_k theta_kl / sum_k M_kl n_k; a layer no device held keeps its value; the head: every device's mean."""
    strategy = fedra("lora.r=1", info=ModelInfo("bert", 3, 6, ("m",), "layers"))
    gen = torch.Generator().manual_seed(0)
    state = {lora_key(b, f): torch.randn(shape, generator=gen) for b in range(3) for f, shape in (("A", (1, 6)), ("B", (6, 1)))}
    state["classifier.weight"] = torch.randn(2, 6, generator=gen)
    held = {0: (0, 1), 1: (0,), 2: (1,)}  # M: nobody holds layer 2
    samples = {0: 10, 1: 30, 2: 20}
    updates = [
        Update(
            c,
            {
                k: torch.randn(v.shape, generator=gen)
                for k, v in state.items()
                if k.startswith("classifier") or int(k.split(".")[1]) in blocks
            },
            samples[c],
        )
        for c, blocks in held.items()
    ]
    new = strategy.aggregate(1, state, updates)
    sent = {u.client: u.weights for u in updates}
    for factor in ("A", "B"):
        key0, key1, key2 = (lora_key(b, factor) for b in range(3))
        torch.testing.assert_close(new[key0], (10 * sent[0][key0] + 30 * sent[1][key0]) / 40)
        torch.testing.assert_close(new[key1], (10 * sent[0][key1] + 20 * sent[2][key1]) / 30)
        assert torch.equal(new[key2], state[key2])
    torch.testing.assert_close(new["classifier.weight"], sum(samples[c] * sent[c]["classifier.weight"] for c in held) / 60)


def test_layer_counts_follow_the_devices_speed_then_their_memory():
    """L_k = floor(L x t_fastest / t_k) in [1, L]: 6, floor(6 x 0.4) = 2, max(1, floor(0.6)) = 1; a fast device whose memory
    holds only two blocks' training gets 2."""
    strategy = fedra()
    need = [training_memory_bytes(SPEC, strategy.device_layout(range(k)), WORK) for k in range(1, 7)]
    assert need == sorted(set(need))  # fewer blocks, less memory
    devices = view([1e12, 0.4e12, 0.1e12, 1e12], memory_gb=[8.0, 8.0, 8.0, (need[1] + need[2]) / 2 / 1e9])
    assert strategy.layer_counts(devices, [0, 1, 2, 3]) == {0: 6, 1: 2, 2: 1, 3: 2}


def test_the_allocation_is_random_each_round_fixed_by_the_seed_and_gives_each_device_its_count():
    devices, clients = view([1e12, 0.4e12, 0.1e12]), [0, 1, 2]
    counts = {0: 6, 1: 2, 2: 1}
    rounds = {r: fedra().plan(r, clients, {}, devices) for r in range(1, 21)}
    for plans in rounds.values():
        for client, plan in plans.items():
            layout = plan.layout
            held = [b for b, rank in enumerate(layout.rank_by_block) if rank > 0]
            assert len(held) == counts[client] and set(layout.rank_by_block) <= {0, 8}
            assert layout.skipped_blocks == tuple(b for b in range(6) if b not in held)
    assert len({rounds[r][1].layout for r in rounds}) > 1  # drawn afresh each round
    assert all(fedra().plan(r, clients, {}, devices)[1].layout == rounds[r][1].layout for r in (1, 7))  # the same for the same seed
    assert any(fedra("seed=1").plan(r, clients, {}, devices)[1].layout != rounds[r][1].layout for r in rounds)
    # uniform over the blocks: 600 draws of 2 of 6 blocks hold each block 200 times (sd 11.5)
    frequency = Counter(b for r in range(600) for b in fedra().allocation(r, 1, 2))
    assert sorted(frequency) == list(range(6)) and all(150 < n < 250 for n in frequency.values())


def test_a_device_is_sent_only_its_layers_and_the_head():
    strategy = fedra("lora.r=1", info=ModelInfo("bert", 3, 6, ("m",), "layers"))
    state = {lora_key(b, f): torch.zeros(1) for b in range(3) for f in "AB"} | {"classifier.weight": torch.zeros(1)}
    plan = strategy.plan(1, [1], state, view([1e12, 0.4e12]))[1]  # 3 blocks x 0.4: one block
    (block,) = (b for b in range(3) if b not in plan.layout.skipped_blocks)
    assert plan.weights.keys() == {lora_key(block, "A"), lora_key(block, "B"), "classifier.weight"}


def test_fedra_refuses_parallel_groups_and_a_top_blocks_region():
    with pytest.raises(LegendError, match="set engine.parallel_clients = 1"):
        fedra("engine.parallel_clients=2")
    with pytest.raises(LegendError, match="leave lora.top_blocks at 0"):
        fedra("lora.top_blocks=3")


@pytest.fixture(scope="module")
def model():
    shared = SharedModel.build("minilm-l6", num_labels=2, seed=0)
    shared.add_adapters(AdapterLayout.uniform_lora(6, 8), lora_alpha=16, lora_dropout=0.0, seed=0)
    gen = torch.Generator().manual_seed(1)
    shared.load(
        {key: 0.05 * torch.randn(p.shape, generator=gen) for key, p in shared.params.items() if ".lora_B." in key}
    )  # adapters that act
    return shared


@torch.no_grad()
def test_a_skipped_block_passes_its_input_on_unchanged(model):
    """The model's output with block 2 skipped is the blocks without block 2 run by hand; outside the context all six run."""
    model.module.eval()
    ids = torch.randint(1000, 2000, (3, 16))
    bert = model.module.bert
    hidden = bert.embeddings(input_ids=ids)  # (B, T, H)
    for i, block in enumerate(bert.encoder.layer):
        if i != 2:
            out = block(hidden)
            hidden = out[0] if isinstance(out, tuple) else out
    by_hand = model.module.classifier(bert.pooler(hidden))
    with model.skipping((2,)):
        skipped = model.module(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    whole = model.module(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(skipped, by_hand, rtol=1e-4, atol=1e-5)
    assert (whole - by_hand).abs().max() > 1e-3  # block 2 matters: the check can fail
    assert len(model._blocks()) == 6


def test_skipped_blocks_cost_nothing_in_flops_and_memory(model):
    """Against torch's FLOP counter on a real step of the shallower model (eager attention): within 1%, as the whole model's."""
    layout = AdapterLayout("lora", (0, 8, 0, 8, 8, 0), skipped_blocks=(0, 2, 5))
    whole = AdapterLayout("lora", (0, 8, 8, 8, 8, 8))  # the same lowest block, nothing skipped
    spec, (sequences, length) = ModelSpec.of(model), (4, 32)
    attention = model.module.config._attn_implementation
    model.module.config._attn_implementation = "eager"
    model.module.train()
    try:
        model.set_trainable(layout)
        ids = torch.randint(1000, 2000, (sequences, length))
        with FlopCounterMode(display=False) as counter, model.skipping(layout.skipped_blocks):
            model.module(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1] * (sequences // 2))).loss.backward()
    finally:
        model.module.config._attn_implementation = attention
        model.module.zero_grad(set_to_none=True)
    batches = Batches.of([(sequences, length)])
    charged = training_flops(spec, layout, batches, applied_ranks(layout, AdapterLayout.uniform_lora(6, 8)))
    assert charged == pytest.approx(counter.get_total_flops(), rel=0.01)
    assert charged < 0.6 * training_flops(spec, whole, batches, (8,) * 6)  # 3 blocks of 6 run
    assert training_memory_bytes(spec, layout, batches) < training_memory_bytes(spec, whole, batches)


def test_local_training_runs_only_the_blocks_a_device_holds(tmp_path):
    """A tiny real run: each block runs in training exactly local_steps times per device that held it that round (the devices'
    layouts as the run recorded them; whole batches, one pass a step); evaluation runs every block."""
    config = load_config(QUICKSTART, tiny_overrides(**{"strategy.name": "fedra", "train.split_by_length": "false"}))
    exp = build_experiment(config)
    calls = Counter()
    for i, block in enumerate(exp.model._blocks()):
        block.register_forward_pre_hook(lambda module, args, i=i: calls.update([(i, exp.model.module.training)]))
    run_experiment(config, tmp_path, experiment=exp)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    devices = [d for row in rows for d in row["devices"]]
    assert any(0 in d["rank_by_block"] for d in devices)  # some device held fewer than all 6 blocks
    steps = config.train.local_steps
    assert [calls[(i, True)] for i in range(6)] == [steps * sum(d["rank_by_block"][i] > 0 for d in devices) for i in range(6)]
    assert len({calls[(i, False)] for i in range(6)}) == 1 and calls[(0, False)] > 0


def test_the_skipped_blocks_cross_the_flower_wire():
    from legend.flower.messages import job_from_meta, job_meta

    layout = AdapterLayout("lora", (8, 0, 8, 0, 0, 8), skipped_blocks=(1, 3, 4))
    job = Job(3, ClientPlan(2, layout, {}, 0.01), 7)
    assert job_from_meta(json.loads(json.dumps(job_meta(job))), {}).plan.layout == layout


def test_fedra_through_flower_with_secure_sums_gives_the_embedded_run(tmp_path, server_identity):
    """In-process Flower nodes (real ClientApps): the jobs carry the skipped blocks, SecAgg+ sums updates that leave out
    whole layers, and the coverage guard cuts what fewer than two devices hold; the summary is the embedded run's."""
    pytest.importorskip("flwr", reason="the Flower extra is not installed: pip install -e '.[flower]'")
    from flwr.app import Context, RecordDict

    from legend.flower.runtime import FlowerRuntime

    three = {"strategy.name": "fedra", "data.train_size": 300, "fl.num_clients": 3, "fl.clients_per_round": 3, "fl.min_clients": 2}
    config = load_config(QUICKSTART, tiny_overrides(**three, **{"flower.secure_aggregation": "true"}))
    exp = build_experiment(config)
    nodes = {1000 + c: {"client-id": c, "device": exp.fleet.device_of(c).kind, "state-dir": str(tmp_path)} for c in range(3)}
    runtime = FlowerRuntime(
        NodesInThisProcess(nodes, {"experiment": json.dumps(config.model_dump(mode="json"))}),
        config.flower,
        Context(1, 0, {}, RecordDict(), {}),
    )
    runtime.connect(exp)
    secure = run_experiment(config, tmp_path / "secure", experiment=exp, runtime=runtime)
    embedded = run_experiment(load_config(QUICKSTART, tiny_overrides(**three, **{"fl.min_coverage": 2})), tmp_path / "embedded")
    rows = [json.loads(line) for line in (tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()]
    assert any(0 in d["rank_by_block"] for row in rows for d in row["devices"])  # layers left out
    for key in secure.keys() - set(MEASURED):
        assert secure[key] == (pytest.approx(embedded[key], abs=1e-5) if isinstance(embedded[key], float) else embedded[key]), key


@torch.no_grad()
def test_a_decoder_skips_a_block_too(tiny_decoder):
    """On SmolLM2's blocks (rotary positions, a KV cache keyed by layer): with block 1 left out, block 2 reads exactly what
    block 0 wrote and block 1 never runs; the logits change."""
    decoder = SharedModel.build(str(tiny_decoder), num_labels=2, seed=0)
    decoder.module.eval()
    blocks, seen = decoder._blocks(), {}

    def wrote(module, args, output):
        seen["wrote"] = output[0] if isinstance(output, tuple) else output

    def reads(module, args, kwargs):
        seen["reads"] = args[0] if args else kwargs["hidden_states"]

    def ran(module, args):
        seen["ran"] = True

    handles = [
        blocks[0].register_forward_hook(wrote),
        blocks[2].register_forward_pre_hook(reads, with_kwargs=True),
        blocks[1].register_forward_pre_hook(ran),
    ]
    ids = torch.randint(1000, 2000, (2, 12))
    try:
        with decoder.skipping((1,)):
            skipped = decoder.module(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert "ran" not in seen and torch.equal(seen["reads"], seen["wrote"])
        whole = decoder.module(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert seen["ran"] and (whole - skipped).abs().max() > 1e-3
    finally:
        for handle in handles:
            handle.remove()


def test_fedra_instruction_tunes_a_decoder(tiny_decoder, tmp_path):
    overrides = tiny_overrides(
        **{
            "model.name": f'"{tiny_decoder}"',
            "data.format": '"instruct"',
            "data.train_size": 200,
            "data.test_size": 32,
            "strategy.name": "fedra",
        }
    )
    summary = run_experiment(load_config(QUICKSTART, overrides), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["rounds"] == 2 and summary["final_loss"] != summary["initial_loss"]
    assert any(0 in d["rank_by_block"] for row in rows for d in row["devices"])  # a device left blocks out
