"""Instruction tuning of a causal LM: next-token cross-entropy on the response tokens only.

Only the positions that predict a response token go through the vocabulary projection (the LM head),
not every position of the prompt: on a 135M decoder with a 49k vocabulary that projection over a whole
batch costs as much as the forward pass through the blocks. A label task (a prompt and a word per class)
is scored by the likelihood of each class's word at the first answer position, in the same forward pass as
the loss; open answers by greedy generation, compared with the reference after SQuAD's normalisation
(lower case, no punctuation, no articles, single spaces).
"""

from __future__ import annotations

import re
import string

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from legend.config import Config
from legend.data.batching import model_inputs
from legend.data.instructions import IGNORE, InstructSplit, chat_template, encode_conversations, label_conversations, response_text
from legend.data.table import column
from legend.data.tasks import TASKS
from legend.errors import LegendError
from legend.objectives.base import Objective, Scored

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise_answer(text: str) -> str:
    """SQuAD's answer normalisation: exact match up to case, punctuation, articles and spacing."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


class Instruct(Objective):
    causal_lm = True

    def __init__(self, config: Config, label_names: tuple[str, ...], tokenizer):
        data = config.data
        self.label_names, self.tokenizer, self.max_new_tokens = label_names, tokenizer, config.eval.max_new_tokens
        self.chat = chat_template(tokenizer, data.template)
        self.choices = None  # label tasks: the first token of each class's word
        if label_names:
            spec = TASKS.get(data.task)
            self.prompt = data.prompt or (spec.prompt if spec else "")
            self.label_words = tuple(data.label_words) or (spec.label_words if spec else ())
            if not self.prompt:
                raise LegendError("data.prompt: a custom label task trained as instructions needs a prompt holding {text}; set data.prompt")
            if len(self.label_words) != len(label_names):
                raise LegendError(
                    f"data.label_words: {len(self.label_words)} words for the {len(label_names)} classes {list(label_names)}; give one "
                    "word per class, in class order"
                )
            first = [tokenizer(response_text(word, self.chat), add_special_tokens=False)["input_ids"][0] for word in self.label_words]
            if len(set(first)) < len(first):
                raise LegendError(
                    f"data.label_words {list(self.label_words)}: two start with the same token, and accuracy compares the first "
                    "token's likelihood; choose words that start differently"
                )
            self.choices = torch.tensor(first)

    def encode(self, table: datasets.Dataset, max_length: int) -> InstructSplit:
        if self.label_names:
            prompts, responses = label_conversations(table, self.prompt, self.label_words)
            classes = np.asarray(column(table, "label"), dtype=np.int64)
        else:
            read = table[:]
            prompts, responses, classes = read["prompt"], read["response"], None
        return encode_conversations(prompts, responses, self.tokenizer, max_length, self.chat, classes)

    def _response_logits(self, module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, V) float32 logits at the N positions that predict a response token, their (N,) targets, and (B,) where
        each row's first such position is among the N."""
        body = module.get_submodule(module.base_model_prefix)
        hidden = body(**model_inputs(batch), use_cache=False).last_hidden_state  # (B, T, H)
        targets = batch["labels"][:, 1:]  # position t predicts token t + 1
        predicts = targets != IGNORE
        logits = module.get_output_embeddings()(hidden[:, :-1][predicts]).float()
        per_row = predicts.sum(1)
        return logits, targets[predicts], per_row.cumsum(0) - per_row

    def loss(self, module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, targets, _ = self._response_logits(module, batch)
        return F.cross_entropy(logits, targets)

    def row_losses(self, module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits, targets, _ = self._response_logits(module, batch)
        per_row = (batch["labels"][:, 1:] != IGNORE).sum(1)
        row_of = torch.repeat_interleave(torch.arange(len(per_row), device=per_row.device), per_row)
        sums = torch.zeros(len(per_row), device=logits.device).index_add(0, row_of, F.cross_entropy(logits, targets, reduction="none"))
        return sums, per_row.float()

    def score(self, module, batch: dict[str, torch.Tensor]) -> Scored:
        return self.score_with_choices(module, batch)[0]

    def score_with_choices(self, module, batch: dict[str, torch.Tensor]) -> tuple[Scored, torch.Tensor | None]:
        """The score, and (label tasks) each class word's first-token logit where the answer starts, (B, classes): one forward pass."""
        logits, targets, first = self._response_logits(module, batch)
        choices = None if self.choices is None else logits[first][:, self.choices]
        correct = None if choices is None else int((choices.argmax(-1) == batch["classes"]).sum())
        return Scored(F.cross_entropy(logits, targets, reduction="sum").item(), len(targets), correct), choices

    def choice_logits(self, module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, classes): each class word's first-token logit where the answer starts (label tasks)."""
        return self.score_with_choices(module, batch)[1]

    def exact_matches(self, module, split: InstructSplit, rows: np.ndarray) -> int:
        """Greedy answers to the rows' prompts, compared with their references."""
        answers = self.generate(module, [split.input_ids[i][: split.prompt_lengths[i]] for i in rows], split.pad_token_id)
        return sum(normalise_answer(answer) == normalise_answer(split.references[i]) for answer, i in zip(answers, rows, strict=True))

    def generate(self, module, prompts: list[np.ndarray], pad_token_id: int) -> list[str]:
        """Greedy answers (at most eval.max_new_tokens) to tokenised prompts, left-padded into one batch."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, prompt in enumerate(prompts):
            ids[j, width - len(prompt) :] = torch.from_numpy(prompt)
            mask[j, width - len(prompt) :] = 1
        out = module.generate(
            input_ids=ids.to(module.device),
            attention_mask=mask.to(module.device),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        return [answer.strip() for answer in self.tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)]
