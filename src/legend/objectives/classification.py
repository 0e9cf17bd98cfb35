"""Sequence classification: the model's own classifier head over the task's labels, cross-entropy per sequence.

With ``train.logit_adjustment`` = tau, local training adds tau * log(the client's own label frequencies) to the logits
(balanced softmax; FedLC's calibration under label skew): its loss no longer rewards predicting its own majority class
for being common there, since its prior already accounts for it. Evaluation reads the plain logits.
"""

from __future__ import annotations

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from legend.config import Config
from legend.data.batching import EncodedSplit, encode, model_inputs
from legend.objectives.base import LOGIT_OFFSETS, Objective, Scored


class Classification(Objective):
    causal_lm = False

    def __init__(self, config: Config, label_names: tuple[str, ...], tokenizer):
        self.label_names, self.tokenizer = label_names, tokenizer
        self.adjustment = config.train.logit_adjustment

    def encode(self, table: datasets.Dataset, max_length: int) -> EncodedSplit:
        return encode(table, self.tokenizer, max_length)

    def logit_offsets(self, split: EncodedSplit, rows: np.ndarray) -> torch.Tensor | None:
        if self.adjustment == 0:
            return None
        counts = np.bincount(split.labels[rows], minlength=len(self.label_names)) + 1.0  # add-one: a class the client lacks stays finite
        return torch.from_numpy(self.adjustment * np.log(counts / counts.sum())).float()

    def loss(self, module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        sums, counts = self.row_losses(module, batch)
        return sums.sum() / counts.sum()

    def row_losses(self, module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = module(**model_inputs(batch)).logits.float()
        if LOGIT_OFFSETS in batch:
            logits = logits + batch[LOGIT_OFFSETS]
        return F.cross_entropy(logits, batch["labels"], reduction="none"), torch.ones(len(logits), device=logits.device)

    def score(self, module, batch: dict[str, torch.Tensor]) -> Scored:
        out = module(**model_inputs(batch), labels=batch["labels"])
        size = len(batch["labels"])
        return Scored(out.loss.item() * size, size, int((out.logits.argmax(-1) == batch["labels"]).sum()))
