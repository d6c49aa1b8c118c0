"""`python -m medqa export` for llama.cpp and Ollama (issue 41): GGUF files that medqa, given
them as a base, scores as it scored the adapter; an Ollama Modelfile; `--config` and
`--ckpt_path best|last` read as `test` reads them; and a card that names no path of the
machine that exported it, whose snippet runs after the folder is copied elsewhere."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import inprocess
from medqa.cli import main
from test_security import one_line_refusal

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
HUB_ID = "someone/pubmedqa-tiny"


def common(logs: Path) -> list[str]:
    return ["--config", DEMO, "--trainer.logger.init_args.save_dir", str(logs), "--trainer.enable_progress_bar", "false"]


def resolved(printed: str, which: str) -> str:
    """The checkpoint a command said `--ckpt_path best|last` stands for."""
    return re.search(rf"--ckpt_path {which} -> (\S+)", printed)[1]


@pytest.fixture(scope="module")
def exported(demo_fit, tmp_path_factory):
    """The demo's best checkpoint exported with both GGUF types, named by `--config` and
    `--ckpt_path best` as `test` names it."""
    logs, _, _ = demo_fit
    out = tmp_path_factory.mktemp("export") / "tiny-pubmedqa"
    done = inprocess.run(["export", *common(logs), "--ckpt_path", "best", "--gguf", "f16", "q8_0",
                          "--hub_id", HUB_ID, "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    return logs, out, done


def predictions(logs: Path, out: Path, *args: str) -> dict[str, dict]:
    main(["predict", *common(logs), "--data.predict_split", "test", "--predictions.output_dir", str(out), *args])
    return {r["id"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}


def test_gguf_files_score_back_as_the_adapter(exported, tmp_path):
    from gguf import GGUFReader

    logs, out, done = exported
    best = resolved(done.stdout + done.stderr, "best")
    ours = predictions(logs, tmp_path / "adapter", "--ckpt_path", best)
    accuracy = sum(r["label"] == r["truth"] for r in ours.values()) / len(ours)
    files = sorted((out / "gguf").glob("*.gguf"))
    assert [f.name for f in files] == ["tiny-llama-medqa-pubmedqa-f16.gguf", "tiny-llama-medqa-pubmedqa-q8_0.gguf"]
    for path, agree_at_least, close in zip(files, (0.995, 0.98), (1e-3, 2e-2)):
        theirs = predictions(logs, tmp_path / path.stem, "--model.pretrained", str(path))  # the file as a base, no adapter
        assert theirs.keys() == ours.keys() and len(ours) == 500
        agree = sum(theirs[i]["label"] == ours[i]["label"] for i in ours) / len(ours)
        assert agree >= agree_at_least, (path.name, agree)
        assert abs(sum(r["label"] == r["truth"] for r in theirs.values()) / len(theirs) - accuracy) <= 0.005
        gap = max(abs(theirs[i][f"p_{w}"] - ours[i][f"p_{w}"]) for i in ours for w in ("yes", "no", "maybe"))
        assert gap < close, (path.name, gap)

        fields = GGUFReader(path).fields
        assert fields["medqa.labels"].contents() == ["yes", "no", "maybe"]
        assert json.loads(fields["medqa.prompt"].contents())["labels"] == ["yes", "no", "maybe"]
        assert "<|start_header_id|>" in fields["tokenizer.chat_template"].contents()
        assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert files[1].stat().st_size < 0.6 * files[0].stat().st_size  # q8_0: 8.5 bits a weight against 16


def test_the_modelfile_asks_as_medqa_asked(exported):
    _, out, _ = exported
    prompt = json.loads((out / "medqa_prompt.json").read_text())
    modelfile = (out / "gguf" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny-llama-medqa-pubmedqa-f16.gguf\n")
    template = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.S)[1]
    assert template.index("{{ .System }}") < template.index("{{ .Prompt }}")
    assert template.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")  # the answer follows directly
    assert f'SYSTEM """{prompt["system_prompt"]}"""' in modelfile
    assert "PARAMETER temperature 0" in modelfile and 'PARAMETER stop "<|eot_id|>"' in modelfile


def test_k_quants_are_refused_in_one_line_naming_the_tool(demo_fit, tmp_path):
    logs, _, _ = demo_fit
    done = inprocess.run(["export", *common(logs), "--ckpt_path", "best", "--gguf", "q4_k_m", "--out", str(tmp_path / "o")])
    one_line_refusal(done, "export", "llama-quantize")
    assert not (tmp_path / "o").exists()


def test_export_reads_config_and_best_last_as_test_does(demo_fit, tmp_path):
    logs, run, _ = demo_fit
    for which in ("best", "last"):
        tested = inprocess.run(["test", *common(logs), "--ckpt_path", which, "--trainer.limit_test_batches", "1"])
        done = inprocess.run(["export", *common(logs), "--ckpt_path", which, "--out", str(tmp_path / which)])
        assert done.returncode == 0 and tested.returncode == 0, done.stderr[-3000:]
        assert resolved(done.stdout + done.stderr, which) == resolved(tested.stdout + tested.stderr, which)
    assert resolved(done.stdout + done.stderr, "last") == str(run / "checkpoints" / "last.ckpt")
    prompt = json.loads((tmp_path / "best" / "medqa_prompt.json").read_text())
    assert prompt["base_model"] == "builtin:tiny-llama"  # from --config, as test takes it

    empty = tmp_path / "no-runs"
    tested = inprocess.run(["test", *common(empty), "--ckpt_path", "best"])
    done = inprocess.run(["export", *common(empty), "--ckpt_path", "best"])
    assert done.returncode == tested.returncode == 1
    assert done.stderr.strip().splitlines()[-1].split("error: ", 1)[1] == \
        tested.stderr.strip().splitlines()[-1].split("error: ", 1)[1]


@pytest.mark.slow
def test_the_card_names_no_path_of_this_machine_and_its_snippet_runs_elsewhere(exported, tmp_path, capsys):
    from medqa.backends import resolve_pretrained

    logs, out, done = exported
    moved = shutil.copytree(out, tmp_path / "downloaded" / HUB_ID.split("/")[1])
    local = [str(ROOT), str(Path.home()), str(out), str(logs), resolve_pretrained("builtin:tiny-llama")]
    for path in moved.rglob("*"):
        if path.suffix in (".md", ".json", ".jinja", "") and path.is_file() and path.name != "medqa_config.yaml":
            written = path.read_text()
            assert not [p for p in local if p in written], path.name  # medqa_config.yaml is the run's own record
    card = (moved / "README.md").read_text()
    assert f"ADAPTER = '{HUB_ID}'" in card and f"hf upload {HUB_ID} ." in card and "BASE = 'PATH/TO/tiny-llama'" in card
    assert json.loads((moved / "adapter_config.json").read_text())["base_model_name_or_path"] == "builtin:tiny-llama"
    assert "ollama create" in card and "gguf/tiny-llama-medqa-pubmedqa-f16.gguf" in card
    said = re.search(r"ollama create (\S+) -f Modelfile", done.stdout)  # export's message and the card: one name
    assert said is not None and said.group(1) == re.search(r"ollama create (\S+) -f Modelfile", card).group(1)

    # As a user would: the snippet with its two placeholders filled in, the adapter from the copy.
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    snippet = snippet.replace(f"ADAPTER = '{HUB_ID}'", f"ADAPTER = {str(moved)!r}").replace(
        "BASE = 'PATH/TO/tiny-llama'", f"BASE = {resolve_pretrained('builtin:tiny-llama')!r}")
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    question, context = "Is the new drug safe for children?", "Adverse events were rare in both arms."
    theirs = namespace["ask"](question, [("", context)])
    ours = main(["ask", "--config", DEMO, "--ckpt_path", resolved(done.stdout + done.stderr, "best"),
                 "--question", question, "--context", context])
    capsys.readouterr()
    assert all(abs(theirs[w] - ours[f"p_{w}"]) < 1e-5 for w in ("yes", "no", "maybe")), (theirs, ours)


def test_llama_cpp_reads_the_file_as_transformers_does(exported):
    """Optional: where llama-cpp-python is installed (it builds llama.cpp from source), the f16
    file tokenizes a prompt into the same tokens and ranks the label words as transformers does."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python "
                                                         "builds llama.cpp; it is not in medqa's extras)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, _ = exported
    path = out / "gguf" / "tiny-llama-medqa-pubmedqa-f16.gguf"
    prompt = json.loads((out / "medqa_prompt.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    llm = llama_cpp.Llama(str(path), n_ctx=512, logits_all=True, verbose=False)
    words = [ids[0] for ids in prompt["label_token_ids"]]
    for text in ("Abstract:\nAdverse events were rare.\n\nQuestion: Is it safe?\n", "Does aspirin work? Yes, 25% fewer."):
        messages = [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": text}]
        chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(chat, add_special_tokens=False).input_ids
        assert llm.tokenize(chat.encode(), add_bos=False, special=True) == ids
        llm.reset()
        llm.eval(ids)
        theirs = torch.tensor(llm.scores[len(ids) - 1])[words]
        with torch.no_grad():
            ours = model(input_ids=torch.tensor([ids])).logits[0, -1, words]
        assert theirs.argmax() == ours.argmax()
        torch.testing.assert_close(theirs.softmax(-1), ours.softmax(-1), atol=2e-3, rtol=0)
