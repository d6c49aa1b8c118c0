"""What a setting's fold models give beyond their single scores, from `sweep.py --predict_all`
files (OUT/preds/LABEL-foldK.jsonl: every PQA-L question answered by fold K's best checkpoint):

    python benchmarks/folds.py --preds OUT/preds --data ori_pqal.json [--labels all free] [--against ref]

For each setting, on the 500 official test questions (never used to choose anything here):
- each fold model alone (mean and spread over the folds, which also stand for seeds);
- with the class-prior correction (`medqa.priors`) fitted on its own dev fold (50 questions,
  what one `fit` has) and on every fold's dev questions out of fold (what `cv` writes);
- the folds' ensemble (their probabilities averaged), alone and with the out-of-fold correction;
and, for fold 0 (the `make real` model), the paired bootstrap of each against the model alone.
With `--against REF`, each other setting's fold models against REF's of the same folds: the
difference of the folds' mean accuracy and macro-F1, with a 95% interval from resampling the
test questions (one draw resamples every fold's answers alike).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path
from statistics import fmean, pstdev

import numpy as np
import torch

from medqa.compare import compare, label_scores
from medqa.priors import fit_label_bias
from medqa.tasks import get_task

LABELS = ("yes", "no", "maybe")


def read(path: Path) -> dict[str, tuple[list[float], str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["id"]: ([r[f"p_{w}"] for w in LABELS], r["truth"]) for r in rows}


def log_probs(rows: dict, ids: list[str]) -> torch.Tensor:
    p = torch.tensor([rows[i][0] for i in ids], dtype=torch.float64).clamp(min=1e-12)
    return (p / p.sum(-1, keepdim=True)).log()


def answers(lp: torch.Tensor, ids: list[str], bias: list[float] | None = None) -> dict[str, str]:
    shifted = lp + torch.tensor(bias or [0.0] * len(LABELS), dtype=lp.dtype)
    return {i: LABELS[k] for i, k in zip(ids, shifted.argmax(-1).tolist())}


def scores(pred: dict[str, str], truth: dict[str, str]) -> dict[str, float]:
    m = compare(pred, pred, truth, LABELS, draws=10)["models"]["base"]
    return {"acc": m["acc"], "macro_f1": m["macro_f1"], "f1_maybe": m["f1_maybe"],
            "maybe_answered": m["predicted"]["maybe"]}


def against(ref: dict[int, dict[str, str]], other: dict[int, dict[str, str]], truth: dict[str, str],
            draws: int = 10000, seed: int = 0) -> tuple[int, dict[str, tuple[float, float, float]]]:
    """The folds both settings have, and for accuracy and macro-F1: the difference of their
    means over those folds, and its paired 95% interval over resampled test questions."""
    folds = sorted(set(ref) & set(other))
    ids = sorted(truth)
    y = np.array([LABELS.index(truth[i]) for i in ids])
    sample = np.random.default_rng(seed).integers(0, len(ids), size=(draws, len(ids)))
    point = {m: 0.0 for m in ("acc", "macro_f1")}
    drawn = {m: np.zeros(draws) for m in point}
    for k in folds:
        a, b = (np.array([LABELS.index(answers[k][i]) for i in ids]) for answers in (ref, other))
        whole = (label_scores(y, a, len(LABELS)), label_scores(y, b, len(LABELS)))
        boot = (label_scores(y[sample], a[sample], len(LABELS)), label_scores(y[sample], b[sample], len(LABELS)))
        for m in point:
            point[m] += float(whole[1][m] - whole[0][m]) / len(folds)
            drawn[m] += (boot[1][m] - boot[0][m]) / len(folds)
    return len(folds), {m: (point[m], *np.percentile(drawn[m], [2.5, 97.5]).tolist()) for m in point}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preds", type=Path, required=True)
    parser.add_argument("--data", required=True, help="ori_pqal.json")
    parser.add_argument("--labels", nargs="*", help="settings to report (default: every one found)")
    parser.add_argument("--against", help="a setting every other is compared with, fold by fold")
    args = parser.parse_args()
    task = get_task("pubmedqa")
    records = task.read(args.data, None)
    found: dict[str, dict[int, Path]] = defaultdict(dict)
    for path in sorted(args.preds.glob("*-fold*.jsonl")):
        label, fold = re.fullmatch(r"(.+)-fold(\d+)\.jsonl", path.name).groups()
        found[label][int(fold)] = path
    lines = ["| setting | folds | what | test accuracy | test macro-F1 | F1 maybe | maybe answered | fold 0 vs alone: acc, macro-F1 (paired 95%) |",
             "|---|---|---|---|---|---|---|---|"]
    alone: dict[str, dict[int, dict[str, str]]] = {}
    for label in args.labels or list(found):
        folds = found[label]
        split = {k: task.split(records, k) for k in folds}
        test_ids = sorted(r.id for r in split[next(iter(folds))]["test"])
        rows = {k: read(p) for k, p in folds.items()}
        truth = {i: rows[next(iter(folds))][i][1] for i in test_ids}
        dev_ids = {k: [r.id for r in split[k]["dev"]] for k in folds}
        oof_lp = torch.cat([log_probs(rows[k], dev_ids[k]) for k in folds])
        oof_truth = torch.tensor([LABELS.index(rows[k][i][1]) for k in folds for i in dev_ids[k]])
        oof_bias = fit_label_bias(oof_lp, oof_truth)
        variants: dict[str, dict[int, dict[str, str]]] = defaultdict(dict)
        for k in folds:
            lp = log_probs(rows[k], test_ids)
            own = fit_label_bias(log_probs(rows[k], dev_ids[k]),
                                 torch.tensor([LABELS.index(rows[k][i][1]) for i in dev_ids[k]]))
            variants["alone"][k] = answers(lp, test_ids)
            variants["+ bias fitted on its dev fold"][k] = answers(lp, test_ids, own)
            variants[f"+ bias fitted out of fold {oof_bias}"][k] = answers(lp, test_ids, oof_bias)
        alone[label] = variants["alone"]
        mean_p = torch.stack([log_probs(rows[k], test_ids).exp() for k in folds]).mean(0).log()
        ensemble = {"ensemble": answers(mean_p, test_ids), "ensemble + out-of-fold bias": answers(mean_p, test_ids, oof_bias)}
        for what, per_fold in variants.items():
            s = [scores(p, truth) for p in per_fold.values()]
            paired = ""
            if 0 in per_fold and what != "alone":
                d = compare(variants["alone"][0], per_fold[0], truth, LABELS)["difference"]
                paired = ", ".join(f"{d[m]['value']:+.3f} [{d[m]['paired_95'][0]:+.3f}, {d[m]['paired_95'][1]:+.3f}]"
                                   for m in ("acc", "macro_f1"))
            lines.append(f"| {label} | {len(per_fold)} | {what} | {fmean(x['acc'] for x in s):.3f} ± {pstdev(x['acc'] for x in s):.3f} | "
                         f"{fmean(x['macro_f1'] for x in s):.3f} ± {pstdev(x['macro_f1'] for x in s):.3f} | "
                         f"{fmean(x['f1_maybe'] for x in s):.3f} | {fmean(x['maybe_answered'] for x in s):.0f} | {paired} |")
        for what, pred in ensemble.items():
            s = scores(pred, truth)
            d = compare(variants["alone"][0], pred, truth, LABELS)["difference"] if 0 in folds else None
            paired = ", ".join(f"{d[m]['value']:+.3f} [{d[m]['paired_95'][0]:+.3f}, {d[m]['paired_95'][1]:+.3f}]"
                               for m in ("acc", "macro_f1")) if d else ""
            lines.append(f"| {label} | {len(folds)} | {what} | {s['acc']:.3f} | {s['macro_f1']:.3f} | {s['f1_maybe']:.3f} | "
                         f"{s['maybe_answered']} | {paired} |")
    if args.against:
        if args.against not in alone:
            raise SystemExit(f"--against {args.against}: no such setting in {args.preds} ({', '.join(alone)})")
        lines += ["", f"| setting | folds | vs {args.against}: accuracy (paired 95%) | macro-F1 (paired 95%) |", "|---|---|---|---|"]
        for label, per_fold in alone.items():
            if label != args.against:
                n, d = against(alone[args.against], per_fold, truth)
                lines.append(f"| {label} | {n} | " + " | ".join(f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}]" for v, lo, hi in d.values()) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
