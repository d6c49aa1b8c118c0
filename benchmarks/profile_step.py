"""Where medqa's training and scoring time goes, against Unsloth alone: one process, one
loaded model, the same batches, so machine and compile-cache differences drop out.

    source .gpukit/activate.sh   # on the lent GPU machine
    python benchmarks/make_random_llama.py --shape 8b --out /tmp/llama-8b-random --corpus .gpudata/ori_pqal.json
    python benchmarks/profile_step.py --model /tmp/llama-8b-random --data .gpudata/ori_pqal.json

Training variants, each timed over the same batches after its own warm-up:
  unsloth            the CausalLM forward with labels (Unsloth's fused loss), plain loop
  medqa-loop         medqa's answer loss (decoder + head at the answer positions), plain loop
  medqa-loop+sync    the same plus one host sync a step (what a finite-loss check costs)
  lightning          MedQALoRA under Lightning's Trainer (the `medqa` path of throughput.py)
  unsloth (again)    the first variant once more, to show drift over the run
For each: tokens/s, step time, graphs compiled inside the timed window, and, from
torch.profiler over a few steps, the GPU kernel time, the top kernels and the host's time in
CUDA runtime calls. Scoring is timed by throughput.py.
Results and a reading of them: benchmarks/results/profile-h100-2026-11-27.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from throughput import LORA, LR, batches, bench_trainer, datamodule, step_timer, timed_loop, to_device  # noqa: E402


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def gpu_profile(run_steps) -> dict:
    """GPU kernel time against wall time while `run_steps()` runs, the top kernels, and the
    host's CUDA runtime calls that took longest (a blocking copy or sync shows up there)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_steps()
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and "#" not in e.key
               and not e.key.startswith(("ProfilerStep", "Optimizer"))]
    runtime = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.key.startswith("cuda")]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:6]
    host = sorted(runtime, key=lambda e: -e.self_cpu_time_total)[:6]
    return {"wall_s": wall, "gpu_busy_s": busy,
            "top": [(e.key[:70], round(e.self_device_time_total / 1e6, 3), e.count) for e in top],
            "host": [(e.key[:70], round(e.self_cpu_time_total / 1e6, 3), e.count) for e in host]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--eval_batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile_steps", type=int, default=3)
    args = parser.parse_args()

    import unsloth  # noqa: F401  (first: it patches transformers and peft)

    from medqa.backends import decoder_and_head
    from medqa.metrics import answer_loss
    from medqa.model import MedQALoRA

    dm = datamodule(args)
    module = MedQALoRA(pretrained=args.model, backend="unsloth", load_in_4bit=True, max_length=args.max_length,
                       lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                       target_modules=LORA["targets"], answer_tokens=dm.answer_tokens,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=LR))
    module.configure_model()
    model = module.model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    data = batches(dm, args.warmup + args.steps)

    def update(loss):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def unsloth_step(b):
        update(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss)

    def medqa_step(b):
        update(module._loss(b)[0])

    def medqa_sync_step(b):
        loss = module._loss(b)[0]
        bool(torch.isfinite(loss))
        update(loss)

    _, head = decoder_and_head(model)

    def top_level_step(b):
        # Through the PeftModel / CausalLM forward, as Unsloth alone, returning hidden states.
        os.environ["UNSLOTH_RETURN_HIDDEN_STATES"] = "1"
        try:
            hidden = model(input_ids=b["input_ids"]).logits
        finally:
            os.environ.pop("UNSLOTH_RETURN_HIDDEN_STATES")
        update(answer_loss(hidden, head, b["loss_pos"], b["loss_targets"]))

    def index_select_step(b):
        hidden = module.hidden_states(b["input_ids"], None)
        logits = head(hidden.flatten(0, 1).index_select(0, b["loss_pos"])).float()
        update(torch.nn.functional.cross_entropy(logits, b["loss_targets"]))

    rows = []

    def record(name, result, graphs, prof):
        rows.append({"name": name, "tok_s": result["tokens"] / result["seconds"],
                     "step_s": result["seconds"] / result["steps"], "graphs": graphs,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30, **prof})
        print(f"{name}: {rows[-1]}", flush=True)

    def plain(name, step):
        g = compiled_graphs()
        result = timed_loop(step, data, args.warmup)
        graphs = compiled_graphs() - g
        prof = gpu_profile(lambda: [step(to_device(b)) for b in data[: args.profile_steps]])
        record(name, result, graphs, prof)

    # medqa first, on a fresh process: nothing of the other variants' state yet.
    plain("medqa-loop", medqa_step)
    plain("unsloth", unsloth_step)
    plain("medqa-loop+sync", medqa_sync_step)
    plain("top-level call, hidden states", top_level_step)
    plain("index_select loss", index_select_step)
    plain("medqa-loop (again)", medqa_step)

    # Lightning: the same module and loaded model under the Trainer.
    timer = step_timer(args.warmup, args.steps)
    trainer = bench_trainer("32-true", args.warmup + args.steps, timer)
    g = compiled_graphs()
    trainer.fit(module, datamodule=dm)
    module.to("cuda")  # the strategy's teardown moved it to the CPU
    record("lightning", {"tokens": timer.tokens, "seconds": timer.seconds, "steps": args.steps},
           compiled_graphs() - g, {"wall_s": 1.0, "gpu_busy_s": float("nan"), "top": [], "host": []})
    plain("unsloth (again)", unsloth_step)

    card = torch.cuda.get_device_name(0)
    print(f"\n{card}; {Path(args.model).name}; batch {args.batch_size}; {args.warmup} warm-up + {args.steps} timed steps\n")
    print(f"| variant | tokens/s | step s | graphs compiled while timed | GPU kernel time, {args.profile_steps} steps (s) "
          f"| host CUDA calls, {args.profile_steps} steps (s) | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        host = sum(t for _, t, _ in r["host"])
        print(f"| {r['name']} | {r['tok_s']:,.0f} | {r['step_s']:.3f} | {r['graphs']} | {r['gpu_busy_s']:.3f} "
              f"| {host:.3f} | {r['peak_gib']:.2f} |")
    for r in rows:
        print(f"\ntop kernels, {r['name']}:")
        for k, s, n in r["top"]:
            print(f"  {s:7.3f} s  x{n:<6} {k}")
        for k, s, n in r["host"]:
            print(f"  host {s:7.3f} s  x{n:<6} {k}")


if __name__ == "__main__":
    main()
