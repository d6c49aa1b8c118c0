"""From command to test score: medqa against the recipe users copy today, on one GPU.

    source .gpukit/activate.sh   # on the lent GPU machine
    python benchmarks/make_random_llama.py --shape 8b --out /tmp/llama-8b-random --corpus .gpudata/ori_pqal.json
    python benchmarks/recipe.py --model /tmp/llama-8b-random --data .gpudata/ori_pqal.json

Each side in its own processes, timed from its first command's start to its test score
(loading, compiling, training, checkpoints and scoring all count):
  medqa      `python -m medqa fit --config configs/lora.yaml` with the model and data given,
             then `python -m medqa test --ckpt_path last`
  medqa-one  the same fit with `--test_after_fit last`: the test scored in fit's process, as
             the recipe scores in its own (one start, one model load)
  recipe     Unsloth's Llama 3.1 notebook: `FastLanguageModel.from_pretrained(load_in_4bit=True)`,
             `get_peft_model(r=16, lora_alpha=16, lora_dropout=0, the seven projections,
             use_gradient_checkpointing="unsloth", random_state=3407)`, TRL's `SFTTrainer` with
             `optim="adamw_8bit"`, a linear schedule after 5 warm-up steps, bf16, the loss on every
             token as the notebook has it; then the 500 test questions scored as medqa scores them
             (the label words' log-probabilities at the answer), so the scores compare
Both train on the same tokens (medqa's prompt and answer word for each PQA-L training
question), with the epochs, batch size, accumulation, learning rate 2e-4 and weight decay
0.01 of `configs/lora.yaml` (`--batch_size` and `--accumulate` change the batch of both
sides). `--max_steps` shortens both alike. With random weights (the
made model) the scores say nothing about quality; the times are what this measures.

The recipe side needs CUDA (TRL 1.15's SFTTrainer always adds a Triton LM head) and `trl`
(the GPU kit has it). The medqa side runs anywhere: on the CPU, check this script with
`--sides medqa --model builtin:tiny-llama --data synthetic --max_steps 3 --extra="--trainer.accelerator
cpu --model.backend hf --model.load_in_4bit false --model.dtype float32"`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "lora.yaml"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def settings(args) -> dict:
    """The training settings both sides use, from configs/lora.yaml (the batch as given)."""
    config = yaml.safe_load(CONFIG.read_text())
    trainer, model, data = config["trainer"], config["model"], config["data"]
    optimizer = model["optimizer"]["init_args"]
    return {"epochs": trainer["max_epochs"], "batch_size": args.batch_size or data["batch_size"],
            "accumulate": args.accumulate or trainer["accumulate_grad_batches"], "lr": optimizer["lr"],
            "weight_decay": optimizer["weight_decay"], "max_length": data["max_length"],
            "lora_r": model["lora_r"], "lora_alpha": model["lora_alpha"]}


def medqa(args, logs: Path, one_command: bool = False) -> dict:
    """`python -m medqa fit` then `test`, timed together, or `fit --test_after_fit last`
    alone (`one_command`); the test scores from metrics.json, where the time went from the
    commands' speed.json."""
    name = "medqa-one" if one_command else "medqa"
    common = ["--config", str(CONFIG), "--model.pretrained", args.model, "--data.source", args.data,
              "--trainer.logger.init_args.save_dir", str(logs), "--trainer.logger.init_args.name", name]
    s = settings(args)
    common += ["--data.batch_size", str(s["batch_size"]), "--trainer.accumulate_grad_batches", str(s["accumulate"])]
    common += args.extra.split()
    fit = ["--trainer.enable_progress_bar", "false"]
    if args.max_steps:
        fit += ["--trainer.max_steps", str(args.max_steps)]
    commands = [("fit", fit + ["--test_after_fit", "last"])] if one_command else [("fit", fit), ("test", ["--ckpt_path", "last"])]
    start = time.perf_counter()
    seconds = {}
    for command, extra in commands:
        log = logs / f"{name}-{command}.log"
        began = time.perf_counter()
        with open(log, "w") as out:
            done = subprocess.run([sys.executable, "-m", "medqa", command, *common, *extra], cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        seconds[command] = time.perf_counter() - began
        if done.returncode != 0:
            raise SystemExit(f"medqa {command} failed (exit {done.returncode}); see {log}")
    total = time.perf_counter() - start
    scored = "fit" if one_command else "test"
    scores = json.loads(sorted((logs / name).glob(f"{scored}-*/metrics.json"))[-1].read_text())
    fit_speed = json.loads(sorted((logs / name).glob("fit-*/speed.json"))[-1].read_text())
    test_speed = json.loads(sorted((logs / name).glob(f"{scored}-*/speed.json"))[-1].read_text())
    scoring = test_speed["scoring"]
    starts = [fit_speed.get("start", {})] + ([] if one_command else [test_speed.get("start", {})])
    return {"seconds": total, **{f"{c}_command_seconds": v for c, v in seconds.items()},
            "start_seconds": sum(st.get("seconds", 0.0) for st in starts),
            "unsloth_import_seconds": sum(st.get("unsloth_import_seconds", 0.0) for st in starts),
            "loading_seconds": fit_speed["loading_seconds"] + scoring["loading_seconds"],
            "train_seconds": fit_speed["fit_seconds"], "test_seconds": scoring["seconds"],
            "acc": scores["test/acc"], "macro_f1": scores["test/macro_f1"]}


def recipe(args, logs: Path) -> dict:
    """The notebook recipe in this process (run as its own process by `main`)."""
    start = time.perf_counter()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("the recipe side needs a CUDA GPU (TRL's SFTTrainer adds a Triton LM head)")
    began = time.perf_counter()
    import unsloth  # noqa: F401  (first: it patches transformers, peft and trl)

    unsloth_seconds = time.perf_counter() - began
    import lightning as L
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from medqa.data import QADataModule
    from medqa.model import MedQALoRA
    from medqa.speed import SpeedMonitor, process_seconds

    s = settings(args)
    dm = QADataModule(source=args.data, pretrained=args.model, max_length=s["max_length"],
                      batch_size=s["batch_size"])
    dm.setup("fit")
    train = Dataset.from_list([{"input_ids": e.input_ids} for e in dm.examples["train"]])
    from unsloth import FastLanguageModel

    start_seconds = process_seconds() or 0.0  # the imports and the data, as medqa's speed.json counts them
    began = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=args.model, max_seq_length=s["max_length"],
                                                         dtype=None, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model, r=s["lora_r"], target_modules=TARGETS, lora_alpha=s["lora_alpha"], lora_dropout=0, bias="none",
        use_gradient_checkpointing="unsloth", random_state=3407, use_rslora=False, loftq_config=None)
    loading_seconds = time.perf_counter() - began
    config = SFTConfig(
        output_dir=str(logs / "recipe"), per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=s["accumulate"], num_train_epochs=s["epochs"], max_steps=args.max_steps or -1,
        warmup_steps=5, learning_rate=s["lr"], weight_decay=s["weight_decay"], lr_scheduler_type="linear",
        optim="adamw_8bit", bf16=True, logging_steps=1, seed=3407, report_to="none", save_strategy="no",
        max_length=s["max_length"], packing=False,
    )
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=train, args=config)
    began = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - began

    # Score the 500 test questions as medqa does, on the model the recipe trained.
    module = MedQALoRA(pretrained=args.model, backend="unsloth", max_length=s["max_length"], answer_tokens=dm.answer_tokens)
    module.model, module.resolved_backend = trainer.model, "unsloth"
    monitor = SpeedMonitor()
    tester = L.Trainer(accelerator="gpu", devices=1, precision="32-true", logger=False, callbacks=[monitor],
                       enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    scores = tester.test(module, datamodule=dm, verbose=False)[0]
    return {"seconds": time.perf_counter() - start, "start_seconds": start_seconds, "unsloth_import_seconds": unsloth_seconds,
            "loading_seconds": loading_seconds, "train_seconds": train_seconds,
            "test_seconds": monitor.scoring["seconds"], "acc": scores["test/acc"], "macro_f1": scores["test/macro_f1"],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def table(results: dict, args) -> str:
    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    s = settings(args)
    steps = f"{args.max_steps} optimizer steps" if args.max_steps else f"{s['epochs']} epochs"
    lines = [
        f"{card}, {date.today()}, model {Path(args.model).name}, data {Path(args.data).name}, {steps}, "
        f"batch {s['batch_size']} x {s['accumulate']} accumulated"
        + (f" (medqa's commands with `{args.extra}`)" if args.extra else "") + ". Seconds from the command's start.",
        "",
        "| side | to test score s | starting s (importing Unsloth) | loading the model s | training s | scoring s "
        "| the rest s | test acc | test macro-F1 | vs recipe |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = results.get("recipe", {}).get("seconds")
    for side, r in results.items():
        ratio = f"{r['seconds'] / base:.2f}x" if base else "-"
        rest = r["seconds"] - r["start_seconds"] - r["loading_seconds"] - r["train_seconds"] - r["test_seconds"]
        lines.append(f"| {side} | {r['seconds']:.1f} | {r['start_seconds']:.1f} ({r['unsloth_import_seconds']:.1f}) | "
                     f"{r['loading_seconds']:.1f} | {r['train_seconds']:.1f} | "
                     f"{r['test_seconds']:.1f} | {rest:.1f} | {r['acc']:.3f} | {r['macro_f1']:.3f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local model directory (benchmarks/make_random_llama.py)")
    p.add_argument("--data", required=True, help="ori_pqal.json")
    p.add_argument("--sides", nargs="+", default=["recipe", "medqa", "medqa-one"], choices=["recipe", "medqa", "medqa-one"])
    p.add_argument("--max_steps", type=int, default=0, help="optimizer steps for both sides (0: the config's epochs)")
    p.add_argument("--batch_size", type=int, help="questions a batch, both sides (default: lora.yaml's)")
    p.add_argument("--accumulate", type=int, help="batches an optimizer step, both sides (default: lora.yaml's)")
    p.add_argument("--extra", default="", help="more arguments for both medqa commands, space-separated")
    p.add_argument("--logs", type=Path, help="where both sides write (default: a temporary directory)")
    p.add_argument("--out", type=Path, help="also write the table here")
    p.add_argument("--one", choices=["recipe"], help=argparse.SUPPRESS)
    args = p.parse_args()
    logs = args.logs or Path(tempfile.mkdtemp(prefix="medqa-recipe-"))
    logs.mkdir(parents=True, exist_ok=True)
    if args.one:  # the recipe side, in its own process: its result as the last line
        print(json.dumps(recipe(args, logs)))
        return
    results = {}
    for side in args.sides:
        if side in ("medqa", "medqa-one"):
            results[side] = medqa(args, logs, one_command=side == "medqa-one")
        else:
            log = logs / "recipe.log"
            start = time.perf_counter()
            with open(log, "w") as out:
                done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", "recipe", "--logs", str(logs)],
                                      cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if done.returncode != 0:
                raise SystemExit(f"the recipe failed (exit {done.returncode}); see {log}")
            results[side] = json.loads(log.read_text().strip().splitlines()[-1])
            results[side]["seconds"] = time.perf_counter() - start  # the process's start counts too
        print(f"{side}: {json.dumps(results[side])}", flush=True)
    text = table(results, args)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
