"""FeDeRA: the SVD initialisation keeps the model's function, is identical on every client, and fits per-block ranks."""

import pytest
import torch
from peft.tuners.lora import LoraLayer
from tests.conftest import DATA, ROOT, tiny_overrides

from legend.config import load_config
from legend.core import ModelInfo
from legend.data.batching import encode
from legend.data.tasks import load_task
from legend.engine.simulation import build_model, run_experiment
from legend.errors import LegendError
from legend.lora import AdapterLayout
from legend.lora.init import federa_factors
from legend.models.shared import SharedModel
from legend.strategies.flora import FLoRA

LEGEND_RAMP = (2, 5, 8, 10, 13, 16)


def test_factors_are_the_principal_part_and_the_residual_the_rest():
    weight = torch.randn(12, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, b, residual = federa_factors(weight, rank=3, scaling=2.0)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    assert torch.allclose(2.0 * b @ a, u[:, :3] @ torch.diag(s[:3]) @ vh[:3], atol=1e-12)  # s B A = best rank-3 approximation
    assert torch.allclose(residual + 2.0 * b @ a, weight, atol=1e-12)
    assert torch.allclose(b.T @ b, a @ a.T, atol=1e-12)  # the singular values split evenly between A and B
    assert (b.gather(0, b.abs().argmax(dim=0, keepdim=True)) > 0).all()  # fixed signs: no freedom left


def test_the_same_weight_always_gives_bit_identical_factors():
    weight = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    a, b, residual = federa_factors(weight, 4, 0.5)
    a2, b2, residual2 = federa_factors(weight.clone(), 4, 0.5)
    assert torch.equal(a, a2) and torch.equal(b, b2) and torch.equal(residual, residual2)


def sentences(model: SharedModel, rows: int = 16) -> dict[str, torch.Tensor]:
    task = load_task(load_config(None, [f'data.path="{DATA / "sst2"}"']).data)
    return encode(task.test.select(range(rows)), model.tokenizer, 64).batch(list(range(rows)))


def logits(model: SharedModel, batch) -> torch.Tensor:
    model.module.eval()
    with torch.no_grad():
        return model.module(**{k: v for k, v in batch.items() if k != "labels"}).logits


def adapted(name: str, layout: AdapterLayout, init: str) -> SharedModel:
    model = SharedModel.build(name, num_labels=2, seed=0)
    model.add_adapters(layout, lora_alpha=16.0, lora_dropout=0.0, seed=0, lora_init=init)
    return model


@pytest.mark.parametrize("ranks", [(8,) * 6, LEGEND_RAMP, (0, 0, 0, 4, 8, 16)], ids=["uniform", "legend-ramp", "legend-depth-3"])
def test_logits_unchanged_and_two_clients_build_bit_identical_adapters(ranks):
    layout = AdapterLayout("lora", ranks)
    plain = adapted("minilm-l6", layout, "default")
    client, other_client = adapted("minilm-l6", layout, "federa"), adapted("minilm-l6", layout, "federa")
    batch = sentences(plain)
    assert (logits(client, batch) - logits(plain, batch)).abs().max() <= 1e-4
    for key, value in client.params.items():
        assert torch.equal(value, other_client.params[key]), key  # adapters, residual weights, everything
    a_key = next(k for k in client.params if ".lora_A." in k and client.block_of(k) == 5)
    assert client.params[a_key].abs().sum() > 0 and client.params[a_key.replace("lora_A", "lora_B")].abs().sum() > 0
    w_key = a_key.split(".lora_A.")[0] + ".base_layer.weight"
    assert not torch.equal(client.params[w_key], plain.params[w_key])  # the principal part left the frozen weight


def test_decoder_model_keeps_its_logits():
    """SmolLM2-135M (30 LLaMA blocks; v_proj is 192 x 576): every adapted layer, rank 4."""
    layout = AdapterLayout.uniform_lora(30, 4)
    plain, federa = adapted("smollm2-135m", layout, "default"), adapted("smollm2-135m", layout, "federa")
    batch = sentences(plain, rows=4)
    assert (logits(federa, batch) - logits(plain, batch)).abs().max() <= 1e-4


def test_federa_init_on_a_strategy_without_lora_is_one_error_line():
    with pytest.raises(LegendError, match="lora.init 'federa' initialises LoRA adapters"):
        build_model(load_config(ROOT / "configs" / "quickstart.toml", ["strategy.name=bitfit", "lora.init=federa"]), ("0", "1"))


def test_legend_with_federa_init_trains_per_block_ranks_end_to_end(tmp_path):
    overrides = tiny_overrides(**{"strategy.name": "legend", "lora.init": '"federa"', "fl.rounds": 1})
    summary = run_experiment(load_config(ROOT / "configs" / "quickstart.toml", overrides), tmp_path)
    assert summary["rounds"] == 1 and 0.0 <= summary["final_accuracy"] <= 1.0


@pytest.mark.parametrize("scaling", ["uniform", "rank"])
def test_legend_with_federa_init_keeps_the_function_and_each_block_holds_its_own_rank_factors(scaling):
    """LEGEND's global layout (ranks rising toward the output, none below its depth) under lora.init=federa: the model computes
    the base model's logits, and every adapted layer of block l holds B = U_r diag(sqrt(S_r / s)), A = diag(sqrt(S_r / s)) V_r^T and
    W_res = W - s B A, with that block's own rank r_l and scaling s_l (the SVD of the pre-trained W, in float64)."""
    config = load_config(
        ROOT / "configs" / "quickstart.toml",
        tiny_overrides(**{"strategy.name": "legend", "lora.init": '"federa"', "legend.scaling": f'"{scaling}"'}),
    )
    model, _, legend = build_model(config, ("0", "1"))
    base = SharedModel.build("minilm-l6", num_labels=2, seed=config.seed)  # the same head, drawn from the same seed; no adapters
    batch = sentences(base)
    assert (logits(model, batch) - logits(base, batch)).abs().max() <= 1e-4
    layers = {name: layer for name, layer in model.module.named_modules() if isinstance(layer, LoraLayer)}
    assert {model.info.block_of(name + ".") for name in layers} == {b for b, r in enumerate(legend.global_ranks) if r > 0}
    for name, layer in layers.items():
        block = model.info.block_of(name + ".")
        rank, s = layer.r["default"], layer.scaling["default"]
        assert rank == legend.global_ranks[block]
        assert s == pytest.approx(config.lora.alpha / (config.lora.r if scaling == "uniform" else rank))
        weight = base.params[name + ".weight"].double()
        u, singular, vh = torch.linalg.svd(weight, full_matrices=False)
        root = torch.sqrt(singular[:rank] / s)
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        sign = torch.where((b * u[:, :rank]).sum(0) < 0, -1.0, 1.0).double()  # an exact SVD fixes each singular pair up to its sign
        assert torch.allclose(b, u[:, :rank] * root * sign, atol=1e-5), name
        assert torch.allclose(a, (root * sign)[:, None] * vh[:rank], atol=1e-5), name
        assert torch.allclose(layer.get_base_layer().weight.double(), weight - s * b @ a, atol=1e-5), name


def test_flora_refuses_federa_init():
    with pytest.raises(LegendError, match="does not combine with flora"):
        FLoRA(load_config(None, ["lora.init=federa"]), ModelInfo("bert", 6, 384, ("query", "value")))
