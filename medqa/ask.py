"""`python -m medqa ask --config CONFIG --ckpt_path best --question "..." --context "..."`:
one question, scored the way `predict` scores the test set.

The abstract is given with `--context` (once per section), or the whole question as one
JSON record on standard input (`--record -`): `{"question": ..., "contexts": [...]}` or the
hub's schema (`context: {contexts: [...], labels: [...]}`). Many questions at once, with
one model load: `--questions FILE.jsonl`, one such record a line (an optional "id" each),
answered with one JSON line each. PubMedQA only (`--data.task pubmedqa`, the default).
Prints the decision and the label probabilities; `--rationale_tokens N` adds an explanation
of that decision, generated after it. Model settings come from the config and flags, as for
`predict`; without `--ckpt_path` the base model answers (zero-shot).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def _question(raw: Any, where: str) -> tuple[str, list[str], list[str] | None]:
    """(question, contexts, section labels) of one JSON record, in `--record`'s shapes."""
    from medqa.records import DataError

    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object with 'question' and 'contexts', got a {type(raw).__name__}")
    context = raw.get("context", {})
    contexts = raw.get("contexts", context.get("contexts") if isinstance(context, dict) else context)
    labels = raw.get("labels", context.get("labels") if isinstance(context, dict) else None)
    return raw.get("question"), [contexts] if isinstance(contexts, str) else contexts, labels


def read_record(source: str) -> tuple[str, list[str], list[str] | None]:
    """(question, contexts, section labels) from a JSON record in a file or on stdin ('-')."""
    from medqa.records import parse_json, read_text

    where = "standard input" if source == "-" else source
    text = sys.stdin.read() if source == "-" else read_text(Path(source))  # names the file if unreadable
    return _question(parse_json(text, where), where)


def read_questions(path: Path) -> list[tuple[str, str, list[str], list[str] | None]]:
    """(id, question, contexts, section labels) of each line of a JSONL file: a record as for
    `--record`, with an optional "id" (default: its line number)."""
    from medqa.records import DataError, json_lines, read_text

    out = []
    for n, raw, where in json_lines(read_text(path), path):
        question, contexts, labels = _question(raw, where)
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: field 'question' must be a non-empty string")
        if not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) for c in contexts):
            raise DataError(f"{where}: field 'contexts' must be a non-empty list of strings (the abstract's sections)")
        out.append((str(raw.get("id", n)), question, contexts, labels))
    if not out:
        raise DataError(f"{path}: no questions in it (one JSON object a line)")
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]] | dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m medqa ask", description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--question")
    parser.add_argument("--context", action="append", default=[], help="a section of the abstract (repeat for more)")
    parser.add_argument("--record", help="a JSON record instead: a file, or - for standard input")
    parser.add_argument("--questions", type=Path,
                        help="many questions, one JSON record a line (an optional \"id\" each); one JSON line out each")
    parser.add_argument("--ckpt_path", help="a checkpoint, or last / best as for predict; none: the base model")
    parser.add_argument("--rationale_tokens", type=int, default=0, help="also generate an explanation this long")
    parser.add_argument("-h", "--help", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if args.rationale_tokens < 0:
        from medqa.records import DataError

        raise DataError(f"--rationale_tokens must be 0 or more, got {args.rationale_tokens}")
    if args.help:
        parser.print_help()
        print("\nAll other options are predict's: python -m medqa predict --help")
        return {}

    from medqa.records import DataError

    if args.questions is not None:
        asked = read_questions(args.questions)
    else:
        if args.record is not None:
            question, contexts, labels = read_record(args.record)
        else:
            question, contexts, labels = args.question, args.context, None
        if not question or not contexts:
            raise DataError("ask needs a question and its abstract: --question TEXT --context TEXT [--context ...], "
                            "--record FILE|- with a JSON record, or --questions FILE.jsonl")
        asked = [("question", question, contexts, labels)]
    with answers_only():
        answers = Asker(rest, args.ckpt_path, args.rationale_tokens).answer(asked)
    if args.questions is None:
        answers[0].pop("id")
        print(json.dumps(answers[0], indent=1))
        return answers[0]
    for answer in answers:
        print(json.dumps(answer))
    return answers


@contextmanager
def answers_only() -> Iterator[None]:
    """No loading bars and no Lightning notes while `ask` works (warnings and errors stay);
    as they were afterwards, for a caller in the same process."""
    from transformers.utils import logging as transformers_logging

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels, bars = [lg.level for lg in loggers], transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars:
            transformers_logging.enable_progress_bar()


class Asker:
    """The model and data `predict` would use, loaded once, answering records in batches."""

    def __init__(self, options: list[str], ckpt_path: str | None, rationale_tokens: int) -> None:
        from medqa.checkpoints import load_checkpoint
        from medqa.cli import cli_for
        from medqa.data import checkpoint_prompt
        from medqa.records import DataError

        cli, self.ckpt_path = cli_for("predict", [*options, *(["--ckpt_path", ckpt_path] if ckpt_path else [])])
        self.model, self.data = cli.model, cli.datamodule
        if self.data.task.name != "pubmedqa":
            raise DataError(f"ask asks PubMedQA questions (a question and its abstract); --data.task {self.data.task.name} "
                            "is scored with predict on a file of its records")
        if self.data.target != "decision":
            raise DataError("ask scores the decision from the abstract alone: use --data.target decision "
                            "(long_answer is PubMedQA's reasoning-free setting, which needs the gold long answer)")
        self.model.configure_model()
        self.model.rationale_tokens = rationale_tokens
        if self.ckpt_path is not None:
            checkpoint = load_checkpoint(Path(self.ckpt_path), cli.config.predict.weights_only)
            self.data.check_prompt(checkpoint_prompt(checkpoint))
            self.model.on_load_checkpoint(checkpoint)  # refuses a checkpoint that does not fit, naming why
            self.model.load_state_dict(checkpoint["state_dict"], strict=False)
        self.model.start_ensemble(self.ckpt_path)
        self.device = next(self.model.model.parameters()).device
        self.model.to(self.device).eval()

    def answer(self, asked: list[tuple[str, str, list[str], list[str] | None]]) -> list[dict[str, Any]]:
        from medqa.tasks.pubmedqa import make_record
        from medqa.tokens import collate

        fields = ("question", "context", "labels", "long_answer", "final_decision")
        examples = list(self.data.formatter.encode_many(
            [make_record(i, q, c, labels, "", "yes", "the question asked", fields) for i, q, c, labels in asked]))
        answers, size = [], self.data.eval_batch_size
        for start in range(0, len(examples), size):
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v
                     for k, v in collate(examples[start : start + size], self.data.pad_id).items()}
            with torch.no_grad():
                out = self.model.predict_step(batch, 0)
            for row, probs in enumerate(out["probs"].tolist()):
                answer = {"id": asked[start + row][0],
                          "decision": self.model.labels[max(range(len(probs)), key=probs.__getitem__)],
                          **{f"p_{w}": round(p, 6) for w, p in zip(self.model.labels, probs)}, "checkpoint": self.ckpt_path}
                if "rationale_ids" in out:
                    answer["rationale"] = self.data.decode(out["rationale_ids"][row])
                answers.append(answer)
        return answers
