"""The embedded default: a synthetic PubMedQA-shaped set, a tokenizer trained on it and
a tiny random Llama, all made here, so the whole pipeline runs offline on a CPU.

`--data.source synthetic` reads `synthetic_records()`; `--model.pretrained
builtin:tiny-llama` is built once by `tiny_llama()` into the medqa cache directory and then
loaded like any local model directory.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

from medqa.prompts import LABELS

TINY_LLAMA = "builtin:tiny-llama"
_VERSION = 2  # bump when the recipe below changes, so old caches are not reused

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

_DRUGS = ["metformin", "aspirin", "statin therapy", "vitamin D", "early mobilisation", "laparoscopy",
          "beta blockers", "home visits", "acupuncture", "omega-3 supplements", "antibiotic prophylaxis",
          "cognitive therapy", "tranexamic acid", "low-dose steroids", "telemonitoring"]
_OUTCOMES = ["mortality", "length of stay", "pain scores", "readmission", "wound infection",
             "blood pressure", "quality of life", "recurrence", "functional recovery", "glucose control"]
_GROUPS = ["elderly patients", "children", "pregnant women", "patients with diabetes",
           "smokers", "patients after surgery", "outpatients", "patients with heart failure"]
# The finding that decides the answer: the demo's answers can be read from the context.
_FINDINGS = {
    "yes": ["better", "improved", "superior"],
    "no": ["unchanged", "worse", "similar"],
    "maybe": ["inconclusive", "mixed", "uncertain"],
}
_CONCLUSIONS = {
    "yes": "{drug} improves {outcome} in {group}.",
    "no": "{drug} does not improve {outcome} in {group}.",
    "maybe": "The effect of {drug} on {outcome} in {group} remains uncertain.",
}


def synthetic_records(n: int = 1000, seed: int = 0):
    """`n` PubMedQA-shaped records, yes 45%, no 35%, maybe 20% (PQA-L has 55/34/11; more maybes let a tiny model learn them).

    Each abstract states its finding in the RESULTS section, so a model that reads the
    context can answer; the size matches PQA-L so the official split gives 500/450/50.
    """
    from medqa.data import Record

    rng = random.Random(seed)
    records = []
    for i in range(n):
        decision = rng.choices(LABELS, weights=(45, 35, 20))[0]
        drug, outcome, group = rng.choice(_DRUGS), rng.choice(_OUTCOMES), rng.choice(_GROUPS)
        size = rng.randint(40, 900)
        contexts = [
            f"The effect of {drug} on {outcome} in {group} is debated.",
            f"We studied {size} {group} in a randomised trial of {drug}.",
            f"Compared with usual care, {outcome} was {rng.choice(_FINDINGS[decision])} with {drug}.",
            f"Overall, the effect on {outcome} was {rng.choice(_FINDINGS[decision])}.",
        ]
        records.append(
            Record(
                id=str(10_000_000 + i),
                question=f"Does {drug} improve {outcome} in {group}?",
                contexts=contexts,
                context_labels=["BACKGROUND", "METHODS", "RESULTS", "RESULTS"],
                long_answer=_CONCLUSIONS[decision].format(drug=drug, outcome=outcome, group=group).capitalize(),
                decision=decision,
            )
        )
    return records


def cache_dir() -> Path:
    """Where built-in models are kept: `$MEDQA_CACHE`, else `~/.cache/medqa`."""
    return Path(os.environ.get("MEDQA_CACHE", Path.home() / ".cache" / "medqa"))


def train_tokenizer(texts: list[str] | None = None, vocab_size: int = 1024):
    """A byte-level BPE tokenizer with Llama 3's special tokens and chat template, trained
    in-process on `texts` (by default the synthetic set) and medqa's prompt text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from medqa import prompts

    corpus = [prompts.SYSTEM_PROMPT, prompts.INSTRUCTION, "Abstract:\nQuestion: Answer:"]
    corpus += list(LABELS) + [f" {w}" for w in LABELS]
    if texts is None:
        texts = []
        for r in synthetic_records():
            texts += [r.question, *r.contexts, r.long_answer, " ".join(r.context_labels)]
    corpus += texts

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


def tiny_llama() -> Path:
    """The directory of the built-in tiny Llama, built on first use (a few seconds)."""
    out = cache_dir() / f"tiny-llama-v{_VERSION}"
    if not (out / "model.safetensors").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=out.parent))
        build_tiny_llama(tmp)
        try:
            tmp.rename(out)  # atomic: another process may have built it meanwhile
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
