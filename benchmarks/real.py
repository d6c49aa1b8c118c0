"""The real comparison in one command: a real instruct model, zero-shot and fine-tuned, on
the 500 official PQA-L test questions.

    make real                                  # SmolLM2-135M-Instruct, configs/smollm2.yaml, 2 CPU cores
    python benchmarks/real.py --data ../shared/data/pubmedqa --reasoning free

Needs `ori_pqal.json` and `test_ground_truth.json` (the PubMedQA repository's `data/`
folder; `--data` names the folder holding both). Runs the commands a user would, each
printed as it starts:
  1. `predict` with the untrained base (zero-shot), the official test split;
  2. `fit` with the config;
  3. `predict` with that fit's best checkpoint (by val/macro_f1);
  4. `evaluate` of both prediction files against the official truth;
  5. `compare` of the two: accuracy, macro-F1, per-class recall and F1, 95% bootstrap
     intervals, the paired interval of fine-tuned minus zero-shot, the majority baseline.
The table and each step's wall time go to `logs/NAME/comparison-fit-N.md` (and `.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's medqa, whatever is installed
from medqa.dtypes import describe_cpu

PEAKS: dict[str, int] = {}
"""Each command's peak resident memory in bytes (its process's, as `/usr/bin/time -v` reports it)."""


def run(command: list[str], env: dict[str, str], name: str | None = None) -> tuple[str, float]:
    """Run one medqa command, echoing its output; (its output, wall seconds). Its peak resident
    memory goes to PEAKS[name]."""
    print("\n$ " + " ".join(command), flush=True)
    began = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"real.py: `{' '.join(command[2:4])}` failed (exit {proc.returncode}); its output is above")
    PEAKS[name or command[3]] = usage.ru_maxrss * 1024  # KiB on Linux
    return "".join(lines), time.perf_counter() - began


def written(output: str, pattern: str, what: str) -> Path:
    found = re.findall(pattern, output)
    if not found:
        sys.exit(f"real.py: could not find {what} in the command's output")
    return Path(found[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pubmedqa",
                        help="folder with ori_pqal.json and test_ground_truth.json")
    parser.add_argument("--config", action="append",
                        help="the config, or several, each over the last (default: configs/smollm2.yaml)")
    parser.add_argument("--reasoning", default="required", choices=["required", "free"])
    parser.add_argument("--name", help="the experiment (logs/NAME); default: <last config's name>-reasoning-<setting>")
    args, extra = parser.parse_known_args()  # the rest goes to every command, e.g. --trainer.max_epochs=3
    configs = args.config or ["configs/smollm2.yaml"]
    pqal, truth = args.data / "ori_pqal.json", args.data / "test_ground_truth.json"
    for path in (pqal, truth):
        if not path.is_file():
            sys.exit(f"real.py: {path} not found; pass --data FOLDER holding ori_pqal.json and test_ground_truth.json "
                     "(the PubMedQA repository's data/ folder)")
    name = args.name or f"{Path(configs[-1]).stem}-reasoning-{args.reasoning}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    medqa = [sys.executable, "-m", "medqa"]
    common = [*(a for c in configs for a in ("--config", c)), "--data.source", str(pqal), "--data.reasoning", args.reasoning,
              "--trainer.logger.init_args.name", name, *extra]
    wrote = r"Wrote \d+ predictions to (\S+predictions\.json)"
    began, times = time.perf_counter(), {}

    cpu = describe_cpu()  # the load before the comparison starts
    out, times["zero-shot predict"] = run([*medqa, "predict", *common], env, "zero-shot predict")
    zero = written(out, wrote, "the zero-shot predictions file")
    out, times["fit"] = run([*medqa, "fit", *common], env, "fit")
    run_dir = written(out, r"Run directory: (\S+)", "the fit's run directory")
    best = sorted((run_dir / "checkpoints").glob("best-*.ckpt"))
    if not best:
        sys.exit(f"real.py: {run_dir}/checkpoints holds no best checkpoint")
    out, times["fine-tuned predict"] = run([*medqa, "predict", *common, "--ckpt_path", str(best[-1])], env,
                                           "fine-tuned predict")
    tuned = written(out, wrote, "the fine-tuned predictions file")
    for path in (zero, tuned):
        run([*medqa, "evaluate", str(path), "--truth", str(truth)], env)
    report = run_dir.parent / f"comparison-{run_dir.name}"
    out, _ = run([*medqa, "compare", str(zero), str(tuned), "--truth", str(truth), "--out", f"{report}.json"], env)
    total = time.perf_counter() - began

    machine = f"{cpu} at the start, {os.getloadavg()[0]:.1f} at the end"
    header = (f"{name}: {' + '.join(configs)}, reasoning {args.reasoning}, best checkpoint {best[-1].name}; "
              f"{datetime.now():%Y-%m-%d}, {machine}")
    timing = (", ".join(f"{k} {v / 60:.1f} min (peak {PEAKS[k] / 2**30:.2f} GiB)" for k, v in times.items())
              + f"; whole comparison {total / 60:.1f} min; largest process {max(PEAKS.values()) / 2**30:.2f} GiB")
    table = out.strip().split("\n\n", 1)
    text = f"{header}\n\n{table[0]}\n\n{table[1] if len(table) > 1 else ''}\n\nTime: {timing}\n"
    Path(f"{report}.md").write_text(text)
    result = json.loads(Path(f"{report}.json").read_text())
    result.update(header=header, seconds=times, total_seconds=total, peak_bytes=PEAKS, zero_shot=str(zero),
                  fine_tuned=str(tuned), checkpoint=str(best[-1]))
    Path(f"{report}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{text}\nWrote {report}.md and {report}.json")


if __name__ == "__main__":
    main()
