import pytest
import torch

from legend.lora import AdapterLayout
from legend.models.shared import SharedModel


@pytest.fixture(scope="module")
def model():
    shared = SharedModel.build("minilm-l6", num_labels=2, seed=0)
    shared.add_adapters(AdapterLayout.uniform_lora(shared.info.num_blocks, 8), lora_alpha=16, lora_dropout=0.0, seed=0)
    return shared


def test_blocks_and_targets_are_found(model):
    assert model.info.num_blocks == 6
    assert model.info.target_modules == ("query", "value")
    keys = model.keys(AdapterLayout.uniform_lora(6, 8))
    lora = [k for k in keys if "lora_" in k]
    assert len(lora) == 6 * 2 * 2  # blocks x (query, value) x (A, B)
    assert {model.block_of(k) for k in lora} == set(range(6))
    assert [k for k in keys if "lora_" not in k] == ["classifier.weight", "classifier.bias"]


def test_layout_selects_blocks_factors_and_head(model):
    top_two_b_only = AdapterLayout("lora", (0, 0, 0, 0, 8, 8), train_factors=("lora_B",), train_head=False)
    keys = model.keys(top_two_b_only)
    assert len(keys) == 4 and all(".lora_B." in k and model.block_of(k) in (4, 5) for k in keys)
    assert top_two_b_only.depth == 2
    assert len(model.keys(AdapterLayout("full"))) == len(model.params)


def test_nested_rank_truncation_round_trips(model):
    cut = AdapterLayout("lora", (0, 0, 0, 0, 4, 8))
    full = model.read(AdapterLayout.uniform_lora(6, 8))
    state = model.read(cut)
    a_key = next(k for k in state if model.block_of(k) == 4 and ".lora_A." in k)
    b_key = a_key.replace("lora_A", "lora_B")
    assert state[a_key].shape == (4, 384) and state[b_key].shape == (384, 4)
    assert torch.equal(state[a_key], full[a_key][:4])
    model.load(state)  # a device of rank 4 in block 4: its rows fill the front, the rest is zero
    assert torch.equal(model.params[a_key][:4], state[a_key]) and model.params[a_key][4:].abs().sum() == 0
    model.load(full)


def test_lora_init_is_seeded_and_b_starts_at_zero():
    def adapter(seed):
        shared = SharedModel.build("minilm-l6", num_labels=2, seed=seed)
        shared.add_adapters(AdapterLayout.uniform_lora(6, 8), 16, 0.0, seed=seed)
        return shared.read(AdapterLayout.uniform_lora(6, 8))

    first, again, other = adapter(0), adapter(0), adapter(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["classifier.weight"], other["classifier.weight"])
    assert all(first[k].abs().sum() == 0 for k in first if ".lora_B." in k)


def test_bitfit_trains_every_bias_and_the_head(model):
    keys = model.keys(AdapterLayout("bitfit"))
    assert all(k.endswith(".bias") for k in keys if k != "classifier.weight")
    assert len(keys) == 6 * 8 + 2 + 2  # 8 biases per block, embeddings LayerNorm and pooler, the head's weight and bias
    assert all(not k.endswith(".bias") for k in model.params if k not in keys)


@torch.no_grad()
def test_bottleneck_adapters_start_as_the_identity_and_sit_in_their_blocks():
    plain = SharedModel.build("minilm-l6", num_labels=2, seed=0)
    adapted = SharedModel.build("minilm-l6", num_labels=2, seed=0)
    layout = AdapterLayout("adapter", (0, 0, 0, 0, 16, 16))
    adapted.add_adapters(layout, 16, 0.0, seed=0)
    adapter_keys = [k for k in adapted.keys(layout) if ".bottleneck." in k]
    assert len(adapter_keys) == 2 * 4 and {adapted.block_of(k) for k in adapter_keys} == {4, 5}
    assert adapted.params[adapter_keys[0]].shape == (16, 384)  # down: hidden -> 16
    batch = plain.tokenizer(["a fine film", "dull and far too long"], padding=True, return_tensors="pt")
    plain.module.eval()
    adapted.module.eval()
    assert torch.equal(plain.module(**batch).logits, adapted.module(**batch).logits)  # up-projection starts at zero
    adapted.params[next(k for k in adapter_keys if ".up.bias" in k)].fill_(0.1)
    assert not torch.equal(plain.module(**batch).logits, adapted.module(**batch).logits)  # and it is in the forward pass
