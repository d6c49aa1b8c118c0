"""Does a model learn in 4-bit as it does in 16-bit? One real model, the same batches, the
same plain training loop, through each loading path, each in its own process (Unsloth
patches transformers and peft on import).

    python benchmarks/quantization.py --data ori_pqal.json                 # CPU: the hf paths
    source .gpukit/activate.sh && python benchmarks/quantization.py --data .gpudata/ori_pqal.json \\
        --paths medqa-hf:16,medqa-hf:4,medqa-unsloth:16,medqa-unsloth:4,unsloth-alone:16,unsloth-alone:4

Paths (`NAME:BITS`, BITS 16 or 4):
  medqa-hf        medqa's `hf` backend (transformers + peft; bitsandbytes NF4 in 4-bit)
  medqa-unsloth   medqa's `unsloth` backend (FastLanguageModel; GPU only)
  unsloth-alone   FastLanguageModel + get_peft_model, its own forward and loss (GPU only)

For each path it reports what the base is (LoRA modules, the head tied to the embeddings,
whether either trains), how far its base is from the first path's (the mean next-token loss
over the prompts' text, and the KL divergence of its zero-shot yes/no/maybe probabilities),
the LoRA gradients' norm, the training loss, and the scores on the evaluation questions
before and after training. medqa's scoring reads every path (the label words' logits at the
answer position), so the paths differ only in how the model is loaded and trained.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import random
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _data(args):
    from medqa.data import QADataModule

    dm = QADataModule(source=args.data, pretrained=args.model, max_length=args.max_length, reasoning=args.reasoning, fold=args.fold,
                      batch_size=args.batch_size, bucket_batches=0)
    dm.setup("fit")
    dm.setup("test")
    return dm


def _load(name: str, bits: int, args, dm):
    """(PEFT model, its decoder stack, its output head) for one path."""
    from medqa.backends import decoder_and_head, load_unsloth
    from medqa.lora import LoraSettings
    from medqa.bases import resolve

    lora = LoraSettings(args.lora_r, args.lora_alpha)
    if name == "unsloth-alone":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(resolve(args.model), max_seq_length=args.max_length,
                                                     dtype=torch.bfloat16, load_in_4bit=bits == 4)
        model = FastLanguageModel.get_peft_model(model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0,
                                                 target_modules=lora.target_modules, bias="none",
                                                 use_gradient_checkpointing=False, random_state=args.seed)
        FastLanguageModel.for_training(model)
    elif name == "medqa-unsloth":
        model, _ = load_unsloth(args.model, args.max_length, bits == 4, "bfloat16", lora, False, args.seed, False)
    else:
        from medqa.backends import load_hf

        torch.manual_seed(args.seed)
        model, _ = load_hf(args.model, bits == 4, "bfloat16", lora, False, False)
    decoder, head = decoder_and_head(model)
    return model, decoder, head


def _facts(model, head) -> dict:
    base = model.get_base_model()
    embed = base.get_input_embeddings()
    q = base.model.layers[0].self_attn.q_proj
    return {
        "lora_modules": sum(1 for n, _ in model.named_modules() if n.endswith("lora_A")),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "embed_trains": embed.weight.requires_grad, "head_trains": head.weight.requires_grad,
        "head_tied": head.weight.data_ptr() == embed.weight.data_ptr(),
        "head": f"{type(head).__name__} {head.weight.dtype}",
        "q_proj_base": type(getattr(q, "base_layer", q)).__name__,
    }


def _evaluate(model, decoder, head, dm, examples, batch: int, device) -> dict:
    """Zero-shot or trained scores, the label log-probs, and the mean next-token loss over
    the prompts' text (how well the base still models the abstracts)."""
    import torch.nn.functional as F

    from medqa.evaluate import official_scores
    from medqa.metrics import label_log_probs
    from medqa.tokens import collate

    model.eval()
    logps, nll, count = [], 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            b = collate(examples[i : i + batch], dm.pad_id)
            ids = b["input_ids"].to(device)
            hidden = decoder(input_ids=ids, attention_mask=None, use_cache=False)[0]
            logps.append(label_log_probs(lambda x, m: decoder(input_ids=x, attention_mask=None, use_cache=False)[0],
                                         head, hidden, ids, b["answer_pos"].to(device), dm.answer_tokens["label_ids"],
                                         dm.pad_id).float().cpu())
            for row, e in enumerate(examples[i : i + batch]):  # the prompt's own tokens, not the answer
                n = e.answer_pos
                logits = head(hidden[row, : n - 1]).float()
                nll += F.cross_entropy(logits, ids[row, 1:n], reduction="sum").item()
                count += n - 1
    model.train()
    logp = torch.cat(logps)
    labels = dm.answer_tokens["labels"]
    pred = logp.argmax(-1).tolist()
    truth = [e.label for e in examples]
    scores = official_scores([labels[t] for t in truth], [labels[p] for p in pred], labels)
    return {"acc": scores["accuracy"], "macro_f1": scores["macro_f1"], "prompt_nll": nll / count,
            "predicted": {w: pred.count(i) for i, w in enumerate(labels)}, "logp": logp.tolist()}


