"""What a model learns from a batch and how the global model is scored, one file per kind of data (data.format)."""

from __future__ import annotations

from legend.config import Config
from legend.objectives.base import LOGIT_OFFSETS, Objective, Scored
from legend.objectives.classification import Classification
from legend.objectives.instruct import Instruct

__all__ = ["LOGIT_OFFSETS", "Classification", "Instruct", "Objective", "Scored", "objective_for"]


def objective_for(config: Config, label_names: tuple[str, ...], tokenizer) -> Objective:
    """The objective of data.format, for a task with these labels (none: open instructions), with this model's tokenizer."""
    if config.data.format == "instruct":
        return Instruct(config, label_names, tokenizer)
    return Classification(config, label_names, tokenizer)
