"""Training throughput of medqa against Unsloth alone and the standard QLoRA recipe, on the
same tokenized PubMedQA batches, on one GPU.

    source .gpukit/activate.sh   # on the lent GPU machine
    python benchmarks/make_random_llama.py --shape 8b --out /tmp/llama-8b-random --corpus .gpudata/ori_pqal.json
    python benchmarks/throughput.py --model /tmp/llama-8b-random --data .gpudata/ori_pqal.json

Paths, each in its own process (Unsloth patches transformers and peft on import):
  medqa    the project's LightningModule under Lightning's Trainer, unsloth backend, 4-bit
  unsloth  FastLanguageModel + get_peft_model in a plain PyTorch loop
  hf       transformers + peft + bitsandbytes (prepare_model_for_kbit_training), plain loop,
           bf16 autocast: the standard QLoRA recipe
A path may carry its own settings after `@`, joined by `+`, so one call measures every row
of a table on one machine, e.g. (issue 12's table):
    --paths "unsloth,unsloth@batch_size=16,unsloth@unsloth_checkpointing=false,medqa@medqa_checkpointing=true,
             medqa@medqa_checkpointing=true+medqa_bucket_batches=16,medqa@medqa_checkpointing=auto+medqa_bucket_batches=16,
             medqa@medqa_checkpointing=auto+medqa_bucket_batches=16+medqa_memory_limit_gib=24"
All three train on the same batches: PQA-L's training folds as medqa tokenizes them, in the
order medqa's DataModule gives them, padded per batch. Each path warms up, then is timed
with the GPU synchronised at both ends. Tokens are non-padding tokens. Peak memory is
`torch.cuda.max_memory_allocated` from the first training step on (loading excluded).
Scoring time is the 500 official test questions after the model is loaded.
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

import torch

LORA = dict(r=16, alpha=16, dropout=0.0,
            targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
LR = 2e-4
CHECKPOINTING = {"true": True, "false": False, "auto": "auto"}
UNSLOTH_CHECKPOINTING = {"unsloth": "unsloth", "true": True, "false": False}


def datamodule(args, bucket_batches: int = 0):
    """medqa's DataModule on the benchmark's data: ordinary random batches, padded per batch,
    unless told otherwise (the medqa path's --medqa_bucket_batches)."""
    from medqa.data import QADataModule

    dm = QADataModule(source=args.data, pretrained=args.model, max_length=args.max_length,
                      batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                      bucket_batches=bucket_batches)
    dm.setup("fit")
    return dm


def batches(dm, n: int) -> list[dict]:
    """The first `n` training batches in medqa's order (repeating the epoch if needed)."""
    out = []
    while len(out) < n:
        out += list(dm.train_dataloader())
    return out[:n]


def to_device(batch: dict) -> dict:
    return {k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def timed_loop(step, data: list[dict], warmup: int) -> dict:
    """Run `step` over `data`; time the steps after `warmup`."""
    for batch in data[:warmup]:
        step(to_device(batch))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    tokens = sum(int(b["attention_mask"].sum()) for b in data[warmup:])
    start = time.perf_counter()
    for batch in data[warmup:]:
        step(to_device(batch))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "steps": len(data) - warmup}


def bench_trainer(precision: str, max_steps: int, callback):
    """A one-GPU Lightning Trainer that only trains and times: no logger, checkpoints,
    progress bar, summary or validation."""
    import lightning as L

    return L.Trainer(accelerator="gpu", devices=1, precision=precision, max_steps=max_steps, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, callbacks=[callback])


def step_timer(warmup: int, steps: int):
    """A Lightning callback timing `steps` training steps after `warmup`, the GPU
    synchronised at both ends only. Steps are counted over the whole fit: Lightning's
    `batch_idx` starts again at every epoch, so a run longer than an epoch would never reach
    its last step by `batch_idx`."""
    import lightning as L

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepTimer(L.Callback):
        def __init__(self):
            self.tokens, self.start, self.seconds, self.seen, self.timed = 0, 0.0, 0.0, 0, 0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if self.seen == warmup:
                sync()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                self.start = time.perf_counter()
            if warmup <= self.seen < warmup + steps:
                self.tokens += batch["num_tokens"]  # a host int: no sync

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.seen += 1
            if self.seen == warmup + steps:
                sync()
                self.seconds = time.perf_counter() - self.start
                self.timed = steps

    return StepTimer()


# ---------------------------------------------------------------------------- paths


def run_medqa(args) -> dict:
    from medqa.backends import import_unsloth_first

    import_unsloth_first(["fit", "--model.backend", "unsloth"])
    import lightning as L

    from medqa.model import MedQALoRA

    dm = datamodule(args, args.medqa_bucket_batches)
    n = args.warmup + args.steps

    timer = step_timer(args.warmup, args.steps)
    model = MedQALoRA(pretrained=args.model, backend="unsloth", load_in_4bit=True, max_length=args.max_length,
                      lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["targets"], gradient_checkpointing=CHECKPOINTING[args.medqa_checkpointing],
                      memory_limit_gib=args.medqa_memory_limit_gib, load_in_fp8=args.medqa_fp8,
                      answer_tokens=dm.answer_tokens, optimizer=lambda p: torch.optim.AdamW(p, lr=LR))
    trainer = bench_trainer(args.precision, n, timer)
    trainer.fit(model, datamodule=dm)
    if timer.timed != args.steps:
        raise SystemExit(f"the medqa path ran {timer.seen} of {n} steps: nothing timed")
    result = {"tokens": timer.tokens, "seconds": timer.seconds, "steps": args.steps,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30}

    class ScoreTimer(L.Callback):  # the test epoch alone: not Lightning moving the model back
        def on_test_epoch_start(self, trainer, module):
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_test_epoch_end(self, trainer, module):
            torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start

    score_timer = ScoreTimer()
    tester = L.Trainer(accelerator="gpu", devices=1, precision=args.precision, logger=False,
                       enable_progress_bar=False, enable_model_summary=False, callbacks=[score_timer])
    metrics = tester.test(model, datamodule=dm, verbose=False)[0]
    result["score_seconds"] = score_timer.seconds
    result["scored"] = len(dm.examples["test"])
    result["test_acc"] = metrics["test/acc"]
    result["plan"] = model.plan.name() if model.plan is not None else None  # what `auto` chose
    if args.paired and not args.medqa_bucket_batches:  # paired needs the same batches
        result["paired"] = paired_with_unsloth(model, dm, args)
    return result


def paired_with_unsloth(module, dm, args) -> dict:
    """medqa's Lightning step and Unsloth alone's step, interleaved batch by batch on the same
    loaded model and the same batches, each timed on the GPU timeline with CUDA events.

    Separate processes give each path its own GPU clocks and host load, which moved
    throughput by up to 20% between identical runs; interleaving cancels that. Before each
    Lightning step a callback runs Unsloth's own forward with labels (fused loss), backward
    and an AdamW step on that batch; the Lightning span runs from there to the next
    batch's start, so it includes everything the Trainer does between steps.
    """
    import lightning as L

    n = args.paired_warmup + args.steps

    class Paired(L.Callback):
        def __init__(self):
            self.unsloth, self.medqa, self.tokens, self.opt, self.open = [], [], [], None, None

        def _event(self):
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.open is not None:
                self.medqa.append((self.open, self._event()))
            if self.opt is None:
                self.opt = torch.optim.AdamW([p for p in pl_module.model.parameters() if p.requires_grad], lr=LR)
            start = self._event()
            loss = pl_module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   labels=batch["labels"]).loss
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.unsloth.append((start, self._event()))
            self.tokens.append(batch["num_tokens"])
            self.open = self._event()

        def on_train_end(self, trainer, pl_module):
            self.medqa.append((self.open, self._event()))

    paired = Paired()
    trainer = bench_trainer(args.precision, n, paired)
    trainer.fit(module, datamodule=dm)
    torch.cuda.synchronize()
    timed = slice(args.paired_warmup, n)
    tokens = sum(paired.tokens[timed])
    out = {}
    for name, spans in (("unsloth", paired.unsloth), ("medqa", paired.medqa)):
        seconds = sum(a.elapsed_time(b) for a, b in spans[timed]) / 1000
        out[name] = {"tokens_per_s": tokens / seconds, "step_s": seconds / args.steps}
    out["ratio"] = out["medqa"]["tokens_per_s"] / out["unsloth"]["tokens_per_s"]
    return out


