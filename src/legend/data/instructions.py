"""Instruction data: conversations (the turns before a response, and the response to learn), as text and tokens.

Open instruction data comes as Alpaca-style rows (instruction, optional input, output) or chat-style
message lists; a label task becomes instruction data through ``data.prompt`` and a word per class. A
conversation becomes text by the tokenizer's chat template, or by the plain one:

    <each turn's content, a blank line between; an earlier assistant turn as "Answer: <content>">
    Answer: <response>

The loss covers the response's tokens and the end-of-sequence token after them; the prompt's tokens are
masked (-100, PyTorch's ignore index). When prompt and response exceed ``data.max_length``, the response
keeps at most half of it and the prompt loses its first tokens (its end holds the question).
"""

from __future__ import annotations

from dataclasses import dataclass
from string import Formatter

import datasets
import numpy as np
import torch

from legend.config import DataConfig
from legend.data.batching import TokenRows, padded
from legend.errors import LegendError

IGNORE = -100  # target of a position the loss skips
Turn = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": text}


def conversations(table: datasets.Dataset, split: str, cfg: DataConfig) -> datasets.Dataset:
    """Open instruction rows as columns ``prompt`` (the turns before the response) and ``response``."""
    names = table.column_names
    if cfg.messages_column in names:
        pairs = [
            _from_messages(messages, split, row)
            for row, messages in enumerate(table.select_columns([cfg.messages_column])[:][cfg.messages_column])
        ]
    elif cfg.instruction_column in names and cfg.output_column in names:
        read = table.select_columns([c for c in (cfg.instruction_column, cfg.input_column, cfg.output_column) if c in names])[:]
        inputs = read.get(cfg.input_column) or [""] * len(table)
        pairs = [
            ([{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else str(instruction)}], str(output))
            for instruction, extra, output in zip(read[cfg.instruction_column], inputs, read[cfg.output_column], strict=True)
        ]
    else:
        raise LegendError(
            f"data: the {split} split has neither a '{cfg.messages_column}' column nor '{cfg.instruction_column}' and "
            f"'{cfg.output_column}' (columns: {', '.join(names)}); set data.messages_column or data.instruction_column / data.output_column"
        )
    return datasets.Dataset.from_dict({"prompt": [p for p, _ in pairs], "response": [r for _, r in pairs]})


def _from_messages(messages, split: str, row: int) -> tuple[list[Turn], str]:
    """The turns before the last assistant turn, and its content."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages):
        raise LegendError(f"data: messages of row {row} in the {split} split are not a list of {{role, content}} objects")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if not last:
        raise LegendError(
            f"data: row {row} in the {split} split has no assistant turn after a prompt: its last assistant turn is the response to learn"
        )
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages[:last]], str(messages[last]["content"])


def label_conversations(table: datasets.Dataset, prompt: str, label_words: tuple[str, ...]) -> tuple[list[list[Turn]], list[str]]:
    """A label task as instructions: ``prompt`` filled with each example's text as the user's turn, its class's word as the response."""
    fields = {name for _, name, _, _ in Formatter().parse(prompt) if name is not None}
    if not fields <= {"text", "text_pair"} or "text" not in fields:
        raise LegendError(
            f"data.prompt must hold {{text}} (and may hold {{text_pair}}), and no other {{...}} field (got {sorted(fields)}); write "
            f"literal braces as {{{{ }}}}"
        )
    read = table[:]
    pairs = read.get("text_pair") or [""] * len(table)
    prompts = [
        [{"role": "user", "content": prompt.format(text=text, text_pair=pair)}] for text, pair in zip(read["text"], pairs, strict=True)
    ]
    return prompts, [label_words[label] for label in read["label"]]


def chat_template(tokenizer, template: str) -> bool:
    """Whether conversations are rendered with the tokenizer's chat template (data.template)."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has:
        raise LegendError("data.template 'chat': this tokenizer has no chat template; use data.template='plain' or 'auto'")
    return has if template == "auto" else template == "chat"


def render(tokenizer, turns: list[Turn], chat: bool) -> str:
    """The prompt as text, ending where the response starts."""
    if chat:
        return tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    paragraphs = [f"Answer: {t['content']}" if t["role"] == "assistant" else t["content"] for t in turns]
    return "\n\n".join(paragraphs) + "\nAnswer:"


def response_text(response: str, chat: bool) -> str:
    """The response as it follows the prompt: the plain template's "Answer:" is followed by a space."""
    return response if chat else f" {response}"


@dataclass(frozen=True)
class InstructSplit(TokenRows):
    """Per example, the tokens of prompt, response and end-of-sequence (no padding), where the response starts,
    the response as text (what generation is scored against), and for label tasks the class."""

    prompt_lengths: np.ndarray
    pad_token_id: int
    references: list[str]
    classes: np.ndarray | None = None

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """Right-padded input_ids and attention_mask, and ``labels``: the next-token targets, IGNORE outside the responses."""
        rows = [self.input_ids[i] for i in indices]
        input_ids, attention_mask = padded(rows, self.pad_token_id)
        labels = torch.full_like(input_ids, IGNORE)
        for j, i in enumerate(indices):
            labels[j, self.prompt_lengths[i] : len(rows[j])] = torch.from_numpy(rows[j][self.prompt_lengths[i] :])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.classes is not None:
            batch["classes"] = torch.from_numpy(self.classes[np.asarray(indices)])
        return batch

    def outputs(self, indices) -> int:
        """Positions whose next-token logits the loss needs: one per response token."""
        return int(sum(self.lengths[i] - self.prompt_lengths[i] for i in indices))


def encode_conversations(
    prompts: list[list[Turn]], responses: list[str], tokenizer, max_length: int, chat: bool, classes: np.ndarray | None = None
) -> InstructSplit:
    """Token ids of each rendered prompt and response (the chat template writes its own special tokens; the plain
    one gets the tokenizer's usual ones), truncated to ``max_length`` together."""
    prompt_ids = tokenizer([render(tokenizer, turns, chat) for turns in prompts], add_special_tokens=not chat, return_attention_mask=False)[
        "input_ids"
    ]
    response_ids = tokenizer([response_text(r, chat) for r in responses], add_special_tokens=False, return_attention_mask=False)[
        "input_ids"
    ]
    input_ids, prompt_lengths = [], []
    for prompt, response in zip(prompt_ids, response_ids, strict=True):
        response = [*response, tokenizer.eos_token_id]
        if len(prompt) + len(response) > max_length:
            response = response[: max(max_length // 2, max_length - len(prompt))]
            prompt = prompt[max(0, len(prompt) - (max_length - len(response))) :]
        input_ids.append(np.asarray(prompt + response, dtype=np.int64))
        prompt_lengths.append(len(prompt))
    return InstructSplit(input_ids, np.asarray(prompt_lengths, dtype=np.int64), tokenizer.pad_token_id, list(responses), classes)
