"""Where a CPU run's memory and time go, phase by phase: the data (read and tokenize, or the
cache), the model load, scoring (a forward pass without gradients over the longest
evaluation batch) and a training step (forward, then backward, over the longest training
batch the data can produce), each with its peak resident memory and its time.

    python benchmarks/memory_cpu.py --data ../shared/data/pubmedqa/ori_pqal.json
    python benchmarks/memory_cpu.py --data ori_pqal.json -- --model.dtype float32 --model.lora_layers 4
    python benchmarks/memory_cpu.py --data ori_pqal.json -- --model.gradient_checkpointing false  # no plan

With `--model.gradient_checkpointing auto` (configs/smollm2.yaml) the training step is the one
the CPU memory plan makes of the longest questions (its micro-batch, accumulated, and the
layers it keeps, within `--model.memory_limit_gib`); otherwise the whole batch at once.

Arguments after `--` go to medqa as they would to `fit` (after `--config`). The peak of each
phase is the process's high-water mark (VmHWM), reset before the phase by writing 5 to
/proc/self/clear_refs (Linux), so the rows are the phases' own peaks, not the run's so far.
Prints a table with the CPU's name and vector units.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GiB = 2**30


def rss() -> tuple[int, int]:
    """(resident now, peak since the last reset), in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class Phases:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, int, int, str]] = []

    def run(self, name: str, fn, note=lambda result, seconds: ""):
        reset_peak()
        began = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - began
        now, peak = rss()
        self.rows.append((name, seconds, peak, now, note(result, seconds)))
        print(f"{name}: {seconds:.1f} s, peak {peak / GiB:.2f} GiB, after {now / GiB:.2f} GiB", flush=True)
        return result

    def table(self) -> str:
        lines = ["| phase | seconds | peak resident GiB | resident after GiB | note |", "|---|---|---|---|---|"]
        lines += [f"| {n} | {s:.1f} | {p / GiB:.2f} | {a / GiB:.2f} | {note} |" for n, s, p, a, note in self.rows]
        return "\n".join(lines)


def longest(examples, n: int) -> list:
    order = sorted(range(len(examples)), key=lambda i: -examples.lengths()[i])[:n]
    return [examples[i] for i in order]


def planned_step(phases: Phases, module, dm, batch_of) -> None:
    """With `--model.gradient_checkpointing auto`: the step `fit` takes on the longest
    questions, as the plan made it (the micro-batch `MicroBatch` chooses, the layers it keeps),
    its micro-batches accumulated."""
    from medqa.memory import plan_for, shrink

    tokens = dm.micro_batch_tokens
    micro, steps, plan = shrink(dm.batch_size, 1, lambda m: plan_for(module.model, module.resolved_backend,
                                                                      module.dtype_name, tokens(m), module._limit_bytes))
    module._use_plan(plan)
    batch = batch_of("train", micro, train=True)
    n = int(batch["attention_mask"].sum())

    def step():
        for _ in range(steps):
            loss, _ = module._loss(batch)
            (loss / steps).backward()

    phases.run(f"planned training step: {micro} x {steps} accumulated, {plan.kept}/{plan.layers} layers kept", step,
               lambda _, s: f"{n * steps:,} tokens ({steps} x the {micro} longest), {n * steps / s:,.0f} tokens/s")
    module.model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2.yaml")
    parser.add_argument("--data", required=True, help="ori_pqal.json")
    parser.add_argument("--steps", type=int, default=1, help="training steps to time (the longest batch each time)")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    phases = Phases()
    began = time.perf_counter()

    def build():
        import torch  # noqa: F401

        from medqa.cli import cli_for

        cli, _ = cli_for("fit", ["--config", args.config, "--data.source", args.data, *extra])
        return cli

    cli = phases.run("imports and settings", build)
    import torch

    from medqa.dtypes import describe_cpu
    from medqa.tokens import collate

    dm, module = cli.datamodule, cli.model
    threads = cli.config.fit.get("threads")
    if threads:
        torch.set_num_threads(threads)
    phases.run("data (read, tokenize or cache)", lambda: dm.setup("fit"))
    phases.run("model load", module.configure_model)
    pad = dm.pad_id

    def batch_of(split: str, n: int, train: bool) -> dict:
        batch = collate(longest(dm.examples[split], n), pad_id=pad, longest=dm.longest_batch_tokens() if train else None,
                        class_weights=dm.class_weights() if train else None)
        return {k: v for k, v in batch.items()}

    evaluation = batch_of("test", dm.eval_batch_size, train=False)
    tokens = int(evaluation["attention_mask"].sum())

    def score():
        module.model.eval()
        with torch.no_grad():
            return module._forward(evaluation)

    rate = lambda n: lambda _, s: f"{n:,} tokens ({dm.eval_batch_size} longest test questions), {n / s:,.0f} tokens/s"
    phases.run("scoring: forward, no gradients", score, rate(tokens))
    module.model.train()
    train = batch_of("train", dm.batch_size, train=True)
    train_tokens = int(train["attention_mask"].sum())
    holder = {}

    def forward():
        holder["loss"], _ = module._loss(train)

    def backward():
        holder.pop("loss").backward()

    if module.gradient_checkpointing == "auto":
        planned_step(phases, module, dm, batch_of)
    else:
        for step in range(args.steps):
            phases.run(f"training step {step + 1}: forward", forward,
                       lambda _, s: f"{train_tokens:,} tokens ({dm.batch_size} longest training questions), "
                                    f"{train_tokens / s:,.0f} tokens/s")
            phases.run(f"training step {step + 1}: backward", backward)
            module.model.zero_grad(set_to_none=True)
    print(f"\n{describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{' '.join(extra) or 'the config as it is'}; {time.perf_counter() - began:.0f} s in all\n")
    print(phases.table())


if __name__ == "__main__":
    main()