def run_unsloth(args) -> dict:
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(args.model, max_seq_length=args.max_length, dtype=torch.bfloat16,
                                                 load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model, r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=LORA["targets"],
        bias="none", use_gradient_checkpointing=UNSLOTH_CHECKPOINTING[args.unsloth_checkpointing], random_state=3407, max_seq_length=args.max_length)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    data = batches(datamodule(args), args.warmup + args.steps)

    def step(batch):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    result = timed_loop(step, data, args.warmup)
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def run_hf(args) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=LORA["targets"], bias="none", task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    dm = datamodule(args)
    data = batches(dm, args.warmup + args.steps)

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    result = timed_loop(step, data, args.warmup)
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30

    # Scoring as a generic pipeline does it: full logits, label tokens at the answer position.
    model.eval()
    first = torch.tensor([ids[0] for ids in dm.answer_tokens["label_ids"]], device="cuda")
    correct = 0
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for batch in dm.test_dataloader():
            batch = to_device(batch)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            rows = logits[torch.arange(logits.size(0), device="cuda"), batch["answer_pos"] - 1]
            correct += int((rows[:, first].argmax(-1) == batch["label"]).sum())
    torch.cuda.synchronize()
    result["score_seconds"] = time.perf_counter() - start
    result["scored"] = len(dm.examples["test"])
    result["test_acc"] = correct / result["scored"]
    return result


