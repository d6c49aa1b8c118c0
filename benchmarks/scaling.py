"""Training speed on 1 and N GPUs, timed the same way: `python -m medqa fit` itself, once per
configuration and GPU count, each in its own processes, read back from the `speed.json`
that medqa's SpeedMonitor writes at the end of every fit.

    source .gpukit/activate.sh   # on the lent GPU machine
    python benchmarks/make_random_llama.py --shape 8b --out /tmp/llama-8b-random --corpus .gpudata/ori_pqal.json
    python benchmarks/scaling.py --model /tmp/llama-8b-random --data .gpudata/ori_pqal.json --devices 1 2

Each run is `configs/lora.yaml` with the given model and data, batch 8 per GPU, no gradient
accumulation (every step all-reduces), no validation, `--steps` optimizer steps, last.ckpt
at every epoch end as the config does. Figures, all from the same run:
  step tok/s   non-padding tokens of every GPU over the slowest process's time inside steps,
               after the warm-up batches (Unsloth compiles its kernels in the first steps);
               the GPU is synchronised at the end of every step
  wall tok/s   the same tokens over the wall time from the first timed step to the last
  fit tok/s    medqa's own end-of-fit figure: all tokens over the whole fit
  median step  the slowest process's median step time; the slowest steps beside it (a step
               that compiles again, e.g. for a batch of a new size, shows there)
  between      seconds the GPUs waited between steps after warm-up (checkpoints, epoch ends, data)
With `--profile_steps N`, N batches after the warm-up are recorded by torch's profiler in every
process (`profile-rank<R>.txt`: kernel time a step against wall time, NCCL apart).
Scaling is each figure over the same configuration's 1-GPU figure. A table too long for one
call of the lent machine is built over several with `--merge --budget S` (runs of another
machine are never merged: the GPUs' ids are kept with every run). Lightning's
SimpleProfiler report of each process is kept beside the run (`--logs`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "default": [],  # gradient_checkpointing auto
    "checkpointing": ["--model.gradient_checkpointing", "true"],
    "no-checkpointing": ["--model.gradient_checkpointing", "false"],
    "plain-batches": ["--data.bucket_batches", "0"],  # the default without length bucketing
    "foreground-writes": ["--trainer.plugins", "medqa.checkpoints.AtomicCheckpointIO"],  # checkpoints written in the step loop
    "24gb": ["--model.memory_limit_gib", "24"],  # the default as a 24 GB card would run it
}


def fit(args, name: str, extra: list[str], devices: int) -> dict:
    """One `medqa fit` on `devices` GPUs; its speed summary, wall time and log file."""
    run = f"{name}-{devices}gpu"
    cmd = [
        sys.executable, "-m", "medqa", "fit", "--config", str(ROOT / "configs" / "lora.yaml"),
        "--model.pretrained", args.model, "--data.source", args.data,
        "--data.batch_size", str(args.batch_size), "--trainer.accumulate_grad_batches", "1",
        "--trainer.max_steps", str(args.steps), "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "0",
        "--trainer.devices", str(devices), "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(args.logs), "--trainer.logger.init_args.name", run,
        "--trainer.profiler", "lightning.pytorch.profilers.SimpleProfiler",
        "--trainer.profiler.dirpath", str(Path(args.logs) / run), "--trainer.profiler.filename", "profile",
        "--speed.warmup_steps", str(args.warmup), "--speed.profile_steps", str(args.profile_steps), *extra,
    ]
    if devices > 1:
        cmd += ["--trainer.strategy", "ddp"]
    log = Path(args.logs) / f"{run}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - start
    speed = sorted((Path(args.logs) / run).glob("fit-*/speed.json"), key=lambda f: f.stat().st_mtime)  # the run dirs
    if done.returncode != 0 or not speed:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        print(f"{run}: failed (exit {done.returncode}); the end of {log}:\n{tail}", flush=True)
        return {"failed": True, "command_seconds": wall}
    summary = json.loads(speed[-1].read_text())
    summary["command_seconds"] = wall
    print(f"{run}: {json.dumps({k: summary[k] for k in ('step_tokens_per_s', 'fit_tokens_per_s', 'seconds_between_steps')})}",
          flush=True)
    return summary


def table(results: dict[str, dict[int, dict]], gpu: str, args) -> str:
    lines = [
        f"{gpu}, {date.today()}, model {Path(args.model).name}, data {Path(args.data).name}, batch {args.batch_size} per GPU, "
        f"{args.steps} steps, {args.warmup} warm-up batches left out of the step figures"
        + (f", then {args.profile_steps} profiled ones." if args.profile_steps else "."),
        "",
        "| config | GPUs | step tok/s | scaling | wall tok/s | scaling | fit tok/s (CLI) | scaling | "
        "median step s | slowest steps s | warm-up s | between steps s (longest) | peak GiB | command s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, by_devices in results.items():
        base = by_devices.get(1, {})
        for devices, s in by_devices.items():
            if s.get("failed"):
                lines.append(f"| {name} | {devices} | failed | | | | | | | | | | | {s['command_seconds']:.0f} |")
                continue

            def ratio(key: str) -> str:
                return f"{s[key] / base[key]:.2f}x" if base.get(key) and s.get(key) else "-"

            longest = ", ".join(f"{g['seconds']:.1f}" for g in s["longest_gaps"])
            slowest = ", ".join(f"{g['seconds']:.2f}" for g in s["slowest_steps"])
            lines.append(
                f"| {name} | {devices} | {s['step_tokens_per_s']:,.0f} | {ratio('step_tokens_per_s')} | "
                f"{s['wall_tokens_per_s']:,.0f} | {ratio('wall_tokens_per_s')} | {s['fit_tokens_per_s']:,.0f} | "
                f"{ratio('fit_tokens_per_s')} | {s['median_step_seconds']:.3f} | {slowest} | {s['warmup_seconds']:.1f} | {s['seconds_between_steps']:.1f} ({longest}) | "
                f"{s['peak_gpu_gib']:.2f} | {s['command_seconds']:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local model directory (benchmarks/make_random_llama.py)")
    p.add_argument("--data", required=True, help="ori_pqal.json")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--extra", default="", help="more medqa arguments for every run, space-separated")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--profile_steps", type=int, default=0,
                   help="record this many batches after the warm-up with torch's profiler (each process's report and "
                   "trace beside its speed.json; left out of the step figures)")
    p.add_argument("--logs", default="logs/scaling")
    p.add_argument("--out", help="also write the table and the summaries here (.md and .json)")
    p.add_argument("--merge", action="store_true",
                   help="keep the runs already in --out's .json (from an earlier call on the same machine) and run only the rest")
    p.add_argument("--budget", type=float, help="seconds this call may take: a run that would not finish in time "
                   "(judged by the longest run so far, 240 s before the first) is left for the next call (see --merge)")
    args = p.parse_args()
    start = time.perf_counter()

    import torch

    gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    machine = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True, text=True).stdout.split()
    results: dict[str, dict[int, dict]] = {}
    saved = Path(args.out).with_suffix(".json") if args.out else None
    if args.merge and saved and saved.exists():
        for name, runs in json.loads(saved.read_text()).items():
            for n, s in runs.items():
                if not s.get("failed") and s.get("machine") == machine:  # figures of another machine do not compare
                    results.setdefault(name, {})[int(n)] = s
    text = table(results, gpu, args)
    results_run: list[dict] = []  # the runs of this call
    for name in args.configs:
        for n in args.devices:
            if n in results.get(name, {}):
                print(f"{name}-{n}gpu: kept from {saved}", flush=True)
                continue
            longest = max((r["command_seconds"] for r in results_run), default=240.0)
            if args.budget and time.perf_counter() - start + longest > args.budget:
                print(f"{name}-{n}gpu: not started, {args.budget - (time.perf_counter() - start):.0f} s left of --budget", flush=True)
                continue
            results.setdefault(name, {})[n] = {**fit(args, name, CONFIGS[name] + args.extra.split(), n), "machine": machine}
            results_run.append(results[name][n])
            results[name] = dict(sorted(results[name].items()))
            text = table(results, gpu, args)
            if args.out:  # after every run: a run cut short by a time limit keeps the rest
                Path(args.out).write_text(text + "\n")
                Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
