"""The prompt's shape, shared by every task: the system and user turns, the answer lead, the
rationale request, and the settings saved with every checkpoint. A task supplies its own
label words, system text, instruction and user message (`medqa.tasks`).

Pure text, no torch and no tokenizer calls: `medqa.tokens` turns these strings into token ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Target = Literal["decision", "long_answer"]
Reasoning = Literal["required", "free"]
"""PubMedQA's two settings: `required`, the official task (the abstract without its
conclusion), or `free`, the paper's reasoning-free setting (the conclusion given too)."""

CONTEXT_PLACEHOLDER = "\x00MEDQA_CONTEXT\x00"
"""Stands in for the passage (PubMedQA's abstract) while a prompt is rendered, so the
tokenizer can cut the passage alone when an example is too long (the question and answer are never cut)."""

RATIONALE_REQUEST = "Explain in one or two sentences why the answer is {label}."
"""Asked after the scored decision when `predict` generates a rationale. It names the
decision, so the explanation argues for the answer given: asked only to "explain your
answer", a model may argue for another (the demo's said "maybe" beside a "no")."""

DECISION_LEAD = "Answer:"
"""Precedes the decision word when the long answer comes first (target `long_answer`)."""


@dataclass(frozen=True)
class PromptSettings:
    """The prompt text a model is trained and asked with. Saved with every checkpoint: a
    model fine-tuned under one prompt is not the same model under another, so a run with a
    different prompt refuses the checkpoint, and `export` writes the checkpoint's."""

    task: str
    system: str
    instruction: str
    labels: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "system": self.system, "instruction": self.instruction, "labels": list(self.labels)}


def prompt_differences(saved: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """What differs between a checkpoint's saved prompt settings and this run's, one entry a
    setting, quoting both (shortened)."""
    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."

    saved = {"task": "pubmedqa", **saved}  # saved before medqa had a second task
    return [f"{key}: checkpoint {short(saved.get(key))}, this run {short(ours[key])}"
            for key in ours if saved.get(key) != ours[key]]


def chat_messages(user: str, settings: PromptSettings) -> list[dict[str, str]]:
    """System and user turns for a chat template; `user` is the task's message."""
    return [{"role": "system", "content": settings.system}, {"role": "user", "content": user}]


def plain_prompt(user: str, settings: PromptSettings) -> str:
    """Prompt for tokenizers without a chat template."""
    return f"{settings.system}\n\n{user}\nAnswer:"


def given_conclusion(long_answer: str) -> str:
    """The conclusion as the reasoning-free setting shows it, after the abstract's sections."""
    return f"\nCONCLUSIONS: {long_answer.strip()}"


def answer_head(long_answer: str, target: Target, chat: bool) -> str:
    """What the assistant writes before the decision word: nothing, or the long answer."""
    if target == "decision":
        return ""
    lead = "" if chat else " "
    return f"{lead}{long_answer.strip()}\n{DECISION_LEAD}"


def label_surface(word: str, target: Target, chat: bool) -> str:
    """A label word as written at the scoring position. Opening the assistant's turn it
    starts a sentence, so it is capitalised ("Yes"): SmolLM2-135M-Instruct, asked a PQA-L
    question under its ChatML template, put 15% and 33% of its next-token probability on
    "Yes" and "No" and 6% and 2% on "yes" and "no", so scoring the lower-case words read a
    minority of its answer. After 'Answer:' the word takes a space and stays lower-case."""
    return word[:1].upper() + word[1:] if chat and target == "decision" else f" {word}"


def rationale_request(label: str) -> str:
    """The follow-up request after the decision `label`."""
    return RATIONALE_REQUEST.format(label=f'"{label}"')


def plain_rationale_request(label: str) -> str:
    """The follow-up request after the decision, for tokenizers without a chat template."""
    return f"\n{rationale_request(label)}\nExplanation:"
