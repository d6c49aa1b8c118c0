"""fit, validate, test, predict and resume through the CLI on the tiny model (CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medqa.backends import BackendError
from medqa.cli import main
from medqa.tasks.pubmedqa import official_split
from medqa.tasks.pubmedqa import synthetic_records
from medqa.model import CheckpointMismatch
from medqa.speed import SpeedMonitor

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


def cli(*args: str, logs: Path):
    return main([args[0], "--config", DEMO, "--trainer.logger.init_args.save_dir", str(logs),
                 "--trainer.enable_progress_bar", "false", *args[1:]])


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def demo_run(demo_fit):
    """The README's demo, exactly as configured, trained once (conftest's `demo_fit`)."""
    logs, run, _ = demo_fit
    return logs, run


@pytest.mark.slow
def test_demo_learns_and_leaves_curves(demo_run):
    _, run = demo_run
    curves = scalars(run)
    assert {"train/loss", "val/acc", "val/macro_f1", "val/loss", "val/f1_maybe", "val/ece"} <= set(curves)
    assert curves["val/acc"][-1][1] >= 0.9
    assert curves["train/loss"][-1][1] < curves["train/loss"][0][1] / 5
    assert 0 <= curves["val/ece"][-1][1] < 0.05  # well calibrated once trained (it may be from the first epoch on)
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("val/confusion_matrix")
    assert len(images) == len(curves["val/acc"]) and images[-1].encoded_image_string.startswith(b"\x89PNG")
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")  # runs compare in HPARAMS


def test_checkpoints_hold_only_the_adapter(demo_run):
    _, run = demo_run
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    assert {p.name.startswith("best") for p in ckpts} == {True, False}  # best and last
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)
    keys = set(state["state_dict"])
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys)
    assert "optimizer_states" in state and "lr_schedulers" in state and state["global_step"] > 0
    base = sum(v.numel() for k, v in state["state_dict"].items())
    assert base < 50_000  # the LoRA weights alone; the tiny base has ~230k parameters


@pytest.mark.slow
def test_validate_test_and_predict_from_the_checkpoint(demo_run, tmp_path):
    logs, run = demo_run
    best = next((run / "checkpoints").glob("best*.ckpt"))
    validated = cli("validate", "--ckpt_path", str(best), logs=tmp_path)
    assert validated.trainer.callback_metrics["val/acc"] >= 0.9

    tested = cli("test", "--ckpt_path", str(best), logs=tmp_path)
    assert tested.trainer.callback_metrics["test/acc"] >= 0.9

    predicted = cli("predict", "--ckpt_path", str(best), logs=tmp_path)
    out = Path(predicted.trainer.log_dir)
    assert not list(out.glob("events.out.tfevents.*"))  # no curves: no empty run for TensorBoard to list
    assert list(Path(tested.trainer.log_dir).glob("events.out.tfevents.*"))  # test's scores are kept
    answers = json.loads((out / "predictions.json").read_text())
    test_set = official_split(synthetic_records())["test"]
    assert list(answers) == [r.id for r in test_set]
    assert set(answers.values()) <= {"yes", "no", "maybe"}
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(test_set)
    assert all(abs(r["p_yes"] + r["p_no"] + r["p_maybe"] - 1) < 1e-4 for r in rows)
    correct = sum(answers[r.id] == r.decision for r in test_set) / len(test_set)
    assert correct == pytest.approx(float(tested.trainer.callback_metrics["test/acc"]), abs=1e-6)
    for done in (tested, predicted):  # each says how long its scoring took, of every question
        scoring = next(c for c in done.trainer.callbacks if isinstance(c, SpeedMonitor)).scoring
        assert scoring["questions"] == len(test_set) and scoring["seconds"] > 0 and scoring["loading_seconds"] > 0
        assert json.loads((Path(done.trainer.log_dir) / "speed.json").read_text())["scoring"] == scoring
        assert scoring["tokens"] == sum(len(e.input_ids) for e in done.datamodule.examples["test"])


@pytest.mark.slow
def test_fit_can_score_the_test_split_in_the_same_process(tmp_path, capsys):
    """`fit --test_after_fit last`: the scores a separate `test` of the last checkpoint gives,
    in the run's metrics.json, and the scoring time beside the fit's figures."""
    trained = cli("fit", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4", "--test_after_fit", "last",
                  logs=tmp_path / "one")
    run = Path(trained.trainer.log_dir)
    last = run / "checkpoints" / "last.ckpt"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(last)
    out = capsys.readouterr().out
    assert " -m medqa predict " in out and " -m medqa test " not in out  # the test is done: not suggested
    tested = cli("test", "--ckpt_path", str(last), logs=tmp_path / "two")
    for key in ("test/acc", "test/macro_f1", "test/loss", "test/ece"):
        assert metrics[key] == pytest.approx(float(tested.trainer.callback_metrics[key]), abs=1e-6), key
    speed = json.loads((run / "speed.json").read_text())
    assert speed["fit_seconds"] > 0 and speed["tokens"] > 0  # the fit's figures are kept
    assert speed["scoring"]["questions"] == len(tested.datamodule.examples["test"])
    with pytest.raises(SystemExit):  # a fit option only
        cli("test", "--test_after_fit", "last", logs=tmp_path / "three")


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(r) for r in (run_dir / "predictions.jsonl").read_text().splitlines()]


@torch.no_grad()
def assert_same_answers(model, rows: list[dict], tokenizer_dir: str | None = None) -> None:
    """A plain transformers / peft model, prompted and scored by hand, gives the
    probabilities medqa's predict wrote."""
    from medqa.backends import load_tokenizer
    from medqa.tokens import PromptFormat

    fmt = PromptFormat(load_tokenizer(tokenizer_dir or "builtin:tiny-llama"), "decision", 512)
    dev = {r.id: r for r in official_split(synthetic_records())["dev"]}
    model.eval()
    for row in rows[:12]:
        ex = fmt.encode(dev[row["id"]])
        prompt = ex.input_ids[: ex.answer_pos]
        scores = []
        for word in fmt.label_token_ids():
            logp = model(torch.tensor([prompt + word])).logits[0].float().log_softmax(-1)
            scores.append(sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(word)))
        probs = torch.stack(scores).softmax(-1)
        torch.testing.assert_close(probs, torch.tensor([row["p_yes"], row["p_no"], row["p_maybe"]]), atol=1e-5, rtol=1e-4)


