"""Sequence classification: the model's own classifier head over the task's labels, cross-entropy per sequence."""

from __future__ import annotations

import datasets
import torch
import torch.nn.functional as F

from legend.config import Config
from legend.data.batching import EncodedSplit, encode, model_inputs
from legend.objectives.base import Objective, Scored


class Classification(Objective):
    causal_lm = False

    def __init__(self, config: Config, label_names: tuple[str, ...], tokenizer):
        self.label_names, self.tokenizer = label_names, tokenizer

    def encode(self, table: datasets.Dataset, max_length: int) -> EncodedSplit:
        return encode(table, self.tokenizer, max_length)

    def loss(self, module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return module(**model_inputs(batch), labels=batch["labels"]).loss

    def row_losses(self, module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = module(**model_inputs(batch)).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction="none"), torch.ones(len(logits), device=logits.device)

    def score(self, module, batch: dict[str, torch.Tensor]) -> Scored:
        out = module(**model_inputs(batch), labels=batch["labels"])
        size = len(batch["labels"])
        return Scored(out.loss.item() * size, size, int((out.logits.argmax(-1) == batch["labels"]).sum()))
