"""Instruction tuning of a decoder (data.format = "instruct"): what a batch holds, the response-only loss, the chat
and plain templates, answer scoring, the frozen-prefix cache under causal attention, every LoRA strategy, and export."""

import dataclasses
import json

import datasets
import numpy as np
import pytest
import torch
from tests.conftest import DATA, ROOT, in_fresh_process, tiny_instruct_overrides
from typer.testing import CliRunner

from legend.cli import app
from legend.config import load_config
from legend.data.batching import model_inputs
from legend.data.instructions import IGNORE, encode_conversations, render
from legend.engine.checkpoint import CHECKPOINT
from legend.engine.client import forward_passes
from legend.engine.simulation import build_experiment, run_experiment
from legend.export import export
from legend.objectives.instruct import normalise_answer

QUICKSTART = ROOT / "configs" / "quickstart.toml"


def instruct_config(decoder, **extra):
    return load_config(QUICKSTART, tiny_instruct_overrides(decoder, **extra))


def test_the_loss_covers_the_response_and_its_end_token_only(tiny_decoder):
    """Targets are -100 on the prompt and the padding; the answer-only logits give HF's own causal-LM loss over every position."""
    exp = build_experiment(instruct_config(tiny_decoder))
    tokenizer, split = exp.model.tokenizer, exp.train
    rows = np.argsort(split.lengths)[[0, -1]]  # a short and a long example: the short one is padded
    batch = split.batch(rows)
    for j, i in enumerate(rows):
        start, end = split.prompt_lengths[i], split.lengths[i]
        assert (batch["labels"][j, :start] == IGNORE).all() and (batch["labels"][j, end:] == IGNORE).all()
        answer = batch["labels"][j, start:end].tolist()
        assert answer[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(answer[:-1]) == ["negative", "positive"][int(split.classes[i])]
    with torch.no_grad():
        ours = exp.objective.loss(exp.model.module, batch)
        theirs = exp.model.module(**model_inputs(batch), labels=batch["labels"]).loss  # logits at every position, shifted inside
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)


def test_the_chat_template_is_applied_and_the_plain_one_is_documented(tiny_decoder):
    exp = build_experiment(instruct_config(tiny_decoder))
    tokenizer, split = exp.model.tokenizer, exp.test
    prompt = tokenizer.decode(split.input_ids[0][: split.prompt_lengths[0]])
    sentence = exp.objective.prompt.format(
        text=datasets.load_dataset("csv", data_files=str(DATA / "sst2" / "test.tsv"), delimiter="\t", split="train")[0]["sentence"]
    )
    assert prompt == tokenizer.apply_chat_template([{"role": "user", "content": sentence}], add_generation_prompt=True, tokenize=False)
    assert render(tokenizer, [{"role": "user", "content": "Say hi."}], chat=False) == "Say hi.\nAnswer:"
    plain = encode_conversations([[{"role": "user", "content": "Say hi."}]], ["hi"], tokenizer, 64, chat=False)
    assert tokenizer.decode(plain.input_ids[0]) == "Say hi.\nAnswer: hi" + tokenizer.eos_token


def test_max_length_covers_prompt_and_response_and_keeps_the_end_of_the_prompt(tiny_decoder):
    exp = build_experiment(instruct_config(tiny_decoder))
    tokenizer = exp.model.tokenizer
    long = "word " * 200
    split = encode_conversations([[{"role": "user", "content": long + "Question?"}]], ["yes"], tokenizer, 32, chat=False)
    assert split.lengths[0] == 32
    assert tokenizer.decode(split.input_ids[0]).endswith("Question?\nAnswer: yes" + tokenizer.eos_token)


def test_exact_match_ignores_case_punctuation_articles_and_spacing():
    assert normalise_answer("  The  Eiffel Tower. ") == normalise_answer("eiffel tower") == "eiffel tower"
    assert normalise_answer("An apple, a day!") == "apple day"
    assert normalise_answer("Paris") != normalise_answer("Paris, France")


def test_cached_and_uncached_response_logits_agree_under_causal_attention(tiny_decoder):
    """LEGEND leaves block 0 of 3 without LoRA: from the cached (float32) states, computed per example alone as training
    does, the loss and the answer scores of a padded batch equal the full forward pass."""
    exp = build_experiment(
        instruct_config(tiny_decoder, **{"strategy.name": "legend", "engine.cache_dtype": "float32", "train.local_steps": 40})
    )
    assert exp.prefix is not None and exp.prefix.boundary == 1 and exp.prefix.trains
    exp.model.load({k: torch.randn_like(v) * 0.1 for k, v in exp.strategy.initial_state(exp.model).items()})  # non-zero adapters
    exp.model.module.eval()
    rows = np.argsort(exp.train.lengths)[[0, 50, -1]]
    batch = exp.train.batch(rows)
    with torch.no_grad():
        full = exp.objective.score(exp.model.module, batch)
        full_logits = exp.objective.choice_logits(exp.model.module, batch)
        with forward_passes(exp.model, rows, exp.prefix_view("train")):
            cached = exp.objective.score(exp.model.module, batch)
            cached_logits = exp.objective.choice_logits(exp.model.module, batch)
    assert exp.prefix.misses == len(rows)
    assert torch.allclose(cached_logits, full_logits, atol=1e-4, rtol=0), (cached_logits - full_logits).abs().max()
    assert cached.loss_sum == pytest.approx(full.loss_sum, abs=1e-4 * full.loss_count) and cached.correct == full.correct