def test_checkpoint_adapter_loads_with_plain_peft_and_gives_the_same_answers(demo_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from medqa.backends import resolve_pretrained

    _, run = demo_run
    best = next((run / "checkpoints").glob("best*.ckpt"))
    adapter = best.with_suffix(".adapter")
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert len(list((run / "checkpoints").glob("*.adapter"))) == 2  # best and last, no stale ones

    predicted = cli("predict", "--ckpt_path", str(best), "--data.predict_split", "dev", logs=tmp_path)
    base = AutoModelForCausalLM.from_pretrained(resolve_pretrained("builtin:tiny-llama"), dtype=torch.float32)
    assert_same_answers(PeftModel.from_pretrained(base, adapter), read_rows(Path(predicted.trainer.log_dir)))


def test_export_round_trip_adapter_and_merged_model(demo_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from medqa.backends import resolve_pretrained

    _, run = demo_run
    best = next((run / "checkpoints").glob("best*.ckpt"))
    rows = read_rows(Path(cli("predict", "--ckpt_path", str(best), "--data.predict_split", "dev",
                              logs=tmp_path).trainer.log_dir))

    out = main(["export", "--ckpt_path", str(best), "--pretrained", "builtin:tiny-llama", "--out",
                str(tmp_path / "export"), "--merged", "--merged_dtype", "float32"])
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "medqa_prompt.json",
            "merged"} <= {p.name for p in out.iterdir()}
    prompt = json.loads((out / "medqa_prompt.json").read_text())
    assert prompt["target"] == "decision" and prompt["labels"] == ["yes", "no", "maybe"]

    base = AutoModelForCausalLM.from_pretrained(resolve_pretrained("builtin:tiny-llama"), dtype=torch.float32)
    assert_same_answers(PeftModel.from_pretrained(base, out), rows, tokenizer_dir=str(out))
    assert_same_answers(AutoModelForCausalLM.from_pretrained(out / "merged"), rows, tokenizer_dir=str(out / "merged"))

    # The default merged model is 16-bit; and nothing the user has is overwritten.
    out16 = main(["export", "--ckpt_path", str(best), "--pretrained", "builtin:tiny-llama", "--out",
                  str(tmp_path / "export16"), "--merged"])
    assert AutoModelForCausalLM.from_pretrained(out16 / "merged").dtype == torch.bfloat16
    with pytest.raises(FileExistsError, match="exists and is not an empty folder"):
        main(["export", "--ckpt_path", str(best), "--pretrained", "builtin:tiny-llama", "--out", str(out)])


def filled_in(card: str, adapter: Path) -> str:
    """The card's snippet with its two placeholders filled in as a user would: the adapter's
    folder, and the tiny Llama's (a base without a Hub id)."""
    from medqa.backends import resolve_pretrained

    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert "ADAPTER = 'YOUR_NAME/REPO'" in snippet and "BASE = 'PATH/TO/tiny-llama'" in snippet
    return snippet.replace("ADAPTER = 'YOUR_NAME/REPO'", f"ADAPTER = {str(adapter)!r}").replace(
        "BASE = 'PATH/TO/tiny-llama'", f"BASE = {resolve_pretrained('builtin:tiny-llama')!r}")


@pytest.mark.slow
def test_the_exported_model_card_snippet_scores_as_medqa_does(demo_run, tmp_path, capsys):
    """The card's transformers + peft snippet, run as written, gives `ask`'s probabilities;
    the card names the base, data and the test scores measured with that checkpoint."""
    import re

    logs, run = demo_run
    best = next((run / "checkpoints").glob("best*.ckpt"))
    cli("test", "--ckpt_path", str(best), logs=logs)  # a score for the card to find
    out = main(["export", "--ckpt_path", str(best), "--pretrained", "builtin:tiny-llama"])
    assert out == run / f"adapter-{best.stem}"  # the default: beside its run
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n")  # base_model names a Hub id; the tiny Llama has none
    assert "| data | `synthetic`, task `pubmedqa`, dev fold `0`" in card and (out / "medqa_config.yaml").is_file()
    assert re.search(r"\| `test/macro_f1` \| \d\.\d{4} \| `test-\d+` \|", card)
    namespace: dict = {}
    exec(compile(filled_in(card, out), "README.md", "exec"), namespace)  # as a user would paste it
    question, sections = "Is the new drug safe for children?", [("", "Adverse events were rare in both arms.")]
    theirs = namespace["ask"](question, sections)
    ours = main(["ask", "--config", DEMO, "--ckpt_path", str(best), "--question", question,
                 "--context", "Adverse events were rare in both arms."])
    capsys.readouterr()
    assert ours["decision"] == max(theirs, key=theirs.get)
    assert all(abs(theirs[w] - ours[f"p_{w}"]) < 1e-5 for w in ("yes", "no", "maybe")), (theirs, ours)

    # A class-prior correction (`priors`' config) shipped with the adapter: the snippet applies it as ask does.
    plain = ours
    bias = tmp_path / "label_bias.yaml"
    bias.write_text("model:\n  label_bias: [0.0, 0.7, 2.5]\n")
    corrected = main(["export", "--ckpt_path", str(best), "--pretrained", "builtin:tiny-llama", "--out",
                      str(tmp_path / "corrected"), "--label_bias", str(bias)])
    assert json.loads((corrected / "medqa_prompt.json").read_text())["label_bias"] == [0.0, 0.7, 2.5]
    exec(compile(filled_in((corrected / "README.md").read_text(), corrected), "README.md", "exec"), namespace)
    theirs = namespace["ask"](question, sections)
    ours = main(["ask", "--config", DEMO, "--config", str(bias), "--ckpt_path", str(best), "--question", question,
                 "--context", "Adverse events were rare in both arms."])
    capsys.readouterr()
    assert all(abs(theirs[w] - ours[f"p_{w}"]) < 1e-5 for w in ("yes", "no", "maybe")), (theirs, ours)
    assert ours["p_maybe"] > plain["p_maybe"] and ours["p_yes"] < plain["p_yes"]  # moved as the bias says

    # The bias in the settings (`--config label_bias.yaml`, as test and ask took it) ships too; two that differ are refused.
    configured = main(["export", "--ckpt_path", str(best), "--pretrained", "builtin:tiny-llama", "--config", str(bias),
                       "--out", str(tmp_path / "configured")])
    assert json.loads((configured / "medqa_prompt.json").read_text())["label_bias"] == [0.0, 0.7, 2.5]
    other = tmp_path / "other_bias.yaml"
    other.write_text("model:\n  label_bias: [0.0, 0.0, 1.0]\n")
    from medqa.model import SettingsError

    with pytest.raises(SettingsError, match="name one"):
        main(["export", "--ckpt_path", str(best), "--pretrained", "builtin:tiny-llama", "--config", str(bias),
              "--label_bias", str(other), "--out", str(tmp_path / "both")])
    assert not (tmp_path / "both").exists()


def test_export_knows_a_base_saved_in_4bit_from_its_config(tmp_path):
    # `export --merged` sends such a base to the transformers merge (Unsloth's refuses it).
    from transformers import AutoConfig

    from medqa.backends import resolve_pretrained, saved_quantized

    config = AutoConfig.from_pretrained(resolve_pretrained("builtin:tiny-llama"))
    config.save_pretrained(tmp_path / "plain")
    assert not saved_quantized(str(tmp_path / "plain"), trust_remote_code=False)

    saved = json.loads((tmp_path / "plain" / "config.json").read_text())
    saved["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                    "bnb_4bit_quant_type": "nf4"}
    (tmp_path / "nf4").mkdir()
    (tmp_path / "nf4" / "config.json").write_text(json.dumps(saved))
    assert saved_quantized(str(tmp_path / "nf4"), trust_remote_code=False)

    with pytest.raises(BackendError, match="no-such-org/no-such-llama"):
        saved_quantized("no-such-org/no-such-llama", trust_remote_code=False)


@pytest.mark.slow
def test_evaluate_agrees_with_scikit_learn_on_demo_predictions(demo_run, tmp_path):
    from sklearn.metrics import accuracy_score, f1_score

    from medqa.evaluate import EvaluationError

    _, run = demo_run
    predicted = cli("predict", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), logs=tmp_path)
    path = Path(predicted.trainer.log_dir) / "predictions.json"
    answers = json.loads(path.read_text())
    truth = {r.id: r.decision for r in official_split(synthetic_records())["test"]}
    scores = main(["evaluate", str(path), "--source", "synthetic", "--out", str(tmp_path / "scores.json")])
    ids = list(truth)
    assert scores["accuracy"] == pytest.approx(accuracy_score([truth[i] for i in ids], [answers[i] for i in ids]))
    assert scores["macro_f1"] == pytest.approx(
        f1_score([truth[i] for i in ids], [answers[i] for i in ids], average="macro"))
    assert json.loads((tmp_path / "scores.json").read_text())["questions"] == 500

    missing, extra = dict(answers), dict(answers)
    del missing[ids[0]]
    extra["99999999"] = "yes"
    for name, bad, message in [("missing", missing, f"1 test questions have no answer \\(e.g. {ids[0]}\\)"),
                               ("extra", extra, "1 answers are for questions not in the test set \\(e.g. 99999999\\)")]:
        (tmp_path / f"{name}.json").write_text(json.dumps(bad))
        with pytest.raises(EvaluationError, match=message):
            main(["evaluate", str(tmp_path / f"{name}.json"), "--source", "synthetic"])


@pytest.mark.slow
def test_predict_can_add_a_generated_rationale(demo_run, tmp_path):
    _, run = demo_run
    last = str(run / "checkpoints" / "last.ckpt")
    plain = read_rows(Path(cli("predict", "--ckpt_path", last, "--data.predict_split", "dev", logs=tmp_path).trainer.log_dir))
    explained = read_rows(Path(cli("predict", "--ckpt_path", last, "--data.predict_split", "dev", "--generate_rationale",
                                   "true", "--rationale_tokens", "6", logs=tmp_path).trainer.log_dir))
    assert all("rationale" not in r for r in plain)
    assert all(isinstance(r["rationale"], str) for r in explained)
    # The scored decision comes first and is not changed by the explanation.
    assert [{k: v for k, v in r.items() if k != "rationale"} for r in explained] == plain


@pytest.mark.slow
def test_zero_shot_test_without_a_checkpoint(tmp_path):
    tested = cli("test", logs=tmp_path)
    assert 0.0 <= float(tested.trainer.callback_metrics["test/acc"]) < 0.9  # the untrained base


@pytest.mark.slow
def test_predict_on_the_real_pqal_file_covers_the_official_test_set(demo_run, tmp_path, pubmedqa_dir):
    _, run = demo_run
    predicted = cli("predict", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),  # passages cut: a third of the work
                    "--data.source", str(pubmedqa_dir / "ori_pqal.json"), "--data.max_length", "256", logs=tmp_path)
    answers = json.loads((Path(predicted.trainer.log_dir) / "predictions.json").read_text())
    truth = json.loads((pubmedqa_dir / "test_ground_truth.json").read_text())
    assert sorted(answers) == sorted(truth)
    # The official truth file scores it, and medqa's own split of ori_pqal.json agrees.
    path = Path(predicted.trainer.log_dir) / "predictions.json"
    official = main(["evaluate", str(path), "--truth", str(pubmedqa_dir / "test_ground_truth.json")])
    assert main(["evaluate", str(path), "--source", str(pubmedqa_dir / "ori_pqal.json")]) == official
    assert official["accuracy"] == pytest.approx(sum(answers[k] == v for k, v in truth.items()) / 500)


