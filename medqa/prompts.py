"""Prompt text for PubMedQA: label words, the question/context prompt and the chat turns.

Pure text, no torch and no tokenizer calls: `data.py` turns these strings into token ids.
"""

from __future__ import annotations

from typing import Literal

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


def format_contexts(contexts: list[str], section_labels: list[str]) -> str:
    """The abstract's sections, one paragraph each, led by their section names."""
    parts = []
    for i, text in enumerate(contexts):
        label = section_labels[i] if i < len(section_labels) else ""
        parts.append(f"{label}: {text}" if label else text)
    return "\n".join(parts)


def user_turn(question: str, context_text: str) -> str:
    """The user's message: the abstract, then the question, then the instruction."""
    return f"Abstract:\n{context_text}\n\nQuestion: {question}\n{INSTRUCTION}"


def chat_messages(question: str) -> list[dict[str, str]]:
    """System and user turns for a chat template, the abstract left as a placeholder."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user_turn(question, CONTEXT_PLACEHOLDER)},
    ]


def plain_prompt(question: str) -> str:
    """Prompt for tokenizers without a chat template, the abstract left as a placeholder."""
    return f"{SYSTEM_PROMPT}\n\n{user_turn(question, CONTEXT_PLACEHOLDER)}\nAnswer:"


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
