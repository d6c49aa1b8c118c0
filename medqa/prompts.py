"""Prompt text for PubMedQA: label words, the question/context prompt and the chat turns.

Pure text, no torch and no tokenizer calls: `data.py` turns these strings into token ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

LABELS: tuple[str, ...] = ("yes", "no", "maybe")
"""The PubMedQA decisions, in the order used for class indices everywhere in medqa."""

Target = Literal["decision", "long_answer"]

SYSTEM_PROMPT = (
    "You are a biomedical research assistant. You read the abstract of a PubMed article "
    "and answer the research question about it with yes, no or maybe."
)
INSTRUCTION = "Answer with yes, no or maybe."
CONTEXT_PLACEHOLDER = "\x00MEDQA_CONTEXT\x00"
"""Stands in for the abstract while a prompt is rendered, so the tokenizer can cut the
abstract alone when an example is too long (the question and answer are never cut)."""

RATIONALE_REQUEST = "Explain your answer in one or two sentences."
"""Asked after the scored decision when `predict` generates a rationale."""

DECISION_LEAD = "Answer:"
"""Precedes the decision word when the long answer comes first (target `long_answer`)."""


@dataclass(frozen=True)
class PromptSettings:
    """The prompt text a model is trained and asked with. Saved with every checkpoint: a
    model fine-tuned under one prompt is not the same model under another, so a run with a
    different prompt refuses the checkpoint, and `export` writes the checkpoint's."""

    system: str = SYSTEM_PROMPT
    instruction: str = INSTRUCTION
    labels: tuple[str, ...] = LABELS

    def as_dict(self) -> dict[str, Any]:
        return {"system": self.system, "instruction": self.instruction, "labels": list(self.labels)}


def prompt_differences(saved: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """What differs between a checkpoint's saved prompt settings and this run's, one entry a
    setting, quoting both (shortened)."""
    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."

    return [f"{key}: checkpoint {short(saved.get(key))}, this run {short(ours[key])}"
            for key in ours if saved.get(key) != ours[key]]


def format_contexts(contexts: list[str], section_labels: list[str]) -> str:
    """The abstract's sections, one paragraph each, led by their section names."""
    parts = []
    for i, text in enumerate(contexts):
        label = section_labels[i] if i < len(section_labels) else ""
        parts.append(f"{label}: {text}" if label else text)
    return "\n".join(parts)


def user_turn(question: str, context_text: str, settings: PromptSettings = PromptSettings()) -> str:
    """The user's message: the abstract, then the question, then the instruction."""
    return f"Abstract:\n{context_text}\n\nQuestion: {question}\n{settings.instruction}"


def chat_messages(question: str, settings: PromptSettings = PromptSettings()) -> list[dict[str, str]]:
    """System and user turns for a chat template, the abstract left as a placeholder."""
    return [
        {"role": "system", "content": settings.system},
        {"role": "user", "content": user_turn(question, CONTEXT_PLACEHOLDER, settings)},
    ]


def plain_prompt(question: str, settings: PromptSettings = PromptSettings()) -> str:
    """Prompt for tokenizers without a chat template, the abstract left as a placeholder."""
    return f"{settings.system}\n\n{user_turn(question, CONTEXT_PLACEHOLDER, settings)}\nAnswer:"


def answer_head(long_answer: str, target: Target, chat: bool) -> str:
    """What the assistant writes before the decision word: nothing, or the long answer."""
    if target == "decision":
        return ""
    lead = "" if chat else " "
    return f"{lead}{long_answer.strip()}\n{DECISION_LEAD}"


def label_surface(word: str, target: Target, chat: bool) -> str:
    """A label word as written at the scoring position: after 'Answer:' it takes a space."""
    return word if chat and target == "decision" else f" {word}"


def plain_rationale_request() -> str:
    """The follow-up request after the decision, for tokenizers without a chat template."""
    return f"\n{RATIONALE_REQUEST}\nExplanation:"