LORA_STRATEGIES = ["fedit", "legend", "federa", "hetlora", "flexlora", "ffa", "fedsa", "fedex", "flora", "fedavg-full"]


@pytest.mark.parametrize("strategy", LORA_STRATEGIES)
def test_every_strategy_runs_two_rounds_on_a_decoder_and_never_sends_the_embeddings_or_the_lm_head(strategy, tiny_decoder, tmp_path):
    config = instruct_config(tiny_decoder, **{"strategy.name": strategy})
    summary = run_experiment(config, tmp_path / "run")
    saved = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    blocks = "model.layers."
    assert saved["global_state"] and all(key.startswith(blocks) for key in saved["global_state"])
    assert summary["rounds"] == 2 and 0 <= summary["final_accuracy"] <= 1 and summary["bytes_up"] > 0
    assert summary["final_loss"] != summary["initial_loss"]  # the global model moved


def jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def sst2_as_instructions(tmp_path_factory):
    """SST-2 sentences as Alpaca rows (train) and chat messages (test): open instruction data with checkable answers."""
    folder = tmp_path_factory.mktemp("instructions")
    words = ["negative", "positive"]
    read = {
        split: datasets.load_dataset("csv", data_files=str(DATA / "sst2" / f"{split}.tsv"), delimiter="\t", split="train")
        for split in ("train", "test")
    }
    jsonl(
        folder / "train.jsonl",
        [
            {"instruction": "Is this review positive or negative?", "input": r["sentence"], "output": words[r["label"]]}
            for r in read["train"].select(range(200))
        ],
    )
    jsonl(
        folder / "test.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": f"Is this review positive or negative?\n\n{r['sentence']}"},
                    {"role": "assistant", "content": words[r["label"]]},
                ]
            }
            for r in read["test"].select(range(8))
        ],
    )
    return folder


def open_instructions(path, **extra):
    """Overrides for FedIT on open instructions (SST-2 written as instructions, IID), scored by 3-token generated answers."""
    return {
        "data.task": "instructions",
        "data.path": f'"{path}"',
        "data.partition": "iid",
        "data.test_size": 0,
        "eval.max_new_tokens": 3,
        "strategy.name": "fedit",
        **extra,
    }


def test_open_instruction_data_is_scored_by_generated_answers(tiny_decoder, sst2_as_instructions, tmp_path):
    overrides = open_instructions(sst2_as_instructions, **{"fl.rounds": 1})
    config = instruct_config(tiny_decoder, **overrides)
    exp = build_experiment(config)
    assert exp.test.classes is None and exp.test.references[0] in ("negative", "positive")
    alpaca = exp.model.tokenizer.decode(exp.train.input_ids[0][: exp.train.prompt_lengths[0]])
    assert alpaca.count("Is this review positive or negative?\n\n") == 1  # instruction, a blank line, the input
    generated = exp.objective.generate(exp.model.module, [exp.test.input_ids[0][: exp.test.prompt_lengths[0]]], exp.test.pad_token_id)
    matches = exp.objective.exact_matches(exp.model.module, exp.test, np.arange(1))
    assert matches == int(normalise_answer(generated[0]) == normalise_answer(exp.test.references[0]))
    summary = run_experiment(config, tmp_path / "run")
    assert summary["final_accuracy"] is not None and summary["final_loss"] > 0
    refused = CliRunner().invoke(
        app,
        [
            "run",
            str(QUICKSTART),
            *tiny_instruct_overrides(tiny_decoder, **{**overrides, "data.partition": "dirichlet"}),
            "--out",
            str(tmp_path / "refused"),
        ],
    )
    assert refused.exit_code == 2 and "data.partition='iid'" in refused.stderr


