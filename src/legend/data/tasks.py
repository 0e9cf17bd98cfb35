"""Tasks: where the text and labels are, read with Hugging Face datasets into class ids."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from legend.config import DataConfig
from legend.data.instructions import conversations
from legend.data.table import column
from legend.errors import LegendError


@dataclass(frozen=True)
class TaskSpec:
    text_columns: tuple[str, ...]
    labels: tuple[str, ...]
    prompt: str  # the task as an instruction (data.format = "instruct"), with {text} and {text_pair}
    label_words: tuple[str, ...]  # the answer to it for each class
    label_column: str = "label"


TASKS = {
    "sst2": TaskSpec(("sentence",), ("0", "1"), "Review: {text}\nIs this review positive or negative?", ("negative", "positive")),
    "agnews": TaskSpec(
        ("text",),
        ("World", "Sports", "Business", "Sci/Tech"),
        "Article: {text}\nIs this article about world, sports, business or technology?",
        ("world", "sports", "business", "technology"),
    ),
    "qnli": TaskSpec(
        ("question", "sentence"),
        ("entailment", "not_entailment"),
        "Question: {text}\nSentence: {text_pair}\nDoes the sentence answer the question, yes or no?",
        ("yes", "no"),
    ),
}
INSTRUCTIONS = "instructions"  # data.task of open instruction/response data (data/instructions.py)


@dataclass(frozen=True)
class TaskData:
    """Train and test splits with columns ``text``, optional ``text_pair``, and integer ``label`` (open instruction
    data: ``prompt`` and ``response`` instead, and no labels); with ``data.val_size``, a validation split held out of
    the training data (what tuning and targets are chosen on)."""

    train: datasets.Dataset
    test: datasets.Dataset
    label_names: tuple[str, ...]
    validation: datasets.Dataset | None = None

    @property
    def is_pair(self) -> bool:
        return "text_pair" in self.train.column_names


def subsample(task: TaskData, cfg: DataConfig, seed: int) -> TaskData:
    """Hold out data.val_size training examples (stratified, seeded), then apply data.train_size (a seeded random
    subset of the rest) and data.test_size (the first rows)."""
    train, test, validation = task.train, task.test, None
    if cfg.val_size:
        if cfg.val_size >= len(train):
            raise LegendError(f"data.val_size ({cfg.val_size}) leaves no training data ({len(train)} examples): hold out fewer")
        labels = column(train, "label") if task.label_names else [0] * len(train)  # open instructions: one class
        held_out = stratified_sample(np.asarray(labels), cfg.val_size, seed)
        validation = train.select(held_out)
        train = train.select(np.setdiff1d(np.arange(len(train)), held_out))
    if cfg.train_size and cfg.train_size < len(train):
        train = train.shuffle(seed=seed).select(range(cfg.train_size))
    if cfg.test_size and cfg.test_size < len(test):
        test = test.select(range(cfg.test_size))
    return TaskData(train, test, task.label_names, validation)


def stratified_sample(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """``size`` sorted row indices drawn from (seed) whose label shares match the whole's (largest remainders)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = size * counts / len(labels)
    take = np.floor(exact).astype(int)
    take[np.argsort(-(exact - take), kind="stable")[: size - take.sum()]] += 1
    rng = np.random.default_rng([seed, 41])
    chosen = [rng.choice(np.flatnonzero(labels == c), size=n, replace=False) for c, n in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(chosen))


def default_data_path(task: str) -> Path:
    return Path("..") / "shared" / "data" / task


def load_task(cfg: DataConfig) -> TaskData:
    if cfg.task == INSTRUCTIONS:
        raw = _load_hub(cfg) if cfg.hub_id else _load_folder(cfg)
        return TaskData(
            conversations(raw[cfg.train_split], cfg.train_split, cfg), conversations(raw[cfg.test_split], cfg.test_split, cfg), ()
        )
    spec = TASKS.get(cfg.task)
    if spec is None and cfg.task != "custom":
        raise LegendError(f"data.task '{cfg.task}' is unknown: use one of {', '.join(TASKS)}, 'custom' or '{INSTRUCTIONS}'")
    text_columns = task_text_columns(cfg)
    if not 1 <= len(text_columns) <= 2:
        raise LegendError('data.text_columns must name one column, or two for sentence pairs (e.g. ["question", "sentence"])')
    label_column = cfg.label_column
    raw = _load_hub(cfg) if cfg.hub_id else _load_folder(cfg)
    for split, table in raw.items():
        for name in (*text_columns, label_column):
            if name not in table.column_names:
                raise LegendError(
                    f"data: column '{name}' not in the {split} split (columns: {', '.join(table.column_names)}); "
                    "set data.text_columns / data.label_column"
                )
    train, test = raw[cfg.train_split], raw[cfg.test_split]
    label_names = tuple(cfg.labels) or (spec.labels if spec else _sorted_labels(train, label_column))
    return TaskData(
        train=_to_ids(train, cfg.train_split, text_columns, label_column, label_names),
        test=_to_ids(test, cfg.test_split, text_columns, label_column, label_names),
        label_names=label_names,
    )


