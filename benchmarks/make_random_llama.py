"""Write a Llama with random weights, of a real model's shape, and a tokenizer trained here,
into a local directory, so the full-size path runs where no hub is reachable.

    python benchmarks/make_random_llama.py --shape 8b --out /tmp/llama-8b-random \
        --corpus ../shared/data/pubmedqa/ori_pqal.json

Random weights give real speed and memory figures, not accuracy. The tokenizer is a
byte-level BPE with Llama 3's special tokens and chat template, trained on the PubMedQA
text in `--corpus`, so prompt lengths are close to (a little above) Llama 3's.

`--nf4` (needs CUDA and bitsandbytes) writes the weights already quantized to NF4, as
`configs/lora.yaml`'s `unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit` holds them (double
quantization, bfloat16 compute), so loading times compare with the real run's; without it
the bf16 weights are quantized at every load.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

# Llama-3.1-8B and Llama-3.2-1B as in their config.json; `tiny` for a quick smoke test.
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, tie_word_embeddings=False),
}
ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def benchmark_tokenizer(corpus: Path | None, vocab_size: int = 32000):
    """The benchmarks' tokenizer: trained in-process on `corpus` (ori_pqal.json) and the label words."""
    from medqa.tasks.pubmedqa import read_file
    from medqa.tiny import train_tokenizer

    texts = None
    if corpus:
        texts = []
        for r in read_file(corpus):
            texts += [r.question, *r.contexts, r.long_answer, " ".join(r.context_labels)]
        # Llama 3 reads each label word, alone on the answer line, as one token; a tokenizer
        # trained on abstracts alone splits them there (yes -> y + es), and scoring then runs
        # one more forward pass a multi-token label: 3x the scoring time on an H200. Both cases:
        # lower case for the plain prompt, capitalised under a chat template.
        texts += ["yes", "no", "maybe", "Yes", "No", "Maybe"] * 2000
    return train_tokenizer(texts, vocab_size=vocab_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, help="ori_pqal.json (or any medqa source) to train the tokenizer on")
    parser.add_argument("--vocab_size", type=int, default=32000, help="tokenizer vocabulary (the model keeps 128,256 rows)")
    parser.add_argument("--nf4", action="store_true", help="write the weights pre-quantized to NF4 (CUDA)")
    args = parser.parse_args()
    if args.nf4 and not torch.cuda.is_available():
        raise SystemExit("--nf4 quantizes with bitsandbytes on a CUDA GPU; this machine has none")

    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    tokenizer = benchmark_tokenizer(args.corpus, args.vocab_size)
    config = LlamaConfig(
        vocab_size=max(128256, len(tokenizer)), max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=ROPE_SCALING, rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPES[args.shape],
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    if args.nf4:  # through a bf16 copy: bitsandbytes quantizes while loading
        from transformers import BitsAndBytesConfig

        staging = args.out.with_name(args.out.name + "-bf16")
        model.save_pretrained(staging)
        del model
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = LlamaForCausalLM.from_pretrained(staging, quantization_config=nf4, dtype=torch.bfloat16, device_map={"": 0})
        shutil.rmtree(staging)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}: {args.shape} shape, {n / 1e9:.2f}B parameters{' in NF4' if args.nf4 else ''}, tokenizer {len(tokenizer)} "
          f"tokens, {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
