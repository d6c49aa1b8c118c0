"""What only a real model can check: SmolLM2-135M-Instruct (real weights, ChatML template)
on real PQA-L questions. The prompt and label words are right under a real chat template,
training moves the adapter, explanations are sentences, and the exported adapter and GGUF
file answer as the checkpoint does."""

import json
from pathlib import Path

import pytest
import torch

from medqa.bases import SMOLLM2
from medqa.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "smollm2.yaml")


@pytest.fixture(scope="module")
def pqal(pubmedqa_dir, smollm2) -> str:
    return str(pubmedqa_dir / "ori_pqal.json")


@pytest.fixture(scope="module")
def short_pqal(pqal, tmp_path_factory) -> str:
    """The 60 PQA-L records with the shortest abstracts, in the file's order: the official
    split's procedure gives them 27 training, 3 dev (one of each answer) and 30 test questions,
    each under 820 characters of abstract (the whole file's are up to 4,000)."""
    records = json.loads(Path(pqal).read_text())
    shortest = set(sorted(records, key=lambda k: len(" ".join(records[k]["CONTEXTS"])) + len(records[k]["QUESTION"]))[:60])
    path = tmp_path_factory.mktemp("pqal") / "ori_pqal_shortest60.json"
    path.write_text(json.dumps({k: v for k, v in records.items() if k in shortest}))
    return str(path)


def cli(command: str, *args: str, logs: Path, pqal: str):
    # float32, so plain transformers / peft reproduce medqa's probabilities to 1e-5
    return main([command, "--config", CONFIG, "--data.source", pqal, "--model.dtype", "float32",
                 "--trainer.logger.init_args.save_dir", str(logs), "--trainer.enable_progress_bar", "false", *args])


def test_label_words_and_prompt_under_the_chatml_template(pqal):
    from medqa.data import QADataModule

    dm = QADataModule(source=pqal, pretrained=SMOLLM2)
    dm.setup("test")
    tok = dm.formatter.tokenizer
    assert dm.answer_tokens["label_ids"] == [tok.encode(w, add_special_tokens=False) for w in ("Yes", "No", "Maybe")]
    assert all(len(ids) == 1 for ids in dm.answer_tokens["label_ids"])  # one token each: scored from one row
    example = dm.examples["test"][0]
    prompt = tok.decode(example.input_ids[: example.answer_pos])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "Answer with yes, no or maybe.<|im_end|>" in prompt
    answer = tok.decode(example.input_ids[example.answer_pos :])
    assert answer == ["Yes", "No", "Maybe"][example.label] + "<|im_end|>"  # the word, then the end of the turn
    assert example.labels[example.answer_pos :] == example.input_ids[example.answer_pos :]  # the loss covers both


@pytest.mark.slow
def test_the_untrained_model_puts_its_answer_on_the_label_words(pqal):
    """The real model, asked as medqa asks, answers with one of the three words as medqa
    writes them: they carry most of the next token's probability (the lower-case words had
    3-15%), so scoring over them reads its real answer."""
    from medqa.data import QADataModule
    from medqa.model import MedQALoRA
    from medqa.tokens import collate

    dm = QADataModule(source=pqal, pretrained=SMOLLM2)
    dm.setup("test")
    module = MedQALoRA(pretrained=SMOLLM2, backend="hf", load_in_4bit=False, dtype="float32",
                       gradient_checkpointing=False, answer_tokens=dm.answer_tokens)
    module.configure_model()
    batch = collate(dm.examples["test"][::100], dm.pad_id)  # 5 questions, of both labels' kinds
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"]).logits
    rows = logits[torch.arange(len(batch["ids"])), batch["answer_pos"] - 1].float().softmax(-1)
    words = [ids[0] for ids in dm.answer_tokens["label_ids"]]
    lower = [dm.formatter.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("yes", "no", "maybe")]
    mass, lower_mass = rows[:, words].sum(-1), rows[:, lower].sum(-1)
    assert mass.min() > 0.3 and mass.mean() > 3 * lower_mass.mean(), (mass, lower_mass)