def task_labels(cfg: DataConfig) -> tuple[str, ...]:
    """The class names in class order, read from the data only for a custom task that does not list them (none for open instructions)."""
    if cfg.task == INSTRUCTIONS:
        return ()
    spec = TASKS.get(cfg.task)
    return tuple(cfg.labels) or (spec.labels if spec else load_task(cfg).label_names)


def task_text_columns(cfg: DataConfig) -> tuple[str, ...]:
    """The one text column, or two for sentence pairs."""
    spec = TASKS.get(cfg.task)
    return tuple(cfg.text_columns) or (spec.text_columns if spec else ())


def _load_folder(cfg: DataConfig) -> dict[str, datasets.Dataset]:
    folder = Path(cfg.path) if cfg.path else default_data_path(cfg.task)
    if not folder.is_dir():
        raise LegendError(f"data.path {folder} is not a folder: set data.path to a folder holding train.tsv and test.tsv")
    splits = {}
    for split in (cfg.train_split, cfg.test_split):
        file = next((folder / f"{split}{ext}" for ext in (".tsv", ".csv", ".jsonl", ".json") if (folder / f"{split}{ext}").is_file()), None)
        if file is None:
            raise LegendError(
                f"data: no {split}.tsv, .csv or .jsonl in {folder}: add it or set "
                f"data.{'train' if split == cfg.train_split else 'test'}_split"
            )
        if file.suffix in (".jsonl", ".json"):
            try:
                splits[split] = datasets.load_dataset("json", data_files=str(file), split="train")
            except Exception as exc:  # datasets wraps the parser's many error types
                raise LegendError(
                    f"data: {file} could not be read as JSON Lines ({type(exc).__name__}): write one JSON object per line"
                ) from None
            continue
        splits[split] = datasets.load_dataset(
            "csv",
            data_files=str(file),
            split="train",
            delimiter="\t" if file.suffix == ".tsv" else ",",
            quoting=csv.QUOTE_NONE if file.suffix == ".tsv" else csv.QUOTE_MINIMAL,
            keep_default_na=False,
        )
    return splits


def _load_hub(cfg: DataConfig) -> dict[str, datasets.Dataset]:
    try:
        loaded = datasets.load_dataset(cfg.hub_id, cfg.hub_config or None)
    except Exception as exc:  # the hub raises many types; all mean "not reachable here"
        raise LegendError(
            f"data.hub_id '{cfg.hub_id}' could not be loaded ({type(exc).__name__}): check the id and the network, or use data.path"
        ) from None
    for split in (cfg.train_split, cfg.test_split):
        if split not in loaded:
            raise LegendError(
                f"data: hub dataset '{cfg.hub_id}' has no split '{split}' (splits: {', '.join(loaded)}); set data.train_split / "
                "data.test_split"
            )
    return {split: loaded[split] for split in (cfg.train_split, cfg.test_split)}


def _sorted_labels(table: datasets.Dataset, label_column: str) -> tuple[str, ...]:
    return tuple(sorted({str(v) for v in column(table, label_column)}))


def _to_ids(table, split, text_columns, label_column, label_names) -> datasets.Dataset:
    index = {name: i for i, name in enumerate(label_names)}
    raw_labels = [str(v) for v in column(table, label_column)]
    unknown = sorted(set(raw_labels) - index.keys())
    if unknown:
        raise LegendError(
            f"data: label '{unknown[0]}' in the {split} split is not one of {', '.join(label_names)}; set data.labels to every label in "
            "class order"
        )
    columns = {"text": [str(t) for t in column(table, text_columns[0])], "label": [index[v] for v in raw_labels]}
    if len(text_columns) == 2:
        columns["text_pair"] = [str(t) for t in column(table, text_columns[1])]
    return datasets.Dataset.from_dict(columns)