def test_exact_match_scores_an_answer_equal_to_its_reference_1_and_any_other_0(tiny_decoder, sst2_as_instructions):
    """The scorer against references set from the model's own greedy answers: the answer itself, or written as the
    normalisation forgives (another case, an article, punctuation, spacing), counts 1; the answer with a word more counts 0."""
    overrides = open_instructions(sst2_as_instructions)
    exp = build_experiment(instruct_config(tiny_decoder, **overrides))
    module, split, rows = exp.model.module.eval(), exp.test, np.arange(4)
    answers = exp.objective.generate(module, [split.input_ids[i][: split.prompt_lengths[i]] for i in rows], split.pad_token_id)
    assert any(normalise_answer(answer) for answer in answers)  # the comparison is of words, not of empty strings
    forgiven = [f"  The {answer.upper()} ." for answer in answers]
    one_word_more = [f"{answer} indeed" for answer in answers]
    with torch.no_grad():
        mixed = ((forgiven[:2] + one_word_more[2:], 2), (one_word_more[:3] + forgiven[3:], 1))
        for references, expected in ((answers, 4), (forgiven, 4), (one_word_more, 0), *mixed):
            known = dataclasses.replace(split, references=references + split.references[len(rows) :])
            assert exp.objective.exact_matches(module, known, rows) == expected  # the same batch of prompts: the same answers


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data.label_words": '["positive review", "positive"]'}, "start with the same token"),
        ({"data.label_words": '["positive"]'}, "one word per class"),
        ({"data.prompt": '"Review: {sentence}"'}, "data.prompt must hold {text}"),
        ({"strategy.name": "bitfit"}, "has no biases"),
    ],
)
def test_bad_instruct_settings_get_one_line_and_exit_2(tiny_decoder, overrides, message, tmp_path):
    result = CliRunner().invoke(
        app, ["run", str(QUICKSTART), *tiny_instruct_overrides(tiny_decoder, **overrides), "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


# Runs in a fresh interpreter: each folder loaded with transformers (a merged model) or transformers and peft (an adapter) only.
FRESH_PROCESS = """
import json, os, sys
import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM
ids, results = json.loads(sys.stdin.read()), {}
for folder in sys.argv[1:]:
    if os.path.exists(os.path.join(folder, "adapter_config.json")):
        base = AutoModelForCausalLM.from_pretrained(PeftConfig.from_pretrained(folder).base_model_name_or_path)
        model = PeftModel.from_pretrained(base, folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        results[folder] = model.eval()(input_ids=torch.tensor(ids)).logits[:, -1].tolist()
assert not any(name == "legend" or name.startswith("legend.") for name in sys.modules)
print(json.dumps(results))
"""


def test_a_causal_lm_run_exports_an_adapter_and_a_merged_model_that_transformers_and_peft_load_alone(tiny_decoder, tmp_path):
    """Both exports of a LEGEND run on the decoder, loaded in a fresh process, give the run's own logits within 1e-4."""
    config = instruct_config(tiny_decoder, **{"strategy.name": "legend"})
    run = tmp_path / "run"
    summary = run_experiment(config, run)
    folder, merged = export(run, tmp_path / "adapter"), export(run, tmp_path / "merged", merge=True)
    assert json.loads((folder / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert not (merged / "adapter_config.json").exists()
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    exp = build_experiment(config)
    exp.model.load(torch.load(run / CHECKPOINT, weights_only=True)["global_state"])
    exp.model.module.eval()
    prompts = [exp.test.input_ids[i][: exp.test.prompt_lengths[i]] for i in range(4)]
    width = min(len(p) for p in prompts)
    ids = [p[:width].tolist() for p in prompts]  # one length: no padding in the comparison
    with torch.no_grad():
        ours = exp.model.module(input_ids=torch.tensor(ids)).logits[:, -1].numpy()
    loaded = in_fresh_process(FRESH_PROCESS, [str(folder), str(merged)], ids)
    assert np.abs(np.asarray(loaded[str(folder)]) - ours).max() <= 1e-4
    assert np.abs(np.asarray(loaded[str(merged)]) - ours).max() <= 1e-4
    result = CliRunner().invoke(app, ["evaluate", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout.strip().splitlines()[-1])
    assert scored["accuracy"] == summary["final_accuracy"] and scored["loss"] == pytest.approx(summary["final_loss"], abs=1e-4)
    assert scored["perplexity"] == pytest.approx(np.exp(scored["loss"]))
    predicted = CliRunner().invoke(app, ["predict", str(folder), "a moving and beautiful film", "--jsonl"])
    assert predicted.exit_code == 0, predicted.output
    answer = json.loads(predicted.stdout.strip().splitlines()[-1])
    assert answer["label"] in ("0", "1") and isinstance(answer["answer"], str) and set(answer["probabilities"]) == {"0", "1"}


def test_the_cost_model_counts_a_decoder_block_and_the_lm_head_per_response_token(tiny_decoder):
    """Gated MLP (gate, up, down) and grouped-query attention (k, v narrower than q) from the model's own layers; the
    frozen LM head costs its forward and input gradient once per response token, not per position or sequence."""
    from legend.devices.cost import Batches, ModelSpec, training_flops

    exp = build_experiment(instruct_config(tiny_decoder, **{"strategy.name": "legend"}))
    spec, config = ModelSpec.of(exp.model), exp.model.module.config
    h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    assert spec.block_linear_params == 2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size
    assert spec.frozen_output and spec.output_features == config.vocab_size and spec.outside_linear_params == h * config.vocab_size
    layout = exp.strategy.global_layout()
    one, three = (training_flops(spec, layout, Batches.of([(8, 40, 8 * answer)])) for answer in (1, 3))
    assert three - one == pytest.approx(2 * 2 * (8 * 2) * h * config.vocab_size)
    rows = np.arange(8)
    assert Batches.of([(8, 40, exp.train.outputs(rows))]).outputs == int((exp.train.lengths[rows] - exp.train.prompt_lengths[rows]).sum())
