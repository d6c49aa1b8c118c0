"""`python -m medqa compare BASE.json TUNED.json --truth test_ground_truth.json`: two
prediction files of the same questions side by side, with what the official scores cannot
say alone: how sure they are.

For each file: accuracy and macro-F1 (the official scorer's, `medqa.evaluate`), each label's
recall and F1, and 95% bootstrap intervals (questions drawn with replacement, 10,000 times,
a fixed seed). For the pair: the difference TUNED minus BASE in accuracy and macro-F1 with a
paired bootstrap interval (both files scored on the same draws), and the majority baseline
(every question answered with the truth's most common label) beside them. Typically BASE is
the zero-shot model's `predictions.json` and TUNED the fine-tuned one's.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medqa.evaluate import EvaluationError, evaluate, read_answers
from medqa.results import write_json
from medqa.tasks import get_task, task_names

DRAWS = 10_000


def label_scores(truth: np.ndarray, pred: np.ndarray, n_labels: int) -> dict[str, np.ndarray]:
    """Accuracy, macro-F1 and per-label recall and F1 of label indices, over the last axis
    (one row per bootstrap draw). Macro-F1 averages over the labels present in the truth or
    the predictions of each row, as the official scorer does."""
    acc = (truth == pred).mean(-1)
    f1s, recalls, present = [], [], []
    for k in range(n_labels):
        tp = ((truth == k) & (pred == k)).sum(-1)
        fp = ((truth != k) & (pred == k)).sum(-1)
        fn = ((truth == k) & (pred != k)).sum(-1)
        denominator = 2 * tp + fp + fn
        f1s.append(np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0))
        recalls.append(np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0))
        present.append(denominator > 0)
    f1, present = np.stack(f1s), np.stack(present)
    macro = (f1 * present).sum(0) / np.maximum(present.sum(0), 1)
    return {"acc": acc, "macro_f1": macro, "f1": f1, "recall": np.stack(recalls)}


def _interval(values: np.ndarray) -> list[float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def compare(base: dict[str, str], tuned: dict[str, str], truth: dict[str, str], labels: Sequence[str],
            names: Sequence[str] = ("base", "tuned"), seed: int = 0, draws: int = DRAWS) -> dict:
    """The comparison as a dict: each file's scores with intervals, the paired differences,
    the majority baseline. Both files must answer exactly the truth's questions."""
    for name, answers in zip(names, (base, tuned)):
        evaluate(answers, truth, name, labels)  # refuses missing and extra questions, naming them
    ids = sorted(truth)
    index = {w: i for i, w in enumerate(labels)}
    y = np.array([index[truth[q]] for q in ids])
    preds = [np.array([index[answers[q]] for q in ids]) for answers in (base, tuned)]
    sample = np.random.default_rng(seed).integers(0, len(ids), size=(draws, len(ids)))
    majority = int(np.bincount(y, minlength=len(labels)).argmax())
    result: dict = {"questions": len(ids), "draws": draws, "labels": list(labels), "models": {}}
    boot = []
    for name, pred in zip(names, preds):
        point, drawn = label_scores(y, pred, len(labels)), label_scores(y[sample], pred[sample], len(labels))
        boot.append(drawn)
        result["models"][name] = {
            "acc": float(point["acc"]), "acc_95": _interval(drawn["acc"]),
            "macro_f1": float(point["macro_f1"]), "macro_f1_95": _interval(drawn["macro_f1"]),
            **{f"recall_{w}": float(point["recall"][k]) for k, w in enumerate(labels)},
            **{f"f1_{w}": float(point["f1"][k]) for k, w in enumerate(labels)},
            "predicted": {w: int((pred == k).sum()) for k, w in enumerate(labels)},
        }
    result["difference"] = {
        metric: {"value": result["models"][names[1]][metric] - result["models"][names[0]][metric],
                 "paired_95": _interval(boot[1][metric] - boot[0][metric])}
        for metric in ("acc", "macro_f1")
    }
    guess = label_scores(y, np.full_like(y, majority), len(labels))
    result["majority"] = {"label": labels[majority], "acc": float(guess["acc"]), "macro_f1": float(guess["macro_f1"])}
    return result


def table(result: dict) -> str:
    """The comparison as a Markdown table, then the paired differences."""
    labels = result["labels"]
    head = ("| | accuracy (95% CI) | macro-F1 (95% CI) | "
            + " | ".join(f"recall / F1 {w}" for w in labels) + " | predicted " + " / ".join(labels) + " |")
    rows = [head, "|" + "---|" * (4 + len(labels))]
    majority = result["majority"]
    rows.append(f"| majority (all {majority['label']}) | {majority['acc']:.3f} | {majority['macro_f1']:.3f} | "
                + " | ".join("-" for _ in labels) + " | - |")
    for name, m in result["models"].items():
        rows.append(
            f"| {name} | {m['acc']:.3f} ({m['acc_95'][0]:.3f}-{m['acc_95'][1]:.3f}) "
            f"| {m['macro_f1']:.3f} ({m['macro_f1_95'][0]:.3f}-{m['macro_f1_95'][1]:.3f}) | "
            + " | ".join(f"{m[f'recall_{w}']:.3f} / {m[f'f1_{w}']:.3f}" for w in labels)
            + " | " + " / ".join(str(m["predicted"][w]) for w in labels) + " |")
    first, second = list(result["models"])
    lines = [f"{second} minus {first}, paired bootstrap over {result['questions']} questions ({result['draws']:,} draws):"]
    for metric, label in (("acc", "accuracy"), ("macro_f1", "macro-F1")):
        d = result["difference"][metric]
        lines.append(f"  {label}: {d['value']:+.3f} (95% CI {d['paired_95'][0]:+.3f} to {d['paired_95'][1]:+.3f})")
    return "\n".join(rows) + "\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m medqa compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="predictions.json of the reference model (e.g. zero-shot)")
    parser.add_argument("tuned", type=Path, help="predictions.json of the model compared with it (e.g. fine-tuned)")
    parser.add_argument("--truth", type=Path, required=True, help="{question id: label}, e.g. test_ground_truth.json")
    parser.add_argument("--task", default="pubmedqa", choices=task_names())
    parser.add_argument("--names", nargs=2, default=["zero-shot", "fine-tuned"], help="the two rows' names")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws")
    parser.add_argument("--out", type=Path, help="also write the comparison to this JSON file (never over one)")
    args = parser.parse_args(argv)
    if args.names[0] == args.names[1]:
        raise EvaluationError(f"--names {args.names[0]} {args.names[1]}: the two rows need different names")
    labels = get_task(args.task).labels
    answers = [read_answers(path, what, labels) for path, what in
               ((args.base, "predictions"), (args.tuned, "predictions"), (args.truth, "truth"))]
    result = compare(*answers, labels, names=args.names, seed=args.seed)
    print(table(result))
    if args.out is not None:
        if args.out.exists():
            raise EvaluationError(f"{args.out} exists; remove it or choose another --out")
        write_json(args.out, result)
    return result
