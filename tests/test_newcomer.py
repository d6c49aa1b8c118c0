"""What a new user meets first, through `python -m medqa` as typed: one-line errors with a
fix, run directories named by their command, scores on disk, `--ckpt_path best` across
runs, the end-of-fit summary and `ask`."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import inprocess

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
SHORT = ("--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2")


def medqa(*args: str, logs: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -m medqa *args` as typed, in this process (`inprocess`)."""
    extra = ["--trainer.logger.init_args.save_dir", str(logs), "--trainer.enable_progress_bar", "false"] if logs else []
    return inprocess.run([*args, *extra], stdin=stdin)


def one_line_error(done: subprocess.CompletedProcess, command: str) -> str:
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    return done.stderr.strip().splitlines()[-1].removeprefix(f"medqa {command}: error: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_the_gpu_config_without_a_gpu_points_to_the_demo(tmp_path):
    message = one_line_error(medqa("fit", "--config", str(ROOT / "configs" / "lora.yaml"), logs=tmp_path), "fit")
    assert "asks for a GPU" in message and "configs/demo.yaml" in message
    assert not (tmp_path / "lora").exists()  # nothing left behind


@pytest.mark.slow
def test_bad_settings_and_paths_say_what_and_how(tmp_path):
    empty = tmp_path / "model"
    empty.mkdir()
    cases = [
        (["--model.pretrained", str(empty)], "is not a model folder: it has no config.json"),
        (["--data.eval_batch_size", "0"], "--data.eval_batch_size must be 1 or more, got 0"),
        (["--trainer.accumulate_grad_batches", "0"], "--trainer.accumulate_grad_batches must be 1 or more, got 0"),
        (["--model.lora_r", "-2"], "--model.lora_r must be 1 or more, got -2"),
        (["--data.source", str(tmp_path / "nope.json")], "nope.json: no such file"),
        (["--ckpt_path", "best"], "--ckpt_path best: no best checkpoint"),
    ]
    for args, expected in cases:
        assert expected in one_line_error(medqa("validate", "--config", DEMO, *args, logs=tmp_path), "validate"), args
    assert not (tmp_path / "demo").exists()  # failed commands leave no run directories


def test_a_mistyped_option_gets_a_suggestion_not_pages_of_usage(tmp_path):
    done = medqa("fit", "--config", DEMO, "--model.lora_rank", "4", logs=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) <= 4
    assert "--model.lora_rank: did you mean --model.lora_r" in done.stderr


def test_evaluate_without_its_truth_says_where_to_get_it(tmp_path):
    predictions = tmp_path / "p.json"
    predictions.write_text('{"1": "yes"}')
    message = one_line_error(medqa("evaluate", str(predictions)), "evaluate")
    assert "--truth test_ground_truth.json (the PubMedQA repository's data/ folder)" in message


@pytest.mark.slow
def test_runs_scores_best_across_runs_summary_and_ask(demo_fit, tmp_path):
    # Two runs of one experiment; the second is worse (one step, a tiny learning rate).
    logs, _, good = demo_fit  # the demo as shipped, into an experiment of this test's own
    shutil.copytree(logs / "demo" / "fit-0", tmp_path / "demo" / "fit-0")
    summary = (good.stdout + good.stderr).replace(str(logs), str(tmp_path))
    best_line = next(line for line in summary.splitlines() if line.startswith("Best checkpoint: "))
    assert "Run directory: " in summary and f"tensorboard --logdir {tmp_path / 'demo'}" in summary
    assert "python -m medqa test --config" in summary and "--ckpt_path best" in summary
    assert "💡 Tip" not in summary and "LeafSpec" not in summary  # known noise filtered
    poor = medqa("fit", "--config", DEMO, *SHORT, "--model.optimizer.init_args.lr", "1e-6", logs=tmp_path)
    assert poor.returncode == 0, poor.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert runs == ["fit-0", "fit-1"]

    tested = medqa("test", "--config", DEMO, "--ckpt_path", "best", logs=tmp_path)
    assert tested.returncode == 0, tested.stderr[-3000:]
    best = best_line.split(": ", 1)[1].split(" (")[0]
    assert "/fit-0/" in best and f"--ckpt_path best -> {best}" in tested.stdout + tested.stderr  # not the newest run's
    metrics = json.loads((tmp_path / "demo" / "test-2" / "metrics.json").read_text())
    assert metrics["checkpoint"] == best and 0.5 < metrics["test/acc"] <= 1 and "test/macro_f1" in metrics
    assert f"Scores written to {tmp_path / 'demo' / 'test-2' / 'metrics.json'}" in tested.stdout

    record = {"question": "Does the drug lower blood pressure?", "contexts": ["BACKGROUND: ...", "RESULTS: ..."]}
    asked = medqa("ask", "--config", DEMO, "--ckpt_path", "best", "--record", "-", logs=tmp_path, stdin=json.dumps(record))
    assert asked.returncode == 0, asked.stderr[-3000:]
    answer = json.loads(asked.stdout[asked.stdout.index("{"):])
    assert answer["decision"] in ("yes", "no", "maybe") and answer["checkpoint"] == best
    assert abs(answer["p_yes"] + answer["p_no"] + answer["p_maybe"] - 1) < 1e-4
    assert answer["decision"] == max(("yes", "no", "maybe"), key=lambda w: answer[f"p_{w}"])
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["fit-0", "fit-1", "test-2"]  # ask leaves none


@pytest.mark.slow
def test_ask_gives_predicts_probabilities_for_the_same_question(tmp_path):
    from medqa.tasks.pubmedqa import official_split
    from medqa.tasks.pubmedqa import synthetic_records

    fitted = medqa("fit", "--config", DEMO, *SHORT, logs=tmp_path)
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    last = tmp_path / "demo" / "fit-0" / "checkpoints" / "last.ckpt"
    predicted = medqa("predict", "--config", DEMO, "--ckpt_path", str(last), "--data.predict_split", "dev", logs=tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "demo" / "predict-1" / "predictions.jsonl").read_text().splitlines()]
    record = next(r for r in official_split(synthetic_records())["dev"] if r.id == rows[0]["id"])
    hub_record = {"question": record.question, "context": {"contexts": record.contexts, "labels": record.context_labels}}
    asked = medqa("ask", "--config", DEMO, "--ckpt_path", str(last), "--record", "-", logs=tmp_path,
                  stdin=json.dumps(hub_record))
    assert asked.returncode == 0, asked.stderr[-3000:]
    answer = json.loads(asked.stdout[asked.stdout.index("{"):])
    for w in ("yes", "no", "maybe"):
        assert abs(answer[f"p_{w}"] - rows[0][f"p_{w}"]) < 1e-4
    # the same question with --question / --context: sections without their labels, still an answer
    args = ["ask", "--config", DEMO, "--ckpt_path", str(last), "--question", record.question]
    for context in record.contexts:
        args += ["--context", context]
    plain = medqa(*args, logs=tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert json.loads(plain.stdout[plain.stdout.index("{"):])["decision"] in ("yes", "no", "maybe")


def test_ask_refuses_a_negative_rationale_and_names_a_record_file_that_is_not_text(tmp_path):
    record = tmp_path / "question.json"
    record.write_bytes(b'{"question": "\xff"}')
    message = one_line_error(medqa("ask", "--config", DEMO, "--record", str(record)), "ask")
    assert message.startswith(f"{record}: not UTF-8 text")
    message = one_line_error(medqa("ask", "--config", DEMO, "--record", str(record), "--rationale_tokens", "-1"), "ask")
    assert message == "--rationale_tokens must be 0 or more, got -1"


@pytest.mark.slow
def test_predict_keeps_an_existing_predictions_file_and_says_so_in_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.json").write_text("mine")
    done = medqa("predict", "--config", DEMO, "--trainer.limit_predict_batches", "1", "--predictions.output_dir",
                 str(out), logs=tmp_path)
    assert "predictions.json exists" in one_line_error(done, "predict")
    assert (out / "predictions.json").read_text() == "mine"


def test_ask_answers_a_file_of_questions_in_one_process_as_each_alone(tmp_path):
    records = [{"id": "a", "question": "Does the drug lower blood pressure?", "contexts": ["BACKGROUND: x", "RESULTS: y"]},
               {"question": "Is aspirin useful after a stroke?", "context": {"contexts": ["METHODS: z"], "labels": ["M"]}},
               {"id": "c", "question": "Do statins cut mortality?", "contexts": ["RESULTS: fewer deaths in the statin arm"]}]
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    many = medqa("ask", "--config", DEMO, "--questions", str(questions))
    assert many.returncode == 0, many.stderr[-3000:]
    rows = [json.loads(line) for line in many.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["a", "2", "c"]  # its own id, else its line number
    assert "warn" not in many.stderr.lower() and "Does the drug" not in many.stderr  # quiet: answers only
    alone = medqa("ask", "--config", DEMO, "--record", "-", stdin=json.dumps(records[2]))
    assert alone.returncode == 0, alone.stderr[-3000:]
    single = json.loads(alone.stdout)
    assert single["decision"] == rows[2]["decision"]
    assert all(abs(single[k] - rows[2][k]) < 1e-5 for k in ("p_yes", "p_no", "p_maybe"))  # batched as alone

    questions.write_text(json.dumps(records[0]) + "\n" + json.dumps({"id": "x", "question": "Why?"}) + "\n")
    message = one_line_error(medqa("ask", "--config", DEMO, "--questions", str(questions)), "ask")
    assert message == f"{questions}: line 2: field 'contexts' must be a non-empty list of strings (the abstract's sections)"


def test_the_rationale_request_names_the_decision_it_explains(tokenizer):
    from medqa.tokens import PromptFormat

    fmt = PromptFormat(tokenizer, "decision", 512)
    suffixes = fmt.rationale_suffix_ids()
    assert len(suffixes) == len(fmt.settings.labels) == 3
    for word, ids in zip(fmt.settings.labels, suffixes):  # asked why its own decision holds, not another
        assert f'why the answer is "{word}"' in tokenizer.decode(ids)


def test_the_install_takes_the_cpu_build_of_torch_without_a_gpu_and_cuda_with_one(tmp_path):
    def torch_line(path: str, *extra: str) -> str:
        plan = subprocess.run(["make", "-n", "-B", ".venv/.installed", *extra], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PATH": path}, check=True).stdout
        return next(line for line in plan.splitlines() if "pip install" in line and "torch==" in line)

    plain_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "nvidia-smi").exists())
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in torch_line(plain_path)  # no GPU: the CPU build
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200'\n")
    (fake / "nvidia-smi").chmod(0o755)
    with_gpu = f"{fake}{os.pathsep}{plain_path}"
    assert "download.pytorch.org" not in torch_line(with_gpu)  # a GPU answers: PyPI's CUDA build
    assert "download.pytorch.org/whl/cpu" in torch_line(with_gpu, "TORCH_BUILD=cpu")  # the documented switch


def test_ask_from_python_leaves_the_callers_logging_as_it_was(capsys):
    import logging

    from medqa.cli import main

    lightning_log = logging.getLogger("lightning.pytorch")
    before = lightning_log.level
    answer = main(["ask", "--config", DEMO, "--question", "Is it safe?", "--context", "RESULTS: no harm was seen."])
    assert answer["decision"] in ("yes", "no", "maybe") and lightning_log.level == before
