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
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from medqa import hints, prompts
from medqa.card import model_card, ollama_name
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


def export(ckpt_path: Path, out: Path, pretrained: str, merged: bool = False, merged_dtype: str | None = None,
           weights_only: bool = True, backend: str = "auto", trust_remote_code: bool = False,
           label_bias: list[float] | None = None, gguf: tuple[str, ...] = (), hub_id: str | None = None) -> Path:
    """Write the adapter (and optionally the merged model, and GGUF files of it) of
    `ckpt_path`, trained on the base `pretrained`, to `out`."""
    from medqa.backends import load_tokenizer
    from medqa.bases import base_reference
    from medqa.gguf_out import check_type

    out = out.resolve() if out.is_symlink() else out  # a link to a folder: write into the folder, keep the link
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty folder; remove it or choose another directory")
    if hub_id is not None and not HUB_ID.fullmatch(hub_id):
        raise ValueError(f"--hub_id {hub_id!r}: expected NAME/REPO, the Hugging Face repository to upload to")
    gguf = tuple(dict.fromkeys(check_type(kind) for kind in gguf))
    checkpoint = load_checkpoint(ckpt_path, weights_only)
    shape = shape_settings(checkpoint, ckpt_path)  # every check before the first write: a refusal leaves nothing
    trained_on = checkpoint["hyper_parameters"].get("pretrained")
    if isinstance(trained_on, str) and Path(trained_on.rstrip("/")).name != Path(pretrained.rstrip("/")).name:
        print(f"Note: {ckpt_path} was trained on {trained_on!r}; exporting against --model.pretrained {pretrained!r}"
              + (" (the merged model checks that the weights fit)" if merged or gguf else ""))
    base = base_reference(pretrained)
    tokenizer = load_tokenizer(pretrained, trust_remote_code)
    prompt = prompt_settings(checkpoint, tokenizer, base["name"], label_bias)

    # Written into a folder beside `out`, renamed to `out` once whole: a failure (a merged
    # model that does not fit, a full disk) leaves no half export.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        save_adapter(checkpoint, staging)
        _name_base(staging / "adapter_config.json", base["name"])  # not this machine's path to it
        tokenizer.save_pretrained(staging)
        write_json(staging / "medqa_prompt.json", prompt)
        run_config = ckpt_path.resolve().parent.parent / "config.yaml"
        if run_config.is_file():
            shutil.copyfile(run_config, staging / "medqa_config.yaml")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        settings = {**shape, "pretrained": pretrained, "backend": backend, "trust_remote_code": trust_remote_code,
                    "answer_tokens": {"labels": prompt["labels"], "label_ids": prompt["label_token_ids"], "pad_id": pad,
                                      "rationale_suffix": []}}
        if merged:
            _export_merged(checkpoint, dict(settings), tokenizer, staging / "merged", merged_dtype or "bfloat16")
        written = _export_gguf(checkpoint, dict(settings), tokenizer, staging / "gguf", gguf,
                               merged_dtype or "float32", prompt, base) if gguf else []
        card = model_card(checkpoint, ckpt_path, base, prompt, hub_id, written)
        (staging / "README.md").write_text(card)
        os.replace(staging, out)  # onto an empty folder too
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"Wrote the adapter of {ckpt_path} to {out} (PEFT format, tokenizer, medqa_prompt.json, a model card "
          "README.md with a transformers + peft snippet)")
    if merged:
        print(f"Wrote the merged {merged_dtype or 'bfloat16'} model to {out / 'merged'}")
    for name in written:
        print(f"Wrote {out / name}" + (" and an Ollama Modelfile beside it (FROM the first GGUF file): "
                                       f"cd {hints.quote(str(out / 'gguf'))} && ollama create {ollama_name(prompt)} -f Modelfile"
                                       if name == written[0] else ""))
    print(f"Share it on the Hugging Face Hub: {hints.tool('hf')} auth login, then "
          f"{hints.tool('hf')} upload {hub_id or 'YOUR_NAME/REPO'} {hints.quote(str(out))} ."
          + ("" if hub_id else " (export --hub_id NAME/REPO writes that name into the card)"))
    return out


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def _name_base(config_file: Path, name: str) -> None:
    """PEFT's adapter_config.json names the base by how this run loaded it, a local path
    maybe: name it as the card does."""
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


def _trained_module(checkpoint: dict[str, Any], settings: dict[str, Any]) -> Any:
    """The base with the checkpoint's adapter, built from `settings` (the user's base and backend,
    the checkpoint's LoRA shape); refuses a checkpoint that does not fit, naming why."""
    from medqa.model import MedQALoRA

    module = MedQALoRA(**settings)
    module.configure_model()
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    return module


def _export_merged(checkpoint: dict[str, Any], settings: dict[str, Any], tokenizer: Any, out: Path, dtype: str) -> None:
    from medqa.backends import resolve_backend, save_merged, saved_quantized

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
    save_merged(_trained_module(checkpoint, settings).model, tokenizer, out, backend, dtype)


