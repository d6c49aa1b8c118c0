"""`python -m medqa priors PREDICTIONS.jsonl`: a class-prior correction fitted on held-out
predictions. One number a label, added to the label words' log-probabilities before the
decision (`--model.label_bias`), chosen to maximize macro-F1 on predictions the model did not
train on: `cv`'s out-of-fold file (`CV_DIR/oof.jsonl`, 500 questions on PQA-L), or a
`predict --data.predict_split dev` file.

A model fine-tuned on PQA-L rarely answers "maybe" (the rarest answer, 11% of the test
questions), and macro-F1 weighs the three answers alike: where the model's probabilities still
rank the questions of a class, moving the decision thresholds gains more macro-F1 than it
costs accuracy. Whether it does is for held-out data to say (for SmolLM2 with LoRA on its top 2
layers it did not carry to the test split: benchmarks/README.md). The fitted file is a config
(`label_bias.yaml`) that `test`, `predict` and `ask` take with `--config`, and `export` with
`--label_bias`. Scores measured on the predictions the bias was fitted on are optimistic; the
test split is the honest check.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from medqa.compare import label_scores
from medqa.records import DataError, json_lines, read_text
from medqa.results import write_result
from medqa.tasks import get_task, task_names

SPAN, STEP = 4.0, 0.05
"""The grid each label's bias is searched on (nats, relative to the first label's): wide
enough for a class a model never answers, fine enough that a step moves a few decisions."""


def macro_f1(predicted: Tensor, truth: Tensor, n: int) -> Tensor:
    """Macro-F1 of each row of `predicted` (grid, questions) against `truth` (questions), the
    official scorer's (`medqa.compare.label_scores`)."""
    return torch.from_numpy(label_scores(truth.numpy(), predicted.numpy(), n)["macro_f1"])


def fit_label_bias(log_probs: Tensor, truth: Tensor) -> list[float]:
    """The bias (first label's 0) that maximizes macro-F1 of `log_probs` (questions, labels)
    against `truth`; among equals, the one whose probabilities give the truth the highest
    likelihood. Two or three labels: every grid point; more: one label at a time, repeated
    until nothing changes."""
    n = log_probs.size(-1)
    grid = torch.arange(-SPAN, SPAN + STEP / 2, STEP)
    log_probs, truth = log_probs.double(), truth.long()

    def best_of(candidates: Tensor) -> Tensor:  # candidates: (grid, labels)
        scores, likelihood = [], []
        for chunk in candidates.split(2048):
            shifted = log_probs.unsqueeze(0) + chunk.unsqueeze(1)
            scores.append(macro_f1(shifted.argmax(-1), truth, n))
            likelihood.append(shifted.log_softmax(-1).gather(-1, truth.expand(chunk.size(0), -1).unsqueeze(-1))
                              .squeeze(-1).mean(-1))
        score, like = torch.cat(scores), torch.cat(likelihood)
        top = score >= score.max() - 1e-12
        return candidates[torch.where(top, like, torch.full_like(like, -math.inf)).argmax()]

    if n <= 3:
        mesh = torch.cartesian_prod(*[grid] * (n - 1)).reshape(-1, n - 1).double()
        bias = best_of(torch.cat([torch.zeros(mesh.size(0), 1, dtype=mesh.dtype), mesh], -1))
    else:
        bias = torch.zeros(n, dtype=torch.float64)
        for _ in range(10):
            before = bias.clone()
            for k in range(1, n):
                candidates = bias.repeat(grid.numel(), 1)
                candidates[:, k] = grid
                bias = best_of(candidates)
            if torch.equal(bias, before):
                break
    return [round(float(b), 4) for b in bias]


