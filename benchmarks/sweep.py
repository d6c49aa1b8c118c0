"""Many `medqa fit` runs of one config side by side (on a GPU: a small model leaves most of
the card free), each scored on the test split with its best checkpoint (`--test_after_fit
best`), in one table: the dev fold's best macro-F1 beside the test scores.

    python benchmarks/sweep.py --base SmolLM2-135M-Instruct.Q4_1.gguf --data ori_pqal.json --out $OUT \\
        --folds 0 1 2 --run "all=" --run "top4=--model.lora_layers 4" --jobs 12

Each `--run LABEL=ARGS` is one setting (ARGS go to `fit` after the config); each setting
runs once per `--folds` entry (the fold is the dev set and changes the training set, so the
folds also stand for seeds). Choose settings on the dev column; the test columns are for
reporting the chosen ones. Rows go to OUT/sweep.jsonl as runs finish, so a run cut short
keeps what finished, and the table to OUT/sweep.md at the end.
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


def fit(label: str, args: list[str], fold: int, common: list[str], out: Path) -> dict:
    name = f"sweep-{label}-fold{fold}"
    command = [sys.executable, "-m", "medqa", "fit", *common, "--data.fold", str(fold),
               "--trainer.logger.init_args.name", name, "--test_after_fit", "best", *args]
    began = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    row = {"label": label, "args": " ".join(args), "fold": fold, "seconds": round(time.perf_counter() - began, 1)}
    text = proc.stdout + proc.stderr
    if proc.returncode:
        (out / f"{name}.log").write_text(text[-20000:])
        return {**row, "error": f"exit {proc.returncode}; see {name}.log"}
    best = re.findall(r"Best checkpoint: \S+ \(val/macro_f1 ([\d.]+)\)", text)
    run_dir = re.findall(r"Run directory: (\S+)", text)
    metrics = json.loads((ROOT / run_dir[-1] / "metrics.json").read_text()) if run_dir else {}
    best_name = Path(metrics.get("checkpoint", "")).name
    epoch = re.search(r"epoch(\d+)", best_name)
    return {**row, "dev_macro_f1": float(best[-1]) if best else None, "best_epoch": int(epoch[1]) if epoch else None,
            **{k.removeprefix("test/"): v for k, v in metrics.items() if k.startswith("test/")}}


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
        for done in as_completed([pool.submit(fit, *r, common, args.out) for r in runs]):
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