PATHS = {"medqa": run_medqa, "unsloth": run_unsloth, "hf": run_hf}
TITLES = {"medqa": "medqa (Lightning, unsloth backend, 4-bit)", "unsloth": "Unsloth alone (plain loop, 4-bit)",
          "hf": "transformers + peft + bitsandbytes (QLoRA, plain loop)"}


def table(results: dict[str, dict], args, card: str) -> str:
    lines = [
        f"{card}, {date.today().isoformat()}; {Path(args.model).name}, batch {args.batch_size}, "
        f"{args.warmup} warm-up + {args.steps} timed steps, LoRA r {LORA['r']} on 7 projections",
        "",
        "| path | train tokens/s | step time (s) | peak GPU memory (GiB) | score 500 test questions (s) | vs Unsloth alone |",
        "|---|---|---|---|---|---|",
    ]
    base = results.get("unsloth", {}).get("tokens_per_s")
    for spec, r in results.items():
        name, settings = split_path(spec)
        title = TITLES[name] + "".join(f", {k} {v}" for k, v in settings)
        if r.get("plan"):
            title += f" (plan: {r['plan']})"
        if "error" in r:
            lines.append(f"| {title} | failed: {r['error']} | | | | |")
            continue
        score = f"{r['score_seconds']:.1f}" if "score_seconds" in r else "-"
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {title} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {r['peak_gib']:.2f} | {score} | {ratio} |")
    paired = next((r["paired"] for r in results.values() if r.get("paired")), None)
    if paired:
        lines += [
            "",
            f"Interleaved in one process (same model, same {args.steps} batches, each step timed with CUDA events):",
            "",
            "| step | train tokens/s | step time (s) |",
            "|---|---|---|",
            f"| Unsloth alone (forward with labels, backward, AdamW) | {paired['unsloth']['tokens_per_s']:,.0f} | "
            f"{paired['unsloth']['step_s']:.3f} |",
            f"| medqa under Lightning's Trainer (step and everything between steps) | "
            f"{paired['medqa']['tokens_per_s']:,.0f} | {paired['medqa']['step_s']:.3f} |",
            f"| medqa / Unsloth alone | {paired['ratio']:.2f}x | |",
        ]
    return "\n".join(lines)