def read_predictions(path: Path, labels: Sequence[str]) -> tuple[list[str], Tensor, Tensor]:
    """(ids, log-probabilities (questions, labels), truth indices) of a `predictions.jsonl`
    that holds each question's `p_<label>` and its `truth`, every row checked."""
    ids, rows, truth = [], [], []
    seen: set[str] = set()
    for _, row, where in json_lines(read_text(path), path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with id, p_<label> and truth")
        probs = [row.get(f"p_{w}") for w in labels]
        if not all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1 for p in probs):
            raise DataError(f"{where}: expected {', '.join(f'p_{w}' for w in labels)} as numbers in [0, 1], "
                            f"got {[row.get(f'p_{w}') for w in labels]}")
        if row.get("truth") not in labels:
            raise DataError(f"{where}: field 'truth' is {row.get('truth')!r}, expected one of {', '.join(labels)} "
                            "(predict writes it where the data has answers)")
        if not isinstance(row.get("id"), str) or row["id"] in seen:
            raise DataError(f"{where}: field 'id' is {row.get('id')!r}: expected a question id not seen before")
        ids.append(row["id"])
        seen.add(row["id"])
        rows.append(probs)
        truth.append(labels.index(row["truth"]))
    if not ids:
        raise DataError(f"{path}: holds no predictions")
    probs = torch.tensor(rows, dtype=torch.float64).clamp(min=1e-12)
    return ids, (probs / probs.sum(-1, keepdim=True)).log(), torch.tensor(truth)


def bias_config(bias: Sequence[float], source: str, before: float, after: float, n: int) -> str:
    """The YAML config that applies `bias` (`--config label_bias.yaml`)."""
    return (f"# Class-prior correction fitted by `python -m medqa priors` on {n} held-out predictions\n"
            f"# ({json.dumps(source)}): macro-F1 there {before:.4f} -> {after:.4f}, measured on the same\n"
            "# predictions, so optimistic: score the test split to know. Add it to test, predict and ask with\n"
            "#   --config label_bias.yaml      (export: --label_bias label_bias.yaml)\n"
            f"model:\n  label_bias: [{', '.join(repr(float(b)) for b in bias)}]\n")


def read_label_bias(path: Path) -> list[float]:
    """The bias of a config that `priors` wrote (`model: {label_bias: [...]}`), checked."""
    import yaml

    try:
        config = yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not YAML ({str(e).splitlines()[0]})") from None
    bias = config.get("model", {}).get("label_bias") if isinstance(config, dict) and isinstance(config.get("model"), dict) else None
    if not (isinstance(bias, list) and bias and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                                    and math.isfinite(b) for b in bias)):
        raise DataError(f"{path}: expected model: {{label_bias: [one finite number a label]}} as `priors` writes it, "
                        f"got {bias!r}")
    return [float(b) for b in bias]


def fit_file(paths: Sequence[Path], labels: Sequence[str], out: Path | None) -> dict[str, object]:
    """Fit the bias on the predictions of `paths` together; print it with macro-F1 before and
    after; write its config to `out` (refusing to replace a file)."""
    if out is not None and out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another --out")
    parts = [read_predictions(p, labels) for p in paths]
    ids = [i for part in parts for i in part[0]]
    if len(set(ids)) != len(ids):
        raise DataError(f"{', '.join(map(str, paths))}: a question appears more than once; give each question's "
                        "held-out prediction once")
    log_probs, truth = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
    bias = fit_label_bias(log_probs, truth)
    n = len(labels)
    before = float(macro_f1(log_probs.argmax(-1).unsqueeze(0), truth, n))
    shifted = log_probs + torch.tensor(bias, dtype=log_probs.dtype)
    after = float(macro_f1(shifted.argmax(-1).unsqueeze(0), truth, n))
    accuracy = [float((x.argmax(-1) == truth).double().mean()) for x in (log_probs, shifted)]
    print(f"Label bias for {', '.join(labels)}: {bias}\nOn these {len(ids)} predictions (in sample): macro-F1 "
          f"{before:.4f} -> {after:.4f}, accuracy {accuracy[0]:.4f} -> {accuracy[1]:.4f}")
    if out is not None:
        write_result(out, bias_config(bias, ", ".join(map(str, paths)), before, after, len(ids)))
        print(f"Wrote {out}: add --config {out} to test, predict or ask (export: --label_bias {out}).")
    return {"label_bias": bias, "questions": len(ids), "macro_f1_before": before, "macro_f1_after": after,
            "accuracy_before": accuracy[0], "accuracy_after": accuracy[1]}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="python -m medqa priors", description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", type=Path, nargs="+",
                        help="predictions.jsonl files with each question's label probabilities and truth, "
                             "none trained on (cv's oof.jsonl, or predict's on the dev split)")
    parser.add_argument("--task", default="pubmedqa", choices=task_names(), help="the task the predictions answer")
    parser.add_argument("--out", type=Path, help="write the bias as a config file (e.g. label_bias.yaml)")
    args = parser.parse_args(argv)
    return fit_file(args.predictions, get_task(args.task).labels, args.out)