@pytest.mark.slow
def test_fit_moves_the_adapter_and_exports_answer_as_the_checkpoint(short_pqal, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from medqa.backends import resolve_pretrained
    from medqa.data import QADataModule
    from medqa.tokens import collate

    # Two steps of 4 real PQA-L questions (no dev scoring: the predict below scores the dev set).
    fitted = cli("fit", "--trainer.max_steps", "2", "--trainer.limit_train_batches", "2", "--data.batch_size", "4",
                 "--trainer.limit_val_batches", "0", logs=tmp_path, pqal=short_pqal)
    last = Path(fitted.trainer.log_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert len(lora_b) == 210 and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: every one moved

    predicted = cli("predict", "--ckpt_path", str(last), "--data.predict_split", "dev", "--data.eval_batch_size", "8",
                    logs=tmp_path, pqal=short_pqal)  # all of it: predict refuses to write a partial answer set
    rows = {r["id"]: r for r in map(json.loads, (Path(predicted.trainer.log_dir) / "predictions.jsonl").open())}
    out = main(["export", "--ckpt_path", str(last), "--pretrained", SMOLLM2, "--out", str(tmp_path / "export"),
                "--gguf", "f16"])  # the merged model as GGUF (test_export checks --merged on the tiny model)
    gguf = out / "gguf" / "smollm2-135m-instruct-medqa-pubmedqa-f16.gguf"

    dm = QADataModule(source=short_pqal, pretrained=SMOLLM2)
    dm.setup("fit")
    dev = dm.examples["dev"]
    assert sorted(e.label for e in dev) == [0, 1, 2] and rows.keys() == {e.id for e in dev}
    batch = collate(dev, dm.pad_id)
    words = [ids[0] for ids in dm.answer_tokens["label_ids"]]
    base = AutoModelForCausalLM.from_pretrained(resolve_pretrained(SMOLLM2), dtype=torch.float32)
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    for model, close in ((PeftModel.from_pretrained(base, out), 2e-5), (from_gguf, 1e-2)):  # the GGUF's are float16
        with torch.no_grad():  # plain transformers: the whole forward, no medqa code
            logits = model.eval()(input_ids=batch["input_ids"]).logits
        probs = logits[torch.arange(len(dev)), batch["answer_pos"] - 1][:, words].float().softmax(-1)
        expected = torch.tensor([[rows[e.id][f"p_{w}"] for w in ("yes", "no", "maybe")] for e in dev])
        torch.testing.assert_close(probs, expected, atol=close, rtol=1e-4)
        assert [rows[e.id]["label"] for e in dev] == [("yes", "no", "maybe")[i] for i in probs.argmax(-1).tolist()]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields  # llama.cpp's tokenizer settings kept from SmolLM2's own file
    assert fields["tokenizer.ggml.pre"].contents() == "smollm" and fields["tokenizer.ggml.eos_token_id"].contents() == 2
    assert "TEMPLATE \"\"\"<|im_start|>system\n{{ .System }}<|im_end|>" in (out / "gguf" / "Modelfile").read_text()
    assert load_file(out / "adapter_model.safetensors").keys()  # the adapter's own file, not empty


@pytest.mark.slow
def test_a_real_model_explains_its_answer_in_words(pqal, capsys):
    record = json.dumps({"question": "Does regular aspirin use reduce the risk of colorectal cancer?",
                         "contexts": ["In a cohort of 80,000 adults followed for 20 years, regular aspirin users had "
                                      "a 25% lower incidence of colorectal cancer than non-users."]})
    import io
    import sys

    stdin = sys.stdin
    sys.stdin = io.StringIO(record)
    try:
        answer = main(["ask", "--config", CONFIG, "--record", "-", "--rationale_tokens", "40"])
    finally:
        sys.stdin = stdin
    text = answer["rationale"]
    words = [w for w in text.split() if w.strip(".,;:()").isalpha()]
    assert len(words) >= 3 and text.rstrip()[-1] in ".!?", text  # a sentence, ended by the model itself
    assert answer["decision"] in ("yes", "no", "maybe")
    first = text.strip().split()[0].strip(".,;:!").lower()
    assert first not in {"yes", "no", "maybe"} - {answer["decision"]}, text  # asked why its own decision holds
