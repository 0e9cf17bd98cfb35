"""Use a fine-tuned model: class probabilities for new text, and scores on a labelled split.

The model comes from an export (a PEFT adapter or a merged transformers model, ``legend export``) or
straight from a run folder (its last checkpoint). Texts are tokenised and batched as the engine's own
evaluation does (the same truncation, length-sorted batches), so ``legend evaluate`` on a run's export
reproduces the run's accuracy.
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
from legend.data import encode, length_buckets, load_task, subsample
from legend.data.batching import EncodedSplit
from legend.data.tasks import task_text_columns
from legend.engine.checkpoint import CHECKPOINT
from legend.errors import LegendError
from legend.export import LEGEND_FILE, load_trained


@dataclass
class Classifier:
    """A sequence classifier in eval mode, its tokenizer, and what the run it came from says about its inputs."""

    module: torch.nn.Module  # a tokenised batch -> an output with .logits (B, classes)
    tokenizer: Any
    label_names: tuple[str, ...]
    config: Config  # the run's config: data.*, eval.batch_size
    source: str  # "adapter", "merged" or "run"

    @property
    def text_columns(self) -> tuple[str, ...]:
        return task_text_columns(self.config.data) or ("text",)


def load_classifier(path: Path, purpose: str, client: int | None = None) -> Classifier:
    """An export folder (adapter or merged) or a run folder (``client``: that client's personalised model, FedSA-LoRA)."""
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        if client is not None:
            raise LegendError(f"--client: {path} is an export, which holds one model already: drop --client (it picks a client's model of a run folder)")
        return _from_export(path, purpose)
    if (path / CHECKPOINT).is_file():
        trained = load_trained(path, client, purpose)
        return Classifier(trained.model.module, trained.model.tokenizer, trained.label_names, trained.config, "run")
    raise LegendError(f"{purpose}: {path} is neither an export (adapter_config.json or config.json) nor a run folder ({CHECKPOINT}): "
                      "give the --out folder of `legend export` or of `legend run`")


def _from_export(path: Path, purpose: str) -> Classifier:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    described = json.loads((path / LEGEND_FILE).read_text()) if (path / LEGEND_FILE).is_file() else {}
    config = Config.model_validate(described["config"]) if "config" in described else Config()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token_id is None:  # decoders: pad with EOS, as the run did
            tokenizer.pad_token = tokenizer.eos_token
        if (path / "adapter_config.json").is_file():
            from peft import PeftConfig, PeftModel

            base = PeftConfig.from_pretrained(path).base_model_name_or_path
            labels = described.get("labels") or []
            head = {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}} if labels else {}
            base_model = AutoModelForSequenceClassification.from_pretrained(base, pad_token_id=tokenizer.pad_token_id, **head)
            module, source = PeftModel.from_pretrained(base_model, path), "adapter"
        else:
            module, source = AutoModelForSequenceClassification.from_pretrained(path), "merged"
    except (OSError, ValueError) as exc:
        raise LegendError(f"{purpose}: {path} could not be loaded ({str(exc).splitlines()[0]}): export the run again with `legend export`") from None
    id2label = module.config.id2label
    labels = tuple(described.get("labels") or [id2label[i] for i in range(len(id2label))])
    return Classifier(module.eval(), tokenizer, labels, config, source)


@torch.no_grad()
def logits(classifier: Classifier, split: EncodedSplit, batch_size: int) -> np.ndarray:
    """(N, classes) float32 logits, computed over length-sorted batches (the engine's evaluation batches)."""
    out = np.empty((len(split), len(classifier.label_names)), dtype=np.float32)
    for rows in length_buckets(split, batch_size):
        batch = split.batch(rows)
        batch.pop("labels")
        out[rows] = classifier.module(**batch).logits.float().numpy()
    return out


def encode_texts(classifier: Classifier, texts: list[str], pairs: list[str] | None = None) -> EncodedSplit:
    columns = {"text": texts, "label": [0] * len(texts)}
    if pairs is not None:
        columns["text_pair"] = pairs
    return encode(datasets.Dataset.from_dict(columns), classifier.tokenizer, classifier.config.data.max_length)


