"""Training steps of a model at SmolLM2-135M's shapes (random weights, the tiny tokenizer), in
a process of their own, printing one JSON line each: how much the resident memory rose at the
step's peak, and what the memory plan's probe says a kept layer holds per token.

    python tests/memory_step.py MODEL_DIR 2:2x889 all:1x512     # LoRA layers:questions x tokens
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from medqa.backends import decoder_and_head
from medqa.memory_cpu import adapted_layers, resident_bytes, saved_bytes_per_token
from medqa.model import MedQALoRA


def peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("steps", nargs="+", help="LORA_LAYERS:QUESTIONSxTOKENS, LORA_LAYERS a number or all")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for spec in args.steps:
        layers, shape = spec.split(":")
        batch, tokens = map(int, shape.split("x"))
        step(args.model, None if layers == "all" else int(layers), batch, tokens)


def step(model: str, lora_layers: int | None, questions: int, tokens: int) -> None:
    answers = {"labels": ["yes", "no", "maybe"], "label_ids": [[5], [6], [7]], "pad_id": 0,
               "rationale_suffix": [[8], [8], [8]]}
    module = MedQALoRA(pretrained=model, backend="hf", load_in_4bit=False, dtype="float32", lora_layers=lora_layers,
                       gradient_checkpointing=False, answer_tokens=answers)
    module.configure_model()
    module.model.train()
    decoder, _ = decoder_and_head(module.model)
    adapted = adapted_layers(module.model)
    per_token = saved_bytes_per_token(decoder.layers[adapted[0]], decoder.config.hidden_size, torch.float32,
                                      decoder.rotary_emb)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 900, (questions, tokens), generator=g)
    positions = torch.arange(questions) * tokens + tokens - 2
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_pos": positions,
             "loss_targets": torch.full((questions,), 5), "answer_pos": torch.full((questions,), tokens - 1)}
    with torch.no_grad():  # the weights are mapped from their file: read them in before measuring
        for p in module.parameters():
            p.sum()
    Path("/proc/self/clear_refs").write_text("5")
    before = resident_bytes()
    loss, _ = module._loss(batch)
    loss.backward()
    print(json.dumps({"peak_rise": peak() - before, "per_token": per_token, "adapted": len(adapted),
                      "tokens": questions * tokens, "frozen": module.frozen is not None}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
