"""`python -m medqa export --ckpt_path CKPT --out DIR [--merged]`: take a trained adapter out
of medqa.

DIR gets the LoRA adapter in PEFT's format (`adapter_config.json` and
`adapter_model.safetensors`, loaded by `PeftModel.from_pretrained(base, DIR)` and by serving
engines that take LoRA adapters), the tokenizer, and `medqa_prompt.json`: how medqa builds
the prompt and scores the answer, so the adapter is used with the prompt it was trained on.
`--merged` also writes the base with the adapter merged in, in 16-bit, to DIR/merged.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from medqa import hints, prompts
from medqa.card import model_card
from medqa.priors import read_label_bias
from medqa.records import DataError
from medqa.results import write_json
from medqa.tasks import Task, get_task
from medqa.checkpoints import CheckpointError, load_checkpoint, save_adapter


SHAPE_SETTINGS = {"lora_r": int, "lora_alpha": int, "lora_dropout": float, "target_modules": list, "use_rslora": bool,
                  "lora_layers": int, "load_in_4bit": bool, "max_length": int}
"""What `export` takes from a checkpoint: the adapter's shape, checked for type. What decides
which code runs (the base model, backend, remote code, dtype) comes from the command line."""


def shape_settings(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    """The checkpoint's `SHAPE_SETTINGS`, each refused unless of its type."""
    hp, settings = checkpoint["hyper_parameters"], {}
    for key, kind in SHAPE_SETTINGS.items():
        if key not in hp or hp[key] is None:
            continue
        value = hp[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is list:
            ok = ok and all(isinstance(v, str) for v in value)
        if not ok:
            raise CheckpointError(f"{path}: saved setting {key}={value!r} is not of type {kind.__name__}")
        settings[key] = value
    return settings


def trained_prompt(checkpoint: dict[str, Any]) -> tuple[prompts.PromptSettings, Task, bool]:
    """The prompt settings the checkpoint was trained with (type-checked), its task, and
    whether it saved them; PubMedQA's built-in settings for a checkpoint from before they
    were saved."""
    from medqa.data import checkpoint_prompt

    saved = checkpoint_prompt(checkpoint)
    if saved is None:
        task = get_task("pubmedqa")
        return prompts.PromptSettings(task.name, task.system_prompt, task.instruction, task.labels), task, False
    saved = {"task": "pubmedqa", **saved} if isinstance(saved, dict) else {}
    name, system, instruction, labels = (saved.get(k) for k in ("task", "system", "instruction", "labels"))
    if not (isinstance(name, str) and isinstance(system, str) and isinstance(instruction, str)
            and isinstance(labels, list) and labels and all(isinstance(w, str) for w in labels)):
        raise CheckpointError("the checkpoint's saved prompt settings are not text (task, system, instruction, labels)")
    try:
        task = get_task(name)
    except DataError as e:
        raise CheckpointError(f"the checkpoint's saved task: {e}") from None
    return prompts.PromptSettings(name, system, instruction, tuple(labels)), task, True


def prompt_settings(checkpoint: dict[str, Any], tokenizer: Any, base_model: str,
                    label_bias: list[float] | None = None) -> dict[str, Any]:
    """Everything needed to ask the exported model a question the way medqa did."""
    from medqa.tokens import PromptFormat

    data = checkpoint.get("datamodule_hyper_parameters", {})
    target, max_length = data.get("target", "decision"), data.get("max_length", 1024)
    reasoning = data.get("reasoning", "required")
    if (target not in ("decision", "long_answer") or reasoning not in ("required", "free")
            or isinstance(max_length, bool) or not isinstance(max_length, int)):
        raise CheckpointError(f"saved data settings target={target!r}, reasoning={reasoning!r}, max_length={max_length!r} "
                              "are not 'decision' / 'long_answer', 'required' / 'free' and a whole number")
    settings, task, saved = trained_prompt(checkpoint)
    if label_bias is not None and len(label_bias) != len(settings.labels):
        raise ValueError(f"--label_bias: {len(label_bias)} numbers for the {len(settings.labels)} labels "
                            f"{', '.join(settings.labels)}")
    if not saved:
        print("Note: this checkpoint predates saved prompt settings; medqa_prompt.json shows today's built-in prompt")
    fmt = PromptFormat(tokenizer, target, max_length, task, settings, reasoning)
    example = fmt.encode(task.read("synthetic", None)[0])
    return {
        "task": task.name,
        "base_model": base_model,
        "target": fmt.target,
        "reasoning": fmt.reasoning,
        "max_length": fmt.max_length,
        "chat_template": fmt.chat,
        "system_prompt": settings.system,
        "instruction": settings.instruction,
        "labels": list(settings.labels),
        "prompt_saved_in_checkpoint": saved,
        "label_token_ids": fmt.label_token_ids(),
        "scoring": "softmax over the label words' log-probabilities at the answer position "
                   "(a word of several tokens scores the sum of its tokens'), each plus label_bias if set",
        "label_bias": label_bias,
        "example_prompt": tokenizer.decode(example.input_ids[: example.answer_pos]),
    }


def export(ckpt_path: Path, out: Path, pretrained: str, merged: bool = False, merged_dtype: str = "bfloat16",
           weights_only: bool = True, backend: str = "auto", trust_remote_code: bool = False,
           label_bias: list[float] | None = None) -> Path:
    """Write the adapter (and optionally the merged model) of `ckpt_path`, trained on the base
    `pretrained`, to `out`."""
    from medqa.backends import load_tokenizer, resolve_pretrained

    out = out.resolve() if out.is_symlink() else out  # a link to a folder: write into the folder, keep the link
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty folder; remove it or choose another directory")
    checkpoint = load_checkpoint(ckpt_path, weights_only)
    shape = shape_settings(checkpoint, ckpt_path)  # every check before the first write: a refusal leaves nothing
    trained_on = checkpoint["hyper_parameters"].get("pretrained")
    if isinstance(trained_on, str) and Path(trained_on.rstrip("/")).name != Path(pretrained.rstrip("/")).name:
        print(f"Note: {ckpt_path} was trained on {trained_on!r}; exporting against --pretrained {pretrained!r}"
              + (" (the merged model checks that the weights fit)" if merged else ""))
    tokenizer = load_tokenizer(pretrained, trust_remote_code)
    prompt = prompt_settings(checkpoint, tokenizer, pretrained, label_bias)

    # Written into a folder beside `out`, renamed to `out` once whole: a failure (a merged
    # model that does not fit, a full disk) leaves no half export.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        save_adapter(checkpoint, staging)
        tokenizer.save_pretrained(staging)
        write_json(staging / "medqa_prompt.json", prompt)
        run_config = ckpt_path.resolve().parent.parent / "config.yaml"
        if run_config.is_file():
            shutil.copyfile(run_config, staging / "medqa_config.yaml")
        card = model_card(checkpoint, ckpt_path, pretrained, resolve_pretrained(pretrained), out.resolve(), prompt)
        (staging / "README.md").write_text(card)
        if merged:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            answers = {"labels": prompt["labels"], "label_ids": prompt["label_token_ids"], "pad_id": pad,
                       "rationale_suffix": []}
            settings = {**shape, "pretrained": pretrained, "backend": backend, "trust_remote_code": trust_remote_code,
                        "answer_tokens": answers}
            _export_merged(checkpoint, settings, tokenizer, staging / "merged", merged_dtype)
        os.replace(staging, out)  # onto an empty folder too
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"Wrote the adapter of {ckpt_path} to {out} (PEFT format, tokenizer, medqa_prompt.json, a model card "
          "README.md with a transformers + peft snippet)")
    if merged:
        print(f"Wrote the merged {merged_dtype} model to {out / 'merged'}")
    print(f"Share it on the Hugging Face Hub: {hints.tool('hf')} auth login, then "
          f"{hints.tool('hf')} upload YOUR_NAME/REPO {hints.quote(str(out))} .")
    return out


