"""Use a fine-tuned model: class probabilities or generated answers for new text, and scores on a labelled split.

The model comes from an export (a PEFT adapter or a merged transformers model, ``legend export``) or
straight from a run folder (its last checkpoint). Texts are tokenised and batched as the engine's own
evaluation does (the same truncation and prompt template, length-sorted batches, the run's objective),
so ``legend evaluate`` on a run's export reproduces the run's accuracy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from legend.config import Config, override_config
from legend.data.batching import encode, length_buckets
from legend.data.instructions import encode_conversations
from legend.data.tasks import load_task, subsample, task_text_columns
from legend.engine.checkpoint import CHECKPOINT
from legend.errors import LegendError
from legend.export import LEGEND_FILE, load_trained
from legend.objectives import Instruct, Objective, objective_for


@dataclass
class FineTuned:
    """A fine-tuned model in eval mode (a sequence classifier, or a causal LM trained on instructions), its tokenizer,
    the run's objective, and what the run it came from says about its inputs."""

    module: torch.nn.Module
    tokenizer: Any
    label_names: tuple[str, ...]  # none: open instructions
    config: Config  # the run's config: data.*, eval.*
    source: str  # "adapter", "merged" or "run"
    objective: Objective

    @property
    def text_columns(self) -> tuple[str, ...]:
        if self.instruct and not self.label_names:
            return (self.config.data.instruction_column,)
        return task_text_columns(self.config.data) or ("text",)

    @property
    def instruct(self) -> bool:
        return isinstance(self.objective, Instruct)


def load_fine_tuned(path: Path, purpose: str, client: int | None = None) -> FineTuned:
    """An export folder (adapter or merged) or a run folder (``client``: that client's personalised model, FedSA-LoRA)."""
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        if client is not None:
            raise LegendError(
                f"--client: {path} is an export, which holds one model already: drop --client (it picks a client's model of a run folder)"
            )
        return _from_export(path, purpose)
    if (path / CHECKPOINT).is_file():
        trained = load_trained(path, client, purpose)
        return FineTuned(trained.model.module, trained.model.tokenizer, trained.label_names, trained.config, "run", trained.objective)
    raise LegendError(
        f"{purpose}: {path} is neither an export (adapter_config.json or config.json) nor a run folder ({CHECKPOINT}): "
        "give the --out folder of `legend export` or of `legend run`"
    )


def _from_export(path: Path, purpose: str) -> FineTuned:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    described = json.loads((path / LEGEND_FILE).read_text()) if (path / LEGEND_FILE).is_file() else {}
    config = Config.model_validate(described["config"]) if "config" in described else Config()
    causal = config.data.format == "instruct"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token_id is None:  # decoders: pad with EOS, as the run did
            tokenizer.pad_token = tokenizer.eos_token
        if (path / "adapter_config.json").is_file():
            from peft import PeftConfig, PeftModel

            base = PeftConfig.from_pretrained(path).base_model_name_or_path
            labels = described.get("labels") or []
            head = (
                {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}
                if labels
                else {}
            )
            if causal:  # the adapter over the causal LM; the objective runs the LM underneath PEFT's wrapper
                module = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), path).get_base_model()
            else:
                module = PeftModel.from_pretrained(
                    AutoModelForSequenceClassification.from_pretrained(base, pad_token_id=tokenizer.pad_token_id, **head), path
                )
            source = "adapter"
        else:
            module, source = (AutoModelForCausalLM if causal else AutoModelForSequenceClassification).from_pretrained(path), "merged"
    except (OSError, ValueError) as exc:
        raise LegendError(
            f"{purpose}: {path} could not be loaded ({str(exc).splitlines()[0]}): export the run again with `legend export`"
        ) from None
    if causal:
        labels = tuple(described.get("labels") or ())
    else:
        id2label = module.config.id2label
        labels = tuple(described.get("labels") or [id2label[i] for i in range(len(id2label))])
    return FineTuned(module.eval(), tokenizer, labels, config, source, objective_for(config, labels, tokenizer))


@torch.no_grad()
def logits(model: FineTuned, split, batch_size: int) -> np.ndarray:
    """(N, classes) float32 logits, computed over length-sorted batches (the engine's evaluation batches): the classifier's,
    or an instruction model's for the first token of each class's word."""
    out = np.empty((len(split), len(model.label_names)), dtype=np.float32)
    for rows in length_buckets(split, batch_size):
        batch = split.batch(rows)
        if model.instruct:
            out[rows] = model.objective.choice_logits(model.module, batch).numpy()
        else:
            batch.pop("labels")
            out[rows] = model.module(**batch).logits.float().numpy()
    return out


def encode_texts(model: FineTuned, texts: list[str], pairs: list[str] | None = None):
    """New inputs as the run encoded its data; an instruction model gets prompts with an empty response."""
    columns = {"text": texts, "label": [0] * len(texts)}
    if pairs is not None:
        columns["text_pair"] = pairs
    if model.instruct and not model.label_names:
        prompts = [[{"role": "user", "content": text}] for text in texts]
        return encode_conversations(prompts, [""] * len(texts), model.tokenizer, model.config.data.max_length, model.objective.chat)
    if model.instruct:
        return model.objective.encode(datasets.Dataset.from_dict(columns), model.config.data.max_length)
    return encode(datasets.Dataset.from_dict(columns), model.tokenizer, model.config.data.max_length)


