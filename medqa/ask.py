"""`python -m medqa ask --config CONFIG --ckpt_path best --question "..." --context "..."`:
one question, scored the way `predict` scores the test set.

The abstract is given with `--context` (once per section), or the whole question as one
JSON record on standard input (`--record -`): `{"question": ..., "contexts": [...]}` or the
hub's schema (`context: {contexts: [...], labels: [...]}`). PubMedQA only (`--data.task
pubmedqa`, the default). Prints the decision and the label probabilities; `--rationale_tokens N` adds a generated explanation. Model settings come from
the config and flags, as for `predict`; without `--ckpt_path` the base model answers
(zero-shot).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch


def read_record(source: str) -> tuple[str, list[str], list[str] | None]:
    """(question, contexts, section labels) from a JSON record in a file or on stdin ('-')."""
    from medqa.records import DataError, parse_json, read_text

    where = "standard input" if source == "-" else source
    text = sys.stdin.read() if source == "-" else read_text(Path(source))  # names the file if unreadable
    raw = parse_json(text, where)
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object with 'question' and 'contexts', got a {type(raw).__name__}")
    context = raw.get("context", {})
    contexts = raw.get("contexts", context.get("contexts") if isinstance(context, dict) else context)
    labels = raw.get("labels", context.get("labels") if isinstance(context, dict) else None)
    return raw.get("question"), [contexts] if isinstance(contexts, str) else contexts, labels


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m medqa ask", description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--question")
    parser.add_argument("--context", action="append", default=[], help="a section of the abstract (repeat for more)")
    parser.add_argument("--record", help="a JSON record instead: a file, or - for standard input")
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

    from medqa.checkpoints import load_checkpoint
    from medqa.cli import cli_for
    from medqa.data import checkpoint_prompt
    from medqa.records import DataError
    from medqa.tokens import collate
    from medqa.tasks.pubmedqa import make_record

    if args.record is not None:
        question, contexts, labels = read_record(args.record)
    else:
        question, contexts, labels = args.question, args.context, None
    if not question or not contexts:
        raise DataError("ask needs a question and its abstract: --question TEXT --context TEXT [--context ...], "
                        "or --record FILE|- with a JSON record")
    record = make_record("question", question, contexts, labels, "", "yes", "the question asked",
                         ("question", "context", "labels", "long_answer", "final_decision"))

    cli, ckpt_path = cli_for("predict", [*rest, *(["--ckpt_path", args.ckpt_path] if args.ckpt_path else [])])
    model, data = cli.model, cli.datamodule
    if data.task.name != "pubmedqa":
        raise DataError(f"ask asks PubMedQA questions (a question and its abstract); --data.task {data.task.name} "
                        "is scored with predict on a file of its records")
    if data.target != "decision":
        raise DataError("ask scores the decision from the abstract alone: use --data.target decision "
                        "(long_answer is PubMedQA's reasoning-free setting, which needs the gold long answer)")
    fmt = data.formatter
    model.configure_model()
    model.rationale_tokens = args.rationale_tokens
    if ckpt_path is not None:
        checkpoint = load_checkpoint(Path(ckpt_path), cli.config.predict.weights_only)
        data.check_prompt(checkpoint_prompt(checkpoint))
        model.on_load_checkpoint(checkpoint)  # refuses a checkpoint that does not fit, naming why
        model.load_state_dict(checkpoint["state_dict"], strict=False)
    device = next(model.model.parameters()).device
    model.to(device).eval()
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate([fmt.encode(record)], data.pad_id).items()}
    with torch.no_grad():
        out = model.predict_step(batch, 0)
    probs = out["probs"][0].tolist()
    answer = {"decision": model.labels[max(range(len(probs)), key=probs.__getitem__)],
              **{f"p_{w}": round(p, 6) for w, p in zip(model.labels, probs)}, "checkpoint": ckpt_path}
    if "rationale_ids" in out:
        answer["rationale"] = data.decode(out["rationale_ids"][0])
    print(json.dumps(answer, indent=1))
    return answer