def test_predict_on_other_data_with_a_training_checkpoint(demo_run, tmp_path):
    _, run = demo_run
    records = synthetic_records(100, seed=7)
    source = tmp_path / "other.jsonl"
    source.write_text("\n".join(json.dumps({
        "pubid": r.id, "question": r.question, "context": {"contexts": r.contexts, "labels": r.context_labels},
        "long_answer": r.long_answer, "final_decision": r.decision}) for r in records))
    predicted = cli("predict", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--data.source", str(source),
                    logs=tmp_path)
    answers = json.loads((Path(predicted.trainer.log_dir) / "predictions.json").read_text())
    assert sorted(answers) == sorted(r.id for r in official_split(records)["test"])
    # every record of the file, in batches of 7 (the last one short): none lost or answered twice
    predicted = cli("predict", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--data.source", str(source),
                    "--data.predict_split", "all", "--data.eval_batch_size", "7", logs=tmp_path)
    rows = read_rows(Path(predicted.trainer.log_dir))
    assert sorted(r["id"] for r in rows) == sorted(r.id for r in records)


def test_mismatched_checkpoint_is_refused(demo_run, tmp_path):
    _, run = demo_run
    with pytest.raises(CheckpointMismatch, match=r"lora_r: checkpoint 8, this run 4"):
        cli("validate", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--model.lora_r", "4", logs=tmp_path)


def test_unsloth_without_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendError, match="needs a CUDA GPU.*--model.backend hf"):
        cli("validate", "--model.backend", "unsloth", logs=tmp_path)


def test_model_hub_unreachable_says_how_to_work_offline():
    from medqa.backends import load_tokenizer

    with pytest.raises(BackendError, match=r"'no-such-org/no-such-llama' is not in the local Hugging Face cache, and "
                                           r"the hub is off .* pass its folder as --model.pretrained"):
        load_tokenizer("no-such-org/no-such-llama")


@pytest.mark.slow
def test_help_imports_no_gpu_or_model_code():
    # Lightning imports torchmetrics, which imports transformers' auto classes (not model code).
    code = (
        "import sys, runpy; sys.argv = ['medqa', 'fit', '--help']\n"
        "try:\n    runpy.run_module('medqa', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('unsloth', 'bitsandbytes', 'peft', 'datasets')"
        " or (m.startswith('transformers.models.') and '.modeling_' in m and '.auto.' not in m)]\n"
        "print('IMPORTED', bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "--model.lora_r" in out.stdout and "--data.fold" in out.stdout
    assert "IMPORTED []" in out.stdout


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(config), "--print_config"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "pretrained:" in printed and "class_path: medqa.schedules.WarmupCosine" in printed