def predict(model: FineTuned, inputs: list[tuple[str, ...]]) -> list[dict[str, Any]]:
    """Per input: its label and the probability of every class; an instruction model's also its generated answer (greedy,
    at most eval.max_new_tokens), an open instruction model's only that."""
    pair = len(model.text_columns) == 2
    for item in inputs:
        if len(item) != (2 if pair else 1):
            expected = "two texts (a sentence pair: separate them with a tab)" if pair else "one text"
            raise LegendError(f"predict: this model reads {expected}, and got {len(item)}: {item[0][:40]!r}...")
    split = encode_texts(model, [item[0] for item in inputs], [item[1] for item in inputs] if pair else None)
    results = [{"input": list(item) if pair else item[0]} for item in inputs]
    if model.instruct:
        with torch.no_grad():
            answers = model.objective.generate(
                model.module, [ids[:n] for ids, n in zip(split.input_ids, split.prompt_lengths, strict=True)], split.pad_token_id
            )
        for result, answer in zip(results, answers, strict=True):
            result["answer"] = answer
    if model.label_names:
        probabilities = torch.from_numpy(logits(model, split, model.config.eval.batch_size)).softmax(-1).numpy()
        for result, p in zip(results, probabilities, strict=True):
            result.update(
                label=model.label_names[int(p.argmax())],
                probabilities={name: float(q) for name, q in zip(model.label_names, p, strict=True)},
            )
    return results


def read_inputs(file: Path, columns: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The text columns of each row of a .tsv / .csv (with a header) or .jsonl file."""
    if not file.is_file():
        raise LegendError(f"--file {file} not found: give a .tsv, .csv or .jsonl file")
    if file.suffix == ".jsonl":
        try:
            rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise LegendError(
                f'--file {file}: line {exc.lineno} is not JSON: write one object per line, like {{"{columns[0]}": "..."}}'
            ) from None
    elif file.suffix in (".tsv", ".csv"):
        import csv

        with open(file, newline="") as handle:
            rows = list(
                csv.DictReader(
                    handle,
                    delimiter="\t" if file.suffix == ".tsv" else ",",
                    quoting=csv.QUOTE_NONE if file.suffix == ".tsv" else csv.QUOTE_MINIMAL,
                )
            )
    else:
        raise LegendError(f"--file {file}: unknown format '{file.suffix}': use .tsv, .csv or .jsonl")
    for number, row in enumerate(rows, 1):
        missing = [c for c in columns if not isinstance(row, dict) or c not in row]
        if missing:
            raise LegendError(
                f"--file {file}: row {number} has no '{missing[0]}' field: the model reads the column(s) {', '.join(columns)}"
            )
    return [tuple(str(row[c]) for c in columns) for row in rows]


def evaluate(model: FineTuned, overrides: list[str]) -> dict[str, Any]:
    """On the test split of the run's task (``data.*`` / ``eval.*`` overrides apply): accuracy, macro-F1 and the confusion
    matrix; an instruction model's also its response loss and perplexity (open instructions: exact match, loss, perplexity)."""
    foreign = [item for item in overrides if not item.partition("=")[0].strip().startswith(("data.", "eval."))]
    if foreign:
        raise LegendError(
            f"evaluate: '{foreign[0]}' is not a data.* or eval.* key: the model is fixed, only what it is scored on can change"
        )
    config = override_config(model.config, overrides)
    task = subsample(load_task(config.data), config.data, config.seed)
    if task.label_names != model.label_names:
        raise LegendError(
            f"evaluate: the data's labels {list(task.label_names)} are not the model's {list(model.label_names)}: "
            "set data.labels to the model's labels in its class order"
        )
    objective = objective_for(config, model.label_names, model.tokenizer)
    split = objective.encode(task.test, config.data.max_length)
    result: dict[str, Any] = {"split": config.data.test_split, "examples": len(split)}
    if model.instruct:
        measured, predicted = _response_scores(model.module, objective, split, config.eval.batch_size)
        result.update(measured)
    else:
        predicted = logits(model, split, config.eval.batch_size).argmax(-1)
    if model.label_names:
        truth = split.classes if model.instruct else split.labels
        result.update(scores(truth, predicted, len(task.label_names)), labels=list(task.label_names))
    return result


@torch.no_grad()
def _response_scores(module: torch.nn.Module, objective: Instruct, split, batch_size: int) -> tuple[dict[str, float], np.ndarray]:
    """Mean response-token loss and its perplexity, and in the same forward passes each example's predicted class (label
    tasks); open instructions: the exact-match accuracy of greedy answers instead."""
    loss_sum, tokens, matches = 0.0, 0, 0
    predicted = np.zeros(len(split), dtype=np.int64)
    for rows in length_buckets(split, batch_size):
        scored, choices = objective.score_with_choices(module, split.batch(rows))
        loss_sum, tokens = loss_sum + scored.loss_sum, tokens + scored.loss_count
        if choices is None:
            matches += objective.exact_matches(module, split, rows)
        else:
            predicted[rows] = choices.argmax(-1).numpy()
    loss = loss_sum / max(tokens, 1)
    return {
        "loss": loss,
        "perplexity": float(np.exp(loss)),
        **({} if objective.label_names else {"accuracy": matches / max(len(split), 1)}),
    }, predicted


def scores(truth: np.ndarray, predicted: np.ndarray, classes: int) -> dict[str, Any]:
    """Accuracy, macro-F1 over every class (F1 = 0 for a class never true nor predicted, as scikit-learn's default),
    confusion matrix (rows: truth)."""
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    true_positive = np.diag(confusion)
    denominator = confusion.sum(0) + confusion.sum(1)  # predicted + actual = 2 TP + FP + FN
    f1 = np.divide(2 * true_positive, denominator, out=np.zeros(classes), where=denominator > 0)
    return {"accuracy": float(true_positive.sum() / max(len(truth), 1)), "macro_f1": float(f1.mean()), "confusion": confusion.tolist()}
