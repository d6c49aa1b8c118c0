"""What a task is: the `Task` value every task module defines, and the `Record` fields that
shared code reads of any task's records."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from medqa.prompts import PromptSettings
from medqa.records import DataError


class Record(Protocol):
    """What shared code reads of any task's record."""

    id: str
    question: str  # the question as asked (also how training sources are checked for test questions)
    long_answer: str  # the reasoning written before the answer with `--data.target long_answer` ("" if none)

    @property
    def label(self) -> int: ...  # the answer's index in the task's `labels`


@dataclass(frozen=True)
class Task:
    """One question-answering set.

    Attributes:
        name: What `--data.task` and `evaluate --task` call it.
        labels: The answer words, in class-index order; the model scores exactly these.
        system_prompt: The default system turn (`--data.system_prompt` replaces it).
        instruction: The default line that asks for the answer (`--data.instruction`).
        default_source: The hub dataset read when `--data.source` is not given.
        default_hub_config: Its hub configuration (None where it has none).
        folds: Cross-validation folds of the official split (`--data.fold` is 0..folds-1).
        read: `(source, hub_config) -> records`, every record of a source in its order:
            `synthetic`, a local path, or a hub id.
        split: `(records, fold) -> {"train", "dev", "test"}`: the official split.
        passage: The record's text that may be cut from its end to fit `--data.max_length`
            ("" where nothing may be cut).
        user_turn: `(record, passage, instruction) -> str`: the user's message, `passage`
            standing where the passage goes.
        stream: `(local file, hub_config) -> records`: `read`'s records of a local file one
            at a time, for files too large to hold whole (PQA-A); None: always read whole.
    """

    name: str
    labels: tuple[str, ...]
    system_prompt: str
    instruction: str
    default_source: str
    default_hub_config: str | None
    folds: int
    read: Callable[[str, str | None], list[Any]]
    split: Callable[[Sequence[Any], int], dict[str, list[Any]]]
    passage: Callable[[Any], str]
    user_turn: Callable[[Any, str, str], str]
    stream: Callable[[str, str | None], Iterable[Any]] | None = None

    def default_prompt(self) -> PromptSettings:
        """The task's own prompt settings."""
        return PromptSettings(self.name, self.system_prompt, self.instruction, self.labels)

    def label_counts(self, records: Sequence[Record]) -> dict[str, int]:
        """How many records carry each label."""
        return {w: sum(r.label == i for r in records) for i, w in enumerate(self.labels)}


def counts_text(counts: dict[str, int]) -> str:
    """Records per label as the data summary prints them: "yes 3, no 2, maybe 1"."""
    return ", ".join(f"{w} {n}" for w, n in counts.items())


def held_out(records: Sequence[Record]) -> Callable[[Record], bool]:
    """Whether a record is one of `records`' questions: the same id, or the same question
    text (spaces and case aside)."""
    def question(r: Record) -> str:
        return " ".join(r.question.split()).lower()

    ids, questions = {r.id for r in records}, {question(r) for r in records}
    return lambda r: r.id in ids or question(r) in questions


def without_held_out(train: Iterable[Record], held: Sequence[Record], drop: bool, origin: str, held_origin: str,
                     counts: dict[str, Any], labels: Sequence[str]) -> Iterator[Record]:
    """`train`'s records that are not `held` questions (`held_out`), a record at a time. One
    that is is left out where `drop`; else, once every record is read, the whole source is
    refused, saying how many there are. Fills `counts`: records read, left out, and kept per
    label (as "yes 3, no 2, maybe 1")."""
    is_held, leaked, read, kept = held_out(held), [], 0, [0] * len(labels)
    for r in train:
        read += 1
        if is_held(r):
            leaked.append(r.id)
        else:
            kept[r.label] += 1
            yield r
    if leaked and not drop:
        raise DataError(
            f"--data.train_source {origin}: {len(leaked)} of its {read} questions are dev or test questions of "
            f"{held_origin} (same id or question; e.g. {', '.join(leaked[:5])}). Training on them would inflate every "
            "score: remove them from the file, or pass --data.drop_eval_overlap true to leave them out"
        )
    counts.update(read=read, left_out=len(leaked), labels=counts_text(dict(zip(labels, kept))))
