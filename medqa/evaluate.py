"""`python -m medqa evaluate PREDICTIONS.json`: score a prediction file the way the PubMedQA
authors' scorer does (their `evaluation.py`: scikit-learn's `accuracy_score` and
`f1_score(average="macro")` over the label strings), refusing a file that does not answer
exactly the test questions. The same scores serve every task (`--task`; MedQA-USMLE reports
accuracy).

The truth is a `{question id: label}` file such as PubMedQA's official
`test_ground_truth.json` (`--truth`), or the test split that medqa computes from a data
source (`--source`), for PQA-L the same 500 questions.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

from medqa.records import DataError, parse_json
from medqa.results import write_json
from medqa.tasks import Task, get_task, task_names


class EvaluationError(ValueError):
    """A prediction or truth file that cannot be scored, saying which and why."""


def read_answers(path: Path, what: str, labels: Sequence[str]) -> dict[str, str]:
    """A JSON object `{question id: label}`, each label one of `labels`, checked."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvaluationError(f"{what} file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise EvaluationError(f"{what} file {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise EvaluationError(f"{what} file {path}: cannot be read ({e.strerror})") from None
    raw = parse_json(text, f"{what} file {path}", EvaluationError)  # repeated ids refused, not overwritten
    if not isinstance(raw, dict):
        raise EvaluationError(
            f"{what} file {path}: expected a JSON object {{question id: label}}, got a {type(raw).__name__}"
        )
    if not raw:
        raise EvaluationError(f"{what} file {path}: holds no answers (an empty object)")
    bad = [(k, v) for k, v in raw.items() if v not in labels]
    if bad:
        shown = ", ".join(f"{k!r}: {v!r}" for k, v in bad[:3])
        raise EvaluationError(
            f"{what} file {path}: {len(bad)} entries are not one of {', '.join(labels)} (e.g. {shown})"
        )
    return raw


def official_scores(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 with the official scorer's semantics: F1 is averaged over the
    labels that occur in the truth or the predictions (scikit-learn's default), a label with
    no true positive scoring 0."""
    n = len(truth)
    scores = {"accuracy": sum(t == p for t, p in zip(truth, predicted)) / n}
    f1 = {}
    for label in sorted(set(truth) | set(predicted)):
        tp = sum(t == p == label for t, p in zip(truth, predicted))
        fp = sum(p == label != t for t, p in zip(truth, predicted))
        fn = sum(t == label != p for t, p in zip(truth, predicted))
        f1[label] = 2 * tp / (2 * tp + fp + fn)
    scores["macro_f1"] = sum(f1.values()) / len(f1)
    scores.update({f"f1_{label}": f1.get(label, 0.0) for label in labels})
    return scores


def evaluate(predictions: Mapping[str, str], truth: Mapping[str, str], where: str,
             labels: Sequence[str] = ("yes", "no", "maybe")) -> dict[str, float]:
    """Scores of `predictions` against `truth`; refuses missing or extra question ids."""
    missing = [k for k in truth if k not in predictions]
    extra = [k for k in predictions if k not in truth]
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"{len(missing)} test questions have no answer (e.g. {', '.join(missing[:5])})")
        if extra:
            problems.append(f"{len(extra)} answers are for questions not in the test set (e.g. {', '.join(extra[:5])})")
        raise EvaluationError(
            f"{where} must answer all and only the {len(truth)} test questions: " + "; ".join(problems)
        )
    ids = list(truth)
    return official_scores([truth[k] for k in ids], [predictions[k] for k in ids], labels)


def truth_from_source(task: Task, source: str, hub_config: str | None) -> dict[str, str]:
    """The official test questions' answers, from a medqa data source of `task`."""
    return {r.id: task.labels[r.label] for r in task.split(task.read(source, hub_config), 0)["test"]}


def format_scores(scores: Mapping[str, float], n: int, labels: Sequence[str]) -> str:
    lines = [f"{n} questions", f"accuracy  {scores['accuracy']:.6f}", f"macro-F1  {scores['macro_f1']:.6f}"]
    lines += [f"F1 {label:<6}{scores[f'f1_{label}']:.6f}" for label in labels]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m medqa evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", type=Path, help="predictions.json: {question id: label}")
    parser.add_argument("--task", default="pubmedqa", choices=task_names(), help="the task the predictions answer")
    parser.add_argument("--truth", type=Path,
                        help="{question id: label} file, e.g. test_ground_truth.json from the PubMedQA repository")
    parser.add_argument("--source",
                        help="instead of --truth: a medqa data source of the task (as --data.source: a file or "
                             "folder, synthetic, or a hub id) whose official test split is the truth")
    parser.add_argument("--hub_config", help="hub configuration of --source (default: the task's)")
    parser.add_argument("--out", type=Path, help="also write the scores to this JSON file")
    args = parser.parse_args(argv)

    task = get_task(args.task)
    if (args.truth is None) == (args.source is None):
        raise EvaluationError(
            "give the truth once: --truth test_ground_truth.json (the PubMedQA repository's data/ folder), or "
            f"--source ori_pqal.json | synthetic | {task.default_source} (its official test split)")
    predictions = read_answers(args.predictions, "predictions", task.labels)
    if args.truth is not None:
        truth = read_answers(args.truth, "truth", task.labels)
    else:
        try:
            truth = truth_from_source(task, args.source, args.hub_config)
        except DataError as e:
            raise EvaluationError(f"could not read the truth from --source {args.source}: "
                                  + str(e).replace("--data.source", "--source")) from None
    scores = evaluate(predictions, truth, str(args.predictions), task.labels)
    print(format_scores(scores, len(truth), task.labels))
    if args.out is not None:
        if args.out.exists():
            raise EvaluationError(f"{args.out} exists; remove it or choose another --out")
        write_json(args.out, {"questions": len(truth), **scores})
    return scores
