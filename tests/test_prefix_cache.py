"""The frozen-prefix cache: the blocks above it see what they would have computed, training gives the same
adapter with the cache on and off (tolerances below), eviction and spilling change nothing, and a write to
a frozen tensor clears it."""

import pytest
import torch
from tests.conftest import ROOT, tiny_overrides

from legend.config import load_config
from legend.engine.checkpoint import CHECKPOINT
from legend.engine.prefix_cache import PrefixCache, training_reuse
from legend.engine.simulation import build_experiment, run_experiment

QUICKSTART = ROOT / "configs" / "quickstart.toml"
# 2 clients x 10 steps x 8 = 160 samples of 40 examples: each is trained on 4 times, enough for training to read the cache
LEGEND_ONE_ROUND = {"strategy.name": "legend", "fl.rounds": 1, "train.local_steps": 10, "data.train_size": 40}


def trained_adapter(tmp_path, name, **engine):
    config = load_config(QUICKSTART, tiny_overrides(**LEGEND_ONE_ROUND, **{f"engine.{k}": v for k, v in engine.items()}))
    if engine.get("cache_mb") != 0:
        assert build_experiment(config).prefix.trains
    summary = run_experiment(config, tmp_path / name)
    return torch.load(tmp_path / name / CHECKPOINT, weights_only=True)["global_state"], summary


def relative_l2(a, b):
    return (sum(((a[k] - b[k]) ** 2).sum() for k in a) / sum((b[k] ** 2).sum() for k in b)).sqrt().item()


@pytest.mark.parametrize("model_name, boundary", [("minilm-l6", 2), ("smollm2-135m", 10)])
def test_the_blocks_above_the_boundary_see_what_the_prefix_computes(model_name, boundary):
    """LEGEND's global layout leaves the lowest third without LoRA; from the cached (float32) states the logits
    of a padded batch equal the full forward pass (encoder and decoder)."""
    overrides = tiny_overrides(
        **{
            "strategy.name": "legend",
            "model.name": model_name,
            "lora.r": 4,
            "data.train_size": 100,
            "data.test_size": 8,
            "engine.cache_dtype": "float32",
        }
    )
    exp = build_experiment(load_config(QUICKSTART, overrides))
    assert exp.prefix is not None and exp.prefix.boundary == boundary
    exp.model.load({k: torch.randn_like(v) * 0.1 for k, v in exp.strategy.initial_state(exp.model).items()})  # non-zero adapters
    exp.model.module.eval()
    rows = exp.test.lengths.argsort()[[0, 3, 7]]  # different lengths: the batch is padded
    batch = exp.test.batch(rows)
    with torch.no_grad():
        full = exp.model.module(**batch).logits
        with exp.model.starting_at(boundary, exp.prefix_view("test").hidden(rows)):
            cached = exp.model.module(**batch).logits
    assert torch.allclose(cached, full, atol=1e-4, rtol=0), (cached - full).abs().max()


def test_cached_and_uncached_training_give_the_same_adapter_after_a_round(tmp_path):
    """Tolerances: float32 storage, max abs difference 1e-4 (AdamW's first steps are nearly sign(gradient), so
    coordinates whose gradient is ~0 amplify float noise); float16 storage, relative L2 difference 1e-2 (measured 2e-3)
    and the evaluation loss to 1e-4."""
    uncached, summary = trained_adapter(tmp_path, "off", cache_mb=0)
    exact, _ = trained_adapter(tmp_path, "float32", cache_dtype="float32")
    half, half_summary = trained_adapter(tmp_path, "float16")
    assert max((exact[k] - uncached[k]).abs().max().item() for k in uncached) <= 1e-4
    assert relative_l2(half, uncached) <= 1e-2
    assert half_summary["final_loss"] == pytest.approx(summary["final_loss"], abs=1e-4)


def test_eviction_and_spilling_leave_the_result_bit_identical(tmp_path):
    roomy, _ = trained_adapter(tmp_path, "roomy")
    evicting, _ = trained_adapter(tmp_path, "evicting", cache_mb=0.05)  # ~10 examples fit
    spilling, _ = trained_adapter(tmp_path, "spilling", cache_mb=0.05, cache_spill_dir=str(tmp_path))
    assert all(torch.equal(roomy[k], evicting[k]) and torch.equal(roomy[k], spilling[k]) for k in roomy)


def test_a_device_tier_before_host_memory_leaves_the_result_bit_identical(tmp_path):
    """engine.cache_device_mb's tier (on a GPU its memory; here the CPU's, the same logic): the most recently used
    examples there, the rest in host memory and the spill file, as the run moves them back and forth."""
    roomy, _ = trained_adapter(tmp_path, "roomy")
    config = load_config(QUICKSTART, tiny_overrides(**LEGEND_ONE_ROUND))
    exp = build_experiment(config)
    exp.prefix = PrefixCache(
        exp.model, exp.prefix.boundary, 0.05, config.engine.cache_dtype, str(tmp_path), trains=True, device_limit_mb=0.03
    )
    run_experiment(config, tmp_path / "tiered", experiment=exp)
    tiered = torch.load(tmp_path / "tiered" / CHECKPOINT, weights_only=True)["global_state"]
    assert all(torch.equal(roomy[k], tiered[k]) for k in roomy)
    assert exp.prefix.on_device and exp.prefix.entries and exp.prefix.spilled  # every tier held examples
    assert exp.prefix.device_bytes <= 0.03 * 2**20 and exp.prefix.bytes <= 0.05 * 2**20


def test_training_reads_the_cache_only_when_examples_come_back_often_enough():
    """Computing an example alone costs ~3x its share of a batched pass: a run that trains on each example less
    than MIN_TRAINING_REUSE times trains uncached (evaluation still reads the cache)."""
    once = build_experiment(load_config(QUICKSTART, tiny_overrides(**{**LEGEND_ONE_ROUND, "train.local_steps": 2})))
    assert training_reuse(once.config, len(once.train)) == pytest.approx(0.8)
    assert once.prefix is not None and not once.prefix.trains and once.prefix_view("train") is None and once.prefix_view("test") is not None
    dropout = build_experiment(load_config(QUICKSTART, tiny_overrides(**{**LEGEND_ONE_ROUND, "model.dropout": 0.1})))
    assert not dropout.prefix.trains  # every pass through the skipped blocks would differ


def test_a_write_to_a_frozen_tensor_clears_the_cache():
    exp = build_experiment(load_config(QUICKSTART, tiny_overrides(**{"strategy.name": "legend", "data.test_size": 8})))
    view, rows = exp.prefix_view("test"), [0, 1]
    before = view.hidden(rows)
    assert torch.equal(view.hidden(rows), before) and (exp.prefix.hits, exp.prefix.misses) == (2, 2)
    with torch.no_grad():
        exp.model.params["bert.embeddings.LayerNorm.bias"].add_(0.5)
    after = view.hidden(rows)
    assert not torch.allclose(after, before) and exp.prefix.misses == 4


@pytest.mark.parametrize("strategy", ["fedit", "flora", "fedex", "bitfit", "fedavg-full"])
def test_strategies_that_change_every_block_or_the_embeddings_run_uncached(strategy):
    """FedIT adapts block 0; FLoRA and FedEx-LoRA write into every adapted weight; BitFit and full FT train the embeddings."""
    exp = build_experiment(load_config(QUICKSTART, tiny_overrides(**{"strategy.name": strategy, "data.test_size": 8})))
    assert exp.prefix is None