def split_path(spec: str) -> tuple[str, list[tuple[str, str]]]:
    """`medqa@batch_size=16+medqa_checkpointing=auto` -> ("medqa", [("batch_size", "16"), ...])."""
    name, _, rest = spec.partition("@")
    settings = [tuple(item.split("=", 1)) for item in rest.split("+") if item] if rest else []
    if name not in PATHS or any(len(kv) != 2 or kv[0] not in PATH_SETTINGS for kv in settings):
        raise SystemExit(f"--paths: cannot read {spec!r}: a path is one of {', '.join(PATHS)}, optionally followed by "
                         f"@key=value+key=value with keys from {', '.join(PATH_SETTINGS)}")
    return name, settings


PATH_SETTINGS = ("batch_size", "medqa_checkpointing", "medqa_bucket_batches", "medqa_memory_limit_gib",
                 "medqa_fp8", "unsloth_checkpointing", "max_length")
"""The settings a path may carry after `@` (each a command-line option of this script)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local model directory (make_random_llama.py)")
    parser.add_argument("--data", required=True, help="ori_pqal.json")
    parser.add_argument("--paths", default="medqa,unsloth,hf")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--eval_batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", default="32-true", help="Lightning precision for the medqa path")
    parser.add_argument("--paired", action=argparse.BooleanOptionalAction, default=True,
                        help="also time medqa and Unsloth alone interleaved in one process")
    parser.add_argument("--paired_warmup", type=int, default=3)
    parser.add_argument("--medqa_bucket_batches", type=int, default=0,
                        help="length-aware batches for the medqa path (the others keep random batches)")
    parser.add_argument("--medqa_checkpointing", choices=sorted(CHECKPOINTING), default="true",
                        help="the medqa path's --model.gradient_checkpointing (true: as Unsloth alone's recipe)")
    parser.add_argument("--medqa_memory_limit_gib", type=float, default=None,
                        help="the medqa path's --model.memory_limit_gib (plans and holds to that much of the card)")
    parser.add_argument("--medqa_fp8", type=lambda v: {"true": True, "false": False}.get(v, v),
                        choices=[True, False, "auto"], default=False,
                        help="the medqa path's --model.load_in_fp8 (the frozen base's products in FP8)")
    parser.add_argument("--unsloth_checkpointing", choices=sorted(UNSLOTH_CHECKPOINTING), default="unsloth",
                        help="Unsloth alone's use_gradient_checkpointing (unsloth: its default, offloaded)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.md"))
    parser.add_argument("--one", choices=sorted(PATHS), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:  # a child process: run one path, print its result as the last line
        result = PATHS[args.one](args)
        result["tokens_per_s"] = result["tokens"] / result["seconds"]
        result["step_s"] = result["seconds"] / result["steps"]
        print("RESULT " + json.dumps(result), flush=True)
        return

    results = {}
    specs = [spec.strip() for spec in args.paths.split(",") if spec.strip()]
    parsed = [split_path(spec) for spec in specs]  # all checked before the first path runs
    for spec, (name, settings) in zip(specs, parsed):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", name, *[x for k, v in settings for x in (f"--{k}", v)]]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            results[spec] = {"error": tail[0][:200]}
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        else:
            results[spec] = json.loads(lines[-1][7:])
        print(f"{spec}: {results[spec]} ({time.perf_counter() - t0:.0f} s with loading)", flush=True)
        # Written after every path, so a run cut short keeps what it measured.
        card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        text = table(results, args, card)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n\nCommand: python " + " ".join(sys.argv) + "\n\n```json\n"
                            + json.dumps(results, indent=1) + "\n```\n")
    print("\n" + text + f"\n\nwritten to {args.out}")


if __name__ == "__main__":
    main()
