"""From records to batches, for any task: tokenization with answer-only labels (only the
task's passage is cut to fit), the label words' token ids, and per-batch padding."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch

from medqa import prompts
from medqa.prompts import Reasoning, Target
from medqa.records import DataError
from medqa.tasks import Record, Task, get_task


@dataclass
class Example:
    """A tokenized record: the prompt's `prompt_len` tokens, then the answer; `answer_pos`
    indexes the first token of the decision word, whose logits are read at `answer_pos - 1`."""

    id: str
    input_ids: list[int]
    prompt_len: int
    answer_pos: int
    label: int
    truncated: bool = False

    @property
    def labels(self) -> list[int]:
        """The training targets: -100 over the prompt, the answer's own tokens after it."""
        return [-100] * self.prompt_len + self.input_ids[self.prompt_len :]


@dataclass
class PromptFormat:
    """Turns one task's records into token ids with one tokenizer and one answer target
    (`task` None: PubMedQA, medqa's default; `settings` None: the task's own prompt;
    `reasoning` "free": the record's conclusion follows its passage and is never cut)."""

    tokenizer: Any
    target: Target = "decision"
    max_length: int = 1024
    task: Task | None = None
    settings: prompts.PromptSettings | None = None
    reasoning: Reasoning = "required"
    chat: bool = field(init=False)
    _label_ids: list[list[int]] | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.task = self.task or get_task("pubmedqa")
        self.settings = self.settings or self.task.default_prompt()
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        self._end = self._end_of_answer()

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _after_answer(self, turns: list[dict[str, str]], generation_prompt: bool = False) -> str:
        """What the chat template writes after an assistant answer, up to the end of `turns`
        (the turns that follow it), as text."""
        marker = "MEDQA_ANSWER_MARKER"
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}, *turns],
            tokenize=False, add_generation_prompt=generation_prompt,
        )
        return text[text.rindex(marker) + len(marker) :]

    def _end_of_answer(self) -> list[int]:
        if self.chat:
            # The chat template closes the assistant turn with its own end-of-turn token.
            tail = self._after_answer([])
            ids = self._encode(tail.strip() or tail)
            if ids:
                return ids
        if self.tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no end-of-sequence token; one is needed to end the answer")
        return [self.tokenizer.eos_token_id]

    def _prompt_parts(self, record: Record) -> tuple[str, str]:
        """The prompt's text before and after the passage."""
        passage = prompts.CONTEXT_PLACEHOLDER
        if self.reasoning == "free":
            if not record.long_answer.strip():
                raise DataError(f"record {record.id!r}: --data.reasoning free gives the record's conclusion (its "
                                f"long answer), and it has none: use --data.reasoning required, or records with long answers "
                                f"(PubMedQA's have them)")
            passage += prompts.given_conclusion(record.long_answer)
        user = self.task.user_turn(record, passage, self.settings.instruction)
        if self.chat:
            text = self.tokenizer.apply_chat_template(
                prompts.chat_messages(user, self.settings), tokenize=False, add_generation_prompt=True
            )
        else:
            text = (self.tokenizer.bos_token or "") + prompts.plain_prompt(user, self.settings)
        prefix, _, suffix = text.partition(prompts.CONTEXT_PLACEHOLDER)  # no passage: all of it is prefix
        return prefix, suffix

    def rationale_suffix_ids(self) -> list[list[int]]:
        """For each label, the tokens that follow it as the decision to ask why: the end of
        the assistant's turn, a user turn with the request naming the label, and the
        assistant's turn opening."""
        if not self.chat:
            return [self._encode(prompts.plain_rationale_request(w)) for w in self.settings.labels]
        return [self._encode(self._after_answer([{"role": "user", "content": prompts.rationale_request(w)}],
                                                generation_prompt=True)) for w in self.settings.labels]

    def label_token_ids(self) -> list[list[int]]:
        """Token ids of each label word as written at the scoring position (tokenized once:
        `encode` asks for them for every record)."""
        if self._label_ids is None:
            self._label_ids = [self._encode(prompts.label_surface(w, self.target, self.chat)) for w in self.settings.labels]
        return self._label_ids

    def encode(self, record: Record) -> Example:
        """Tokenize one record; when too long, only the task's passage is cut (from its end)."""
        return self._assemble(record, *(self._encode(text) for text in self._texts(record)))

    def encode_many(self, records: Iterable[Record], chunk: int = 2048) -> Iterator[Example]:
        """`encode` of each record, the same examples, with the tokenizer called on a chunk of
        texts at a time (a fast tokenizer works through a list in Rust, several times quicker
        than one call a text). `records` may be a stream: a chunk is read at a time."""
        records = iter(records)
        while part := list(islice(records, chunk)):
            columns = zip(*(self._texts(r) for r in part))  # prefixes, passages, suffixes, answer heads
            ids = [self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] for texts in columns]
            yield from (self._assemble(r, *pieces) for r, pieces in zip(part, zip(*ids)))

    def _texts(self, record: Record) -> tuple[str, str, str, str]:
        """The record's prompt before its passage, the passage, the prompt after it, and what
        the answer writes before the decision word."""
        if self.target == "long_answer" and not record.long_answer.strip():
            raise DataError(f"record {record.id!r}: --data.target long_answer trains the model to write the record's "
                            "long answer, and it has none: use --data.target decision, or records with long answers "
                            "(PubMedQA's have them; MedQA-USMLE's do not)")
        prefix, suffix = self._prompt_parts(record)
        return prefix, self.task.passage(record), suffix, prompts.answer_head(record.long_answer, self.target, self.chat)

    def _assemble(self, record: Record, pre: list[int], context: list[int], post: list[int],
                  head: list[int]) -> Example:
        word = self.label_token_ids()[record.label]
        fixed = len(pre) + len(post) + len(head) + len(word) + len(self._end)
        budget = self.max_length - fixed
        if budget < 0:
            raise DataError(
                f"record {record.id!r}: the prompt without its passage plus the answer takes {fixed} "
                f"tokens, more than --data.max_length {self.max_length}; raise max_length"
            )
        truncated = len(context) > budget
        context = context[:budget]
        prompt = pre + context + post
        answer = head + word + self._end
        return Example(
            id=record.id,
            input_ids=prompt + answer,
            prompt_len=len(prompt),
            answer_pos=len(prompt) + len(head),
            label=record.label,
            truncated=truncated,
        )


def collate(examples: Sequence[Example], pad_id: int, longest: int | None = None,
            class_weights: Sequence[float] | None = None) -> dict[str, Any]:
    """Right-pad a batch to its own longest example. A batch of the training order is marked
    `train` (the DataModule counts them as steps take them) and carries `longest`, the token
    positions of the largest training batch the data can produce, which sizes the model's
    memory plan. With `class_weights` (indexed by label) each example's loss weight travels
    in `weight`."""
    batch = _padded(examples, pad_id)
    if class_weights is not None:
        batch["weight"] = torch.tensor([class_weights[e.label] for e in examples], dtype=torch.float32)
    return {**batch, "train": True, "longest_batch_tokens": longest} if longest is not None else batch


def _padded(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    # Positions whose next token is an answer token, flattened over (batch, time).
    rows, cols = torch.nonzero(labels[:, 1:] != -100, as_tuple=True)
    return {
        "ids": [e.id for e in examples],
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "answer_pos": torch.tensor([e.answer_pos for e in examples]),
        "label": torch.tensor([e.label for e in examples]),
        "loss_pos": rows * width + cols,
        "loss_targets": labels[rows, cols + 1],
        "num_tokens": sum(len(e.input_ids) for e in examples),
    }