def _export_merged(checkpoint: dict[str, Any], settings: dict[str, Any], tokenizer: Any, out: Path, dtype: str) -> None:
    from medqa.backends import resolve_backend, save_merged, saved_quantized
    from medqa.model import MedQALoRA

    backend = resolve_backend(settings["backend"])
    if backend == "unsloth" and saved_quantized(settings["pretrained"], settings["trust_remote_code"]):
        # Unsloth's 16-bit merge refuses a local base saved in 4-bit (seen on an H200): merge
        # into its dequantized weights instead, the ones the adapter was trained on.
        print(f"{settings['pretrained']} is saved in 4-bit: the adapter is merged into its dequantized "
              "weights (transformers + peft), the weights it was trained on")
        backend = "hf"
    if backend == "hf":
        # Merging into 4-bit weights would round the result to 4 bits again: merge into the
        # base in 16/32-bit (`dtype`) instead.
        settings.update(backend="hf", load_in_4bit=False, dtype=dtype)
    module = MedQALoRA(**settings)
    module.configure_model()
    module.on_load_checkpoint(checkpoint)  # refuses a checkpoint that does not fit, naming why
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    save_merged(module.model, tokenizer, out, backend, dtype)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m medqa export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", type=Path, required=True, help="a medqa checkpoint (.ckpt)")
    parser.add_argument("--pretrained", required=True,
                        help="the base model the checkpoint was trained on (hub id or local directory); "
                             "taken from you, never from the checkpoint")
    parser.add_argument("--backend", default="auto", choices=["auto", "unsloth", "hf"],
                        help="backend for --merged (auto: unsloth with CUDA, else transformers + peft)")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="let the base model's own Python code run (only for a model you trust)")
    parser.add_argument("--out", type=Path, help="directory to write (must not exist or be empty); default: "
                                                 "adapter-<checkpoint name> in the checkpoint's run directory")
    parser.add_argument("--merged", action="store_true", help="also write the merged 16-bit model to OUT/merged")
    parser.add_argument("--merged_dtype", default="bfloat16",
                        help="dtype of the merged model with the hf backend (bfloat16, float16, float32)")
    parser.add_argument("--weights_only", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                        help="load the checkpoint without unpickling code (default true)")
    parser.add_argument("--label_bias", type=Path,
                        help="a class-prior correction to ship with the adapter: the label_bias.yaml that "
                             "`priors` or `cv` wrote (written into medqa_prompt.json; the card's snippet applies it)")
    args = parser.parse_args(argv)
    out = args.out or args.ckpt_path.resolve().parent.parent / f"adapter-{args.ckpt_path.stem}"
    bias = None if args.label_bias is None else read_label_bias(args.label_bias)
    return export(args.ckpt_path, out, args.pretrained, args.merged, args.merged_dtype, args.weights_only,
                  args.backend, args.trust_remote_code, bias)
