"""The embedded default model: a tokenizer trained in-process on every task's synthetic set
and prompt text, and a tiny random Llama, made here, so the whole pipeline runs offline on a
CPU. `--model.pretrained builtin:tiny-llama` is built once by `tiny_llama()` into the medqa
cache directory and then loaded like any local model directory. The synthetic records
(`--data.source synthetic`) are each task's (`medqa.tasks`).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from medqa.tasks import get_task, task_names

TINY_LLAMA = "builtin:tiny-llama"
_VERSION = 3  # bump when the recipe below changes, so old caches are not reused

# Llama 3's special tokens and a chat template of the same shape as Llama 3.1 Instruct's.
BOS, EOS, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# The finding that decides the answer: the demo's answers can be read from the context.


def cache_dir() -> Path:
    """Where built-in models are kept: `$MEDQA_CACHE`, else `~/.cache/medqa`."""
    return Path(os.environ.get("MEDQA_CACHE", Path.home() / ".cache" / "medqa"))


def task_texts(synthetic: bool = True) -> list[str]:
    """Every task's prompt text and label words, and (`synthetic`) its synthetic records as
    the prompt shows them."""
    texts = ["Answer:"]
    for task in map(get_task, task_names()):
        texts += [task.system_prompt, task.instruction, *task.labels, *(f" {w}" for w in task.labels)]
        if synthetic:
            texts += [t for r in task.read("synthetic", None)
                      for t in (task.user_turn(r, task.passage(r), task.instruction), r.long_answer)]
    return texts


def train_tokenizer(texts: list[str] | None = None, vocab_size: int = 1024):
    """A byte-level BPE tokenizer with Llama 3's special tokens and chat template, trained
    in-process on `texts` (by default every task's, `task_texts`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = task_texts() if texts is None else [*task_texts(synthetic=False), *texts]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, EOT, PAD, HEADER_START, HEADER_END]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=PAD, additional_special_tokens=specials
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(out: Path) -> None:
    """Write a tiny random Llama (Llama 3.1's architecture, small sizes) and its tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Through the final norm, a random head this narrow cannot make any answer
        # confident, whatever LoRA learns; a wider one can.
        model.lm_head.weight.mul_(10)
    # Not model.save_pretrained: under DDP, transformers writes the weights from rank 0
    # only, and every process may be the one building the cache.
    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    tokenizer.save_pretrained(out)


@functools.cache
def _corpus_digest() -> str:
    """A digest of the tokenizer's training text: rendering every synthetic record takes a
    moment, and each model or tokenizer load asks for the directory."""
    return hashlib.sha256("\n".join(task_texts()).encode()).hexdigest()[:12]


def tiny_llama() -> Path:
    """The directory of the built-in tiny Llama, built on first use (a few seconds). Its
    name holds a digest of the tokenizer's training text, so a change to any task's prompt
    or synthetic set builds a new one instead of reusing a stale tokenizer."""
    from medqa.folders import build_once

    out = cache_dir() / f"tiny-llama-v{_VERSION}-{_corpus_digest()}"
    build_once(out, lambda folder: (folder / "model.safetensors").is_file(), build_tiny_llama, "built-in tiny Llama")
    return out