def run_one(spec: str, args) -> dict:
    name, bits = spec.split(":")
    bits = int(bits)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name in ("unsloth-alone", "medqa-unsloth"):
        import unsloth  # noqa: F401  (before transformers and peft)
    torch.manual_seed(args.seed)
    dm = _data(args)
    model, decoder, head = _load(name, bits, args, dm)
    out = {"path": spec, **_facts(model, head)}
    test = dm.examples[args.eval_split]  # the official order groups questions by label: a sample, not a prefix
    evalset = test if args.eval_questions >= len(test) else random.Random(args.seed).sample(test, args.eval_questions)
    began = time.perf_counter()
    out["zero_shot"] = _evaluate(model, decoder, head, dm, evalset, args.eval_batch_size, device)
    out["eval_seconds"] = time.perf_counter() - began

    from medqa.metrics import answer_loss
    from medqa.schedules import WarmupCosine
    from medqa.tokens import collate

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = WarmupCosine(optimizer, warmup=0.05, total_steps=args.steps)
    train = dm.examples["train"]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    losses, norms = [], []
    began = time.perf_counter()
    for step in range(args.steps):
        at = (step * args.batch_size) % len(order)
        b = collate([train[i] for i in order[at : at + args.batch_size]], dm.pad_id)
        ids = b["input_ids"].to(device)
        if name == "unsloth-alone":  # Unsloth's own forward and loss over the answer tokens
            loss = model(input_ids=ids, labels=b["labels"].to(device)).loss
        else:
            hidden = decoder(input_ids=ids, attention_mask=None, use_cache=False)[0]
            loss = answer_loss(hidden, head, b["loss_pos"].to(device), b["loss_targets"].to(device))
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(params, 1.0).item())
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    out["train_seconds"] = time.perf_counter() - began
    out["losses"], out["grad_norms"] = losses, norms
    out["trained"] = _evaluate(model, decoder, head, dm, evalset, args.eval_batch_size, device)
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def table(results: list[dict], args) -> str:
    ref = torch.tensor(results[0]["zero_shot"]["logp"])
    rows = ["| path | LoRA modules | head tied / trains | base layer | prompt-text loss | zero-shot acc / F1 "
            "| KL to first path | LoRA grad norm, first 10 steps | train loss, first 10 / last 10 steps "
            "| trained acc / F1 | trained predictions |", "|" + "---|" * 11]
    for r in results:
        logp = torch.tensor(r["zero_shot"]["logp"])
        kl = (ref.exp() * (ref - logp)).sum(-1).mean().item()
        z, t = r["zero_shot"], r["trained"]
        rows.append(
            f"| {r['path']} | {r['lora_modules']} | {r['head_tied']} / {r['head_trains']} | {r['q_proj_base']} "
            f"| {z['prompt_nll']:.3f} | {z['acc']:.3f} / {z['macro_f1']:.3f} | {kl:.4f} | {_mean(r['grad_norms'][:10]):.3f} "
            f"| {_mean(r['losses'][:10]):.3f} / {_mean(r['losses'][-10:]):.3f} | {t['acc']:.3f} / {t['macro_f1']:.3f} "
            f"| {' / '.join(str(v) for v in t['predicted'].values())} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--data", required=True, help="ori_pqal.json")
    parser.add_argument("--paths", default="medqa-hf:16,medqa-hf:4")
    parser.add_argument("--reasoning", default="free", choices=["required", "free"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--lora_alpha", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--eval_questions", type=int, default=500, help="N of the 500 official test questions (a fixed sample)")
    parser.add_argument("--eval_batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fold", type=int, default=0, help="the official CV fold that is the dev set")
    parser.add_argument("--eval_split", default="test", choices=["test", "dev"])
    parser.add_argument("--out", help="write every path's results (losses, norms, log-probs) to this JSON file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)))
        return
    results = []
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    for spec in args.paths.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", spec]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{spec}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(lines[-1][len("RESULT "):]))
        r = results[-1]
        print(f"{spec}: evaluated in {r['eval_seconds']:.0f} s, trained {args.steps} steps in {r['train_seconds']:.0f} s",
              flush=True)
    if not results:
        sys.exit("no path ran")
    print(f"\n{args.model}, {card}; reasoning {args.reasoning}; {args.steps} steps of {args.batch_size}, lr {args.lr}, "
          f"LoRA r {args.lora_r}; {min(args.eval_questions, 500)} of the official test questions\n")
    print(table(results, args))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "card": card, "results": results}))


if __name__ == "__main__":
    main()