def predict(classifier: Classifier, inputs: list[tuple[str, ...]]) -> list[dict[str, Any]]:
    """Per input: its label and the probability of every class."""
    pair = len(classifier.text_columns) == 2
    for item in inputs:
        if len(item) != (2 if pair else 1):
            expected = "two texts (a sentence pair: separate them with a tab)" if pair else "one text"
            raise LegendError(f"predict: this model classifies {expected}, and got {len(item)}: {item[0][:40]!r}...")
    split = encode_texts(classifier, [item[0] for item in inputs], [item[1] for item in inputs] if pair else None)
    probabilities = torch.from_numpy(logits(classifier, split, classifier.config.eval.batch_size)).softmax(-1).numpy()
    return [{"input": list(item) if pair else item[0], "label": classifier.label_names[int(p.argmax())],
             "probabilities": {name: float(q) for name, q in zip(classifier.label_names, p, strict=True)}}
            for item, p in zip(inputs, probabilities, strict=True)]


def read_inputs(file: Path, columns: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The text columns of each row of a .tsv / .csv (with a header) or .jsonl file."""
    if not file.is_file():
        raise LegendError(f"--file {file} not found: give a .tsv, .csv or .jsonl file")
    if file.suffix == ".jsonl":
        try:
            rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise LegendError(f"--file {file}: line {exc.lineno} is not JSON: write one object per line, like {{\"{columns[0]}\": \"...\"}}") from None
    elif file.suffix in (".tsv", ".csv"):
        import csv

        with open(file, newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t" if file.suffix == ".tsv" else ",",
                                       quoting=csv.QUOTE_NONE if file.suffix == ".tsv" else csv.QUOTE_MINIMAL))
    else:
        raise LegendError(f"--file {file}: unknown format '{file.suffix}': use .tsv, .csv or .jsonl")
    for number, row in enumerate(rows, 1):
        missing = [c for c in columns if not isinstance(row, dict) or c not in row]
        if missing:
            raise LegendError(f"--file {file}: row {number} has no '{missing[0]}' field: the model reads the column(s) {', '.join(columns)}")
    return [tuple(str(row[c]) for c in columns) for row in rows]


def evaluate(classifier: Classifier, overrides: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and the confusion matrix on the test split of the run's task (``data.*`` / ``eval.*`` overrides apply)."""
    foreign = [item for item in overrides if not item.partition("=")[0].strip().startswith(("data.", "eval."))]
    if foreign:
        raise LegendError(f"evaluate: '{foreign[0]}' is not a data.* or eval.* key: the model is fixed, only what it is scored on can change")
    config = override_config(classifier.config, overrides)
    task = subsample(load_task(config.data), config.data, config.seed)
    if task.label_names != classifier.label_names:
        raise LegendError(f"evaluate: the data's labels {list(task.label_names)} are not the model's {list(classifier.label_names)}: "
                          "set data.labels to the model's labels in its class order")
    split = encode(task.test, classifier.tokenizer, config.data.max_length)
    predicted = logits(classifier, split, config.eval.batch_size).argmax(-1)
    return {"split": config.data.test_split, "examples": len(split), **scores(split.labels, predicted, len(task.label_names)),
            "labels": list(task.label_names)}


def scores(truth: np.ndarray, predicted: np.ndarray, classes: int) -> dict[str, Any]:
    """Accuracy, macro-F1 over every class (F1 = 0 for a class never true nor predicted, as scikit-learn's default), confusion matrix (rows: truth)."""
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    true_positive = np.diag(confusion)
    denominator = confusion.sum(0) + confusion.sum(1)  # predicted + actual = 2 TP + FP + FN
    f1 = np.divide(2 * true_positive, denominator, out=np.zeros(classes), where=denominator > 0)
    return {"accuracy": float(true_positive.sum() / max(len(truth), 1)), "macro_f1": float(f1.mean()), "confusion": confusion.tolist()}
