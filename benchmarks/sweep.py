"""Many `medqa fit` runs of one config side by side (on a GPU: a small model leaves most of
the card free), each scored on the test split with its best checkpoint (`--test_after_fit
best`), in one table: the dev fold's best macro-F1 beside the test scores.

    python benchmarks/sweep.py --base SmolLM2-135M-Instruct.Q4_1.gguf --data ori_pqal.json --out $OUT \\
        --folds 0 1 2 --run "all=" --run "top4=--model.lora_layers 4" --jobs 12

Each `--run LABEL=ARGS` is one setting (ARGS go to `fit` after the config); each setting
runs once per `--folds` entry (the fold is the dev set and changes the training set, so the
folds also stand for seeds). A setting of phases, `LABEL=ARGS1 ;; ARGS2`, fits ARGS1, then
ARGS2 starting from the first phase's best adapter (`--model.init_adapter`). Choose settings on
the dev column; the test columns are for reporting the chosen ones. Rows go to
OUT/sweep.jsonl as runs finish, so a run cut short keeps what finished, and the table to
OUT/sweep.md at the end.

With `--predict_all`, each run's best checkpoint then answers every question of the data file
(`predict --data.predict_split all`): OUT/preds/LABEL-foldK.jsonl holds the label
probabilities of the fold's dev questions (out of fold, for `benchmarks/priors.py`) and of the
test questions. Ten folds of one setting are `cv`'s protocol with the test split answered too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)


def fit(label: str, args: list[str], fold: int, common: list[str], out: Path, predict_all: bool) -> dict:
    name = f"sweep-{label}-fold{fold}"
    phases = [list(group) for group in split_phases(args)]
    row = {"label": label, "args": " ".join(args), "fold": fold}
    began = time.perf_counter()
    start: list[str] = []
    for n, phase in enumerate(phases):
        last = n == len(phases) - 1
        phase_name = name if last else f"{name}-phase{n}"
        proc = run([sys.executable, "-m", "medqa", "fit", *common, "--data.fold", str(fold),
                    "--trainer.logger.init_args.name", phase_name, *(["--test_after_fit", "best"] if last else []),
                    *start, *phase])
        text = proc.stdout + proc.stderr
        if proc.returncode:
            (out / f"{phase_name}.log").write_text(text[-20000:])
            return {**row, "seconds": round(time.perf_counter() - began, 1),
                    "error": f"exit {proc.returncode}; see {phase_name}.log"}
        run_dir = re.findall(r"Run directory: (\S+)", text)
        metrics = json.loads((ROOT / run_dir[-1] / "metrics.json").read_text()) if run_dir and last else {}
        best = re.findall(r"Best checkpoint: (\S+) \(val/macro_f1 ([\d.]+)\)", text)
        start = ["--model.init_adapter", str(ROOT / best[-1][0])] if best else []
    best_name = Path(metrics.get("checkpoint", "")).name
    epoch = re.search(r"epoch(\d+)", best_name)
    row.update({"dev_macro_f1": float(best[-1][1]) if best else None, "best_epoch": int(epoch[1]) if epoch else None,
                **{k.removeprefix("test/"): v for k, v in metrics.items() if k.startswith("test/")}})
    if predict_all and metrics.get("checkpoint"):
        where = out / "preds" / f"{label}-fold{fold}"
        proc = run([sys.executable, "-m", "medqa", "predict", *common, "--data.fold", str(fold),
                    "--trainer.logger.init_args.name", f"{name}-predict", *predict_args(phases[-1]),
                    "--ckpt_path", str(ROOT / metrics["checkpoint"]), "--data.predict_split", "all",
                    "--predictions.output_dir", str(where)])
        if proc.returncode:
            (out / f"{name}-predict.log").write_text((proc.stdout + proc.stderr)[-20000:])
            row["predict_error"] = f"exit {proc.returncode}; see {name}-predict.log"
        else:
            (out / "preds" / f"{label}-fold{fold}.jsonl").write_text((where / "predictions.jsonl").read_text())
    return {**row, "seconds": round(time.perf_counter() - began, 1)}


def split_phases(args: list[str]) -> list[list[str]]:
    phases: list[list[str]] = [[]]
    for word in args:
        if word == ";;":
            phases.append([])
        else:
            phases[-1].append(word)
    return phases


def predict_args(args: list[str]) -> list[str]:
    """The options of a fit's arguments that shape what `predict` scores (the model and the
    data); trainer options (epochs, schedules) are the fit's alone."""
    kept, i = [], 0
    while i < len(args):
        takes_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        if args[i].startswith(("--model.", "--data.")) and not args[i].startswith(("--model.optimizer",
                                                                                     "--model.scheduler")):
            kept += args[i : i + 1 + takes_value]
        i += 1 + takes_value
    return kept


def table(rows: list[dict]) -> str:
    lines = ["| setting | fold | best epoch | dev macro-F1 | test acc | test macro-F1 | F1 yes / no / maybe | minutes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['fold']} | {r['error']} | | | | | |")
            continue
        f1 = " / ".join(f"{r.get(f'f1_{w}', float('nan')):.3f}" for w in ("yes", "no", "maybe"))
        lines.append(f"| {r['label']} | {r['fold']} | {r['best_epoch']} | {r['dev_macro_f1']:.3f} | {r['acc']:.3f} | "
                     f"{r['macro_f1']:.3f} | {f1} | {r['seconds'] / 60:.1f} |")
    lines += ["", "| setting | runs | mean dev macro-F1 | mean test acc | mean test macro-F1 | mean F1 maybe |",
              "|---|---|---|---|---|---|"]
    for label in dict.fromkeys(r["label"] for r in rows):
        done = [r for r in rows if r["label"] == label and "error" not in r]
        if done:
            lines.append(f"| {label} | {len(done)} | {mean(r['dev_macro_f1'] for r in done):.3f} | "
                         f"{mean(r['acc'] for r in done):.3f} | {mean(r['macro_f1'] for r in done):.3f} | "
                         f"{mean(r['f1_maybe'] for r in done):.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="--model.pretrained of every run")
    parser.add_argument("--data", required=True, help="ori_pqal.json")
    parser.add_argument("--config", default="configs/smollm2.yaml")
    parser.add_argument("--run", action="append", required=True, help="LABEL=ARGS, once per setting")
    parser.add_argument("--folds", type=int, nargs="+", default=[0])
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--predict_all", action="store_true",
                        help="each best checkpoint answers every question of --data (OUT/preds/)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["--config", args.config, "--model.pretrained", args.base, "--data.source", args.data,
              "--trainer.accelerator", args.accelerator, "--threads", "1"]
    runs = [(label, shlex.split(rest), fold) for label, _, rest in (r.partition("=") for r in args.run)
            for fold in args.folds]
    from medqa.bases import resolve

    resolve(args.base)  # a GGUF file is converted once, before the runs read the converted folder
    rows = []
    with ThreadPoolExecutor(args.jobs) as pool, (args.out / "sweep.jsonl").open("a") as log:
        for done in as_completed([pool.submit(fit, *r, common, args.out, args.predict_all) for r in runs]):
            row = done.result()
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(json.dumps(row), flush=True)
    rows.sort(key=lambda r: ([label for label, _, _ in runs].index(r["label"]), r["fold"]))
    (args.out / "sweep.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
