"""The one interface between the kind of data and everything that trains or scores a model on it.

Local training calls ``loss``; evaluation of the global model calls ``score`` on the same batches (and
``exact_matches`` where answers are generated); a batch is whatever the split's ``batch`` holds, of which
only ``data.batching.model_inputs`` reach the model; the cost model reads ``outputs`` (positions the output layer
projects); the frozen-prefix cache sees only the model's blocks, so it works the same for every objective.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import datasets
import numpy as np
import torch
from torch import nn


class Scored(NamedTuple):
    """One batch's contribution to an evaluation."""

    loss_sum: float  # summed over what the loss averages: sequences (classification) or response tokens (instruct)
    loss_count: int
    correct: int | None  # None: the answers are generated and scored by ``exact_matches``


LOGIT_OFFSETS = "logit_offsets"  # batch key: (B, classes) added to each row's logits in local training (``Objective.logit_offsets``)


class Objective(ABC):
    causal_lm: bool  # the model is an AutoModelForCausalLM (else AutoModelForSequenceClassification with num_labels)
    label_names: tuple[str, ...]

    def logit_offsets(self, split, rows: np.ndarray) -> torch.Tensor | None:
        """(classes,) what a client whose data is these ``rows`` of ``split`` adds to its logits in local training, put in
        each batch under ``LOGIT_OFFSETS``; None: nothing (objectives without class logits)."""
        return None

    @abstractmethod
    def encode(self, table: datasets.Dataset, max_length: int):
        """A split of the task's table as token ids: an object with ``__len__``, ``lengths``, ``batch(rows)`` and ``outputs(rows)``."""

    @abstractmethod
    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean training loss of the (transformers) model on a batch: a scalar with a gradient."""

    @abstractmethod
    def row_losses(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) each row's summed loss and (B,) how many terms it sums: rows of several clients trained in one pass
        (``engine/parallel.py``) each get their own client's mean."""

    @abstractmethod
    def score(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> Scored:
        """Loss and, where one forward pass tells, correct answers on an evaluation batch."""

    def exact_matches(self, module: nn.Module, split, rows: np.ndarray) -> int:
        """How many generated answers match their reference (objectives whose ``score`` cannot tell)."""
        raise NotImplementedError(f"{type(self).__name__} scores answers in one forward pass")
