"""Tokenise once, then build batches padded only to their own longest example."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import datasets
import numpy as np
import torch

from legend.data.table import column

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The part of a batch the model's forward takes (targets, classes and the like stay out)."""
    return {key: value for key, value in batch.items() if key in MODEL_INPUTS}


@dataclass(frozen=True)
class TokenRows:
    """Token ids per example, unpadded: what batching, the cost model and the frozen-prefix cache read of any split."""

    input_ids: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.input_ids)

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(ids) for ids in self.input_ids), dtype=np.int64, count=len(self))


@dataclass(frozen=True)
class EncodedSplit(TokenRows):
    """Token ids per example (no padding), optional segment ids, and class ids."""

    token_type_ids: list[np.ndarray] | None
    labels: np.ndarray
    pad_token_id: int

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """Right-padded tensors for these rows: input_ids, attention_mask, [token_type_ids], labels."""
        input_ids, attention_mask = padded([self.input_ids[i] for i in indices], self.pad_token_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.from_numpy(self.labels[np.asarray(indices)])}
        if self.token_type_ids is not None:
            batch["token_type_ids"] = padded([self.token_type_ids[i] for i in indices], 0)[0]
        return batch

    def outputs(self, indices) -> int:
        """Positions the output layer projects: one per sequence (the classifier reads its first or last token)."""
        return len(indices)


def padded(rows: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids right-padded with ``pad_id`` to the longest row, and the (B, T) mask of real tokens."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for j, row in enumerate(rows):
        ids[j, : len(row)] = row
        mask[j, : len(row)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def encode(table: datasets.Dataset, tokenizer, max_length: int) -> EncodedSplit:
    """Token ids per example; segment ids only for sentence pairs (a single sentence's are all 0, the models' default)."""
    pairs = column(table, "text_pair") if "text_pair" in table.column_names else None
    encoded = tokenizer(
        column(table, "text"),
        pairs,
        truncation=True,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=None if pairs is not None else False,
    )
    token_types = encoded.get("token_type_ids")
    return EncodedSplit(
        input_ids=[np.asarray(ids, dtype=np.int64) for ids in encoded["input_ids"]],
        token_type_ids=[np.asarray(t, dtype=np.int64) for t in token_types] if token_types is not None else None,
        labels=np.asarray(column(table, "label"), dtype=np.int64),
        pad_token_id=tokenizer.pad_token_id,
    )


def length_buckets(split: EncodedSplit, batch_size: int) -> list[np.ndarray]:
    """Evaluation batches of similar length, so little compute goes to padding."""
    order = np.argsort(split.lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
