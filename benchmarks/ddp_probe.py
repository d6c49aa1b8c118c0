"""Where the time of a data-parallel step goes: medqa's training step (Unsloth, 4-bit, LoRA)
in N processes, one GPU each, with the gradient exchange switched on in stages, all on one
loaded model per process, so the stages compare within one run.

    source .gpukit/activate.sh   # on the lent GPU machine (2 or more GPUs)
    python benchmarks/ddp_probe.py --model /tmp/llama-8b-random --data .gpudata/ori_pqal.json --processes 1 2

Stages, each timed over the same number of steps after warm-up, the GPUs synchronised at
both ends (the slowest process counts; tokens are summed over processes):
  local        forward, backward, AdamW in each process; no gradient exchange at all
  allreduce    the same plus one all-reduce of all LoRA gradients after backward (no overlap)
  ddp          torch DDP as Lightning builds it (find_unused_parameters=False, 25 MB buckets)
  ddp-static   DDP with static_graph=True and gradient_as_bucket_view=True
  *-sync       the same, the GPU synchronised after every step (as medqa's SpeedMonitor does)
  lightning    medqa's LightningModule under Lightning's Trainer (DDP with several processes),
               bucketed batches, gradient clipping 1.0, as `configs/lora.yaml`; timed by SpeedMonitor
  lightning-plain / lightning-noclip   the same with plain random batches / without clipping
  lightning-ddp   Lightning's DDP strategy even for one process (needs --group there)
Lightning moves the model to the CPU at the end of each fit: put its stages last.
`--load_first` loads the model before the process group exists, so Unsloth sees a single
process while loading (Lightning starts the group first). `--group` starts a process group
even for one process. `--unsloth_before_device` imports Unsloth while every process still
has GPU 0 as its current device, as `python -m medqa` does before Lightning picks each
process's GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from datetime import date
from functools import partial

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STAGES = ["local", "local-sync", "allreduce", "ddp", "ddp-sync", "ddp-static", "lightning", "lightning-plain",
          "lightning-noclip", "lightning-ddp"]


class StepLoss(torch.nn.Module):
    """medqa's answer loss as a module's forward, so DDP can wrap it as Lightning does."""

    def __init__(self, module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: dict) -> torch.Tensor:
        return self.module._loss(batch)[0]


def _batches(args, rank: int, world: int) -> list[dict]:
    from medqa.data import QADataModule

    dm = QADataModule(source=args.data, pretrained=args.model, max_length=1024, batch_size=args.batch_size,
                      bucket_batches=0)
    dm.setup("fit")
    everything = list(dm.train_dataloader())
    mine = everything[rank::world]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in mine]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(run_step, batches: list[dict], warmup: int, steps: int, world: int) -> dict:
    for i in range(warmup):
        run_step(batches[i % len(batches)])
    _sync()
    if world > 1:
        dist.barrier()
    tokens, start = 0, time.perf_counter()
    for i in range(warmup, warmup + steps):
        batch = batches[i % len(batches)]
        tokens += batch["num_tokens"]
        run_step(batch)
    _sync()
    seconds = time.perf_counter() - start
    if world > 1:
        figures = torch.tensor([float(tokens), seconds], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
        seconds_t = figures[1:].clone()
        dist.all_reduce(figures[:1])
        dist.all_reduce(seconds_t, op=dist.ReduceOp.MAX)
        tokens, seconds = int(figures[0]), float(seconds_t)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "step_s": seconds / steps}


def worker(rank: int, world: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    cuda = torch.cuda.is_available()  # without CUDA (a check of this script): gloo, the hf backend
    if cuda:
        if args.unsloth_before_device:  # as `python -m medqa` does: unsloth first, Lightning picks the GPU later
            import unsloth  # noqa: F401
        torch.cuda.set_device(rank)
        import unsloth  # noqa: F401,F811  (before transformers and peft, as medqa does)

    from medqa.model import MedQALoRA

    grouped = world > 1 or args.group

    def init() -> None:
        if grouped:
            dist.init_process_group(*(["nccl"] if cuda else ["gloo"]), device_id=torch.device("cuda", rank) if cuda else None)

    if not args.load_first:
        init()
    from medqa.data import QADataModule

    answers = QADataModule(source=args.data, pretrained=args.model, max_length=1024).answer_tokens
    module = MedQALoRA(pretrained=args.model, backend="unsloth" if cuda else "hf", load_in_4bit=cuda,
                       dtype="bfloat16" if cuda else "float32", max_length=1024, answer_tokens=answers)
    module.configure_model()
    if args.load_first:
        init()
    module.to(torch.device("cuda", rank) if cuda else "cpu")  # as Lightning does: DDP broadcasts every buffer
    batches = _batches(args, rank, world)
    params = [p for p in module.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    loss_module = StepLoss(module)

    def plain(batch, exchange: bool = False) -> None:
        loss_module(batch).backward()
        if exchange:
            grads = [p.grad for p in params]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat /= world
            for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def lightning(variant: str, warmup: int) -> dict:
        """medqa's step under Lightning's Trainer (DDP when several processes), timed by
        medqa's SpeedMonitor (the GPU synchronised after every step)."""
        import lightning as L

        from medqa.data import QADataModule
        from medqa.speed import SpeedMonitor

        dm = QADataModule(source=args.data, pretrained=args.model, max_length=1024, batch_size=args.batch_size,
                          bucket_batches=0 if variant == "lightning-plain" else 16)
        monitor = SpeedMonitor(warmup_steps=warmup)
        trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=world, strategy="ddp" if world > 1 or variant == "lightning-ddp" else "auto",
                            precision="32-true", max_steps=warmup + args.steps, logger=False,
                            gradient_clip_val=None if variant == "lightning-noclip" else 1.0,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, callbacks=[monitor])
        trainer.fit(module, datamodule=dm)
        s = monitor.summary
        return {"tokens": int(s["step_tokens_per_s"] * s["seconds_in_steps"]), "seconds": s["seconds_in_steps"],
                "tokens_per_s": s["step_tokens_per_s"], "step_s": s["seconds_in_steps"] / s["timed_steps"],
                "wall_tokens_per_s": s["wall_tokens_per_s"]}

    def synced(run_step):
        def step(batch):
            run_step(batch)
            _sync()
        return step

    results = {}
    warm = args.warmup
    for stage in args.stages:
        if not grouped and stage in ("allreduce", "ddp", "ddp-static", "ddp-sync", "lightning-ddp"):
            continue
        if stage.startswith("lightning"):
            results[stage] = lightning(stage, warm)
        else:
            wrapped = None
            if stage.removesuffix("-sync") in ("local", "allreduce"):
                step = partial(plain, exchange=stage.startswith("allreduce"))
            else:
                from torch.nn.parallel import DistributedDataParallel as DDP

                extra = {"static_graph": True, "gradient_as_bucket_view": True} if stage == "ddp-static" else {}
                wrapped = DDP(loss_module, device_ids=[rank] if cuda else None, find_unused_parameters=False, **extra)

                def step(batch, wrapped=wrapped):
                    wrapped(batch).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            results[stage] = _time(synced(step) if stage.endswith("-sync") else step, batches, warm, args.steps, world)
            del wrapped, step
            gc.collect()
        warm = 3  # compiled once, in the first stage
        if rank == 0:
            print(f"processes={world} group={grouped} load_first={args.load_first} {stage}: {json.dumps(results[stage])}", flush=True)
    if rank == 0:
        results["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        queue.put(results)
    if grouped:
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--load_first", action="store_true")
    p.add_argument("--unsloth_before_device", action="store_true",
                   help="import unsloth before choosing this process's GPU, as `python -m medqa` does")
    p.add_argument("--group", action="store_true", help="start a process group with 1 process too (as DDP would)")
    p.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES, help="in this order; 1 process skips the exchange stages")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=12)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--port", type=int, default=29533)
    p.add_argument("--out", help="append the results here (JSON lines)")
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    for world in args.processes:
        queue = ctx.SimpleQueue()
        mp.start_processes(worker, args=(world, args, queue), nprocs=world, start_method="spawn")
        results = queue.get()
        row = {"card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "date": str(date.today()), "processes": world,
               "load_first": args.load_first, "group": args.group or world > 1, **results}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        args.port += 1


if __name__ == "__main__":
    main()