def _export_gguf(checkpoint: dict[str, Any], settings: dict[str, Any], tokenizer: Any, out: Path, kinds: tuple[str, ...],
                 dtype: str, prompt: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """The merged model as one GGUF file per type in `out`, and a Modelfile for the first.
    Returns the files' paths in the export. Not beside the adapter: transformers reads a folder
    with an adapter_config.json as an adapter, even when told to read a GGUF file in it."""
    from medqa.gguf_out import modelfile, source_fields, write_gguf

    settings.update(backend="hf", load_in_4bit=False, dtype=dtype)  # merged into 16/32-bit weights, as --merged
    merged = _trained_module(checkpoint, settings).model.merge_and_unload()
    source = source_fields(settings["pretrained"])
    stem = Path(base["name"].split("/")[-1]).stem.removeprefix("builtin:")
    out.mkdir()
    names = []
    for kind in kinds:
        name = f"{stem}-medqa-{prompt['task']}-{kind}.gguf"
        write_gguf(merged, tokenizer, out / name, kind, prompt, f"{stem} medqa {prompt['task']}", source)
        names.append(f"{out.name}/{name}")
    (out / "Modelfile").write_text(modelfile(Path(names[0]).name, tokenizer, prompt))
    return names


OWN_FLAGS = {"--pretrained": "--model.pretrained", "--backend": "--model.backend"}
"""export's flags from before it read configs, and the model settings they now stand for."""


def renamed(arg: str) -> str:
    """`--pretrained X` and `--pretrained=X` as `--model.pretrained`; other arguments as given."""
    flag, eq, value = arg.partition("=")
    return OWN_FLAGS.get(flag, flag) + eq + value


def main(argv: list[str] | None = None) -> Path:
    from medqa.cli import cli_for
    from medqa.model import SettingsError

    parser = argparse.ArgumentParser(
        prog="python -m medqa export", description=__doc__.split("\n\n")[0],
        epilog="Every other option is predict's, read the same way: --config CONFIG gives the base model "
               "(--model.pretrained) and the run folders that --ckpt_path best|last are resolved in.")
    parser.add_argument("--ckpt_path", required=True,
                        help="a medqa checkpoint (.ckpt), or best / last as for test and predict")
    parser.add_argument("--out", type=Path, help="directory to write (must not exist or be empty); default: "
                                                 "adapter-<checkpoint name> in the checkpoint's run directory")
    parser.add_argument("--merged", action="store_true", help="also write the merged 16-bit model to OUT/merged")
    parser.add_argument("--merged_dtype", help="dtype the adapter is merged in on the transformers backend: bfloat16 "
                                               "(the default for --merged), float16, float32 (the default for --gguf)")
    parser.add_argument("--gguf", nargs="+", default=[], metavar="TYPE",
                        help="also write the merged model as GGUF files (f16, q8_0) for llama.cpp, Ollama and LM "
                             "Studio, with an Ollama Modelfile")
    parser.add_argument("--hub_id", help="the Hugging Face repository NAME/REPO the folder will be uploaded to; "
                                         "the card's snippet loads the adapter from it (default: YOUR_NAME/REPO)")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="let the base model's own Python code run (only for a model you trust)")
    parser.add_argument("--label_bias", type=Path,
                        help="a class-prior correction to ship with the adapter: the label_bias.yaml that "
                             "`priors` or `cv` wrote (written into medqa_prompt.json; the card's snippet applies it)")
    args, rest = parser.parse_known_args(argv)
    rest = [renamed(a) for a in rest]
    if args.trust_remote_code:
        rest += ["--model.trust_remote_code", "true"]
    # best / last are resolved as predict resolves them; a path is read by `export` alone, which
    # checks it before writing anything (predict would also repair the adapter folder beside it)
    named = args.ckpt_path in ("best", "last")
    cli, ckpt_path = cli_for("predict", [*rest, *(["--ckpt_path", args.ckpt_path] if named else [])])
    model, weights_only = cli.model, cli.config.predict.weights_only
    ckpt = Path(ckpt_path if named else args.ckpt_path)
    out = args.out or ckpt.resolve().parent.parent / f"adapter-{ckpt.stem}"
    if model.ensemble_dir is not None:
        raise CheckpointError(f"--model.ensemble {model.ensemble_dir}: export writes one adapter and an ensemble is "
                              "cv's ten; export one fold's best checkpoint (--ckpt_path CV_DIR/foldK/fit-0/checkpoints/"
                              "best-....ckpt), and score the ensemble with test, predict or ask")
    # The correction a user scores with (`--config label_bias.yaml`) ships as they scored; `--label_bias FILE` likewise
    configured = model.hparams.get("label_bias")
    configured = None if configured is None else [float(x) for x in configured]
    bias = None if args.label_bias is None else read_label_bias(args.label_bias)
    if bias is not None and configured is not None and bias != configured:
        raise SettingsError(f"--label_bias {args.label_bias} gives {bias} and the settings give --model.label_bias "
                            f"{configured}: name one")
    bias = bias if bias is not None else configured
    return export(ckpt, out, model.pretrained, args.merged, args.merged_dtype, weights_only, model.backend,
                  model.trust_remote_code, bias, tuple(args.gguf), args.hub_id)
