"""A second task through the whole pipeline: MedQA-USMLE's published JSON Lines, read,
split, trained, tested, predicted and scored through the CLI on the tiny model (CPU)."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

import inprocess
from medqa.cli import main
from medqa.evaluate import main as evaluate
from medqa.model import CheckpointMismatch
from medqa.records import DataError
from medqa.tasks import TASKS, get_task
from medqa.tasks.medqa_usmle import read_source, synthetic_records

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")

# Records in the published schema (data_clean/questions/US/4_options/*.jsonl), written here.
CASES = [
    ("A 24-year-old woman has burning on urination and fever.", "Start antibiotics", "A"),
    ("A 61-year-old man has a swollen, painful calf after a long flight.", "Start anticoagulation", "B"),
    ("A 17-year-old has extreme thirst, weight loss and ketones in the urine.", "Start insulin", "C"),
    ("A 45-year-old has a rigid abdomen and free air under the diaphragm.", "Refer for surgery", "D"),
]
OPTIONS = {"A": "Start antibiotics", "B": "Start anticoagulation", "C": "Start insulin", "D": "Refer for surgery"}


def published(question: str, answer: str, letter: str) -> dict:
    return {"question": question + " Which of the following is the most appropriate next step?", "answer": answer,
            "options": OPTIONS, "meta_info": "step2&3", "answer_idx": letter, "metamap_phrases": ["next step"]}


@pytest.fixture
def medqa_folder(tmp_path) -> Path:
    """The published folder's three files: 8 training, 4 dev and 4 test questions."""
    folder = tmp_path / "4_options"
    folder.mkdir()
    for split, copies in (("train", 2), ("dev", 1), ("test", 1)):
        rows = [published(*case) for case in CASES] * copies
        (folder / f"phrases_no_exclude_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_the_published_split_and_ids(medqa_folder):
    task = get_task("medqa_usmle")
    splits = task.split(task.read(str(medqa_folder), None), 0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 8, "dev": 4, "test": 4}
    test = splits["test"]
    assert [r.id for r in test] == ["test-1", "test-2", "test-3", "test-4"]  # split and line number
    assert [task.labels[r.label] for r in test] == ["A", "B", "C", "D"]
    user = task.user_turn(test[1], task.passage(test[1]), task.instruction)
    assert "Options:\nA. Start antibiotics\nB. Start anticoagulation" in user and test[1].question in user


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("options"), r"line 2: missing field 'options'"),
    (lambda r: r.update(answer_idx="E"), r"line 2: field 'answer_idx' must be one of A/B/C/D, got 'E'"),
    (lambda r: r.update(options={"A": "x", "B": "y", "C": "z"}), r"line 2: field 'options' must map A, B, C and D"),
    (lambda r: r.update(answer="Start insulin"), r"line 2: field 'answer' 'Start insulin' is not option B"),
])
def test_bad_records_name_file_line_and_field(medqa_folder, change, message):
    path = medqa_folder / "phrases_no_exclude_dev.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    change(rows[1])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=f"phrases_no_exclude_dev.jsonl: {message}"):
        read_source(str(medqa_folder))


def test_a_folder_without_its_dev_file_is_refused(medqa_folder):
    (medqa_folder / "phrases_no_exclude_dev.jsonl").unlink()
    with pytest.raises(DataError, match=r"exactly one \.jsonl file per split .*found \{'dev': \[\]\}"):
        read_source(str(medqa_folder))


def test_every_task_has_a_learnable_synthetic_set():
    for task in TASKS.values():
        records = task.read("synthetic", None)
        splits = task.split(records, 0)
        assert all(splits[s] for s in ("train", "dev", "test"))
        assert sorted(task.label_counts(records)) == sorted(task.labels)
        assert min(task.label_counts(records).values()) > len(records) / (3 * len(task.labels))
    assert len({r.id for r in synthetic_records()}) == len(synthetic_records())


def cli(*args: str, logs: Path):
    return main([args[0], "--config", DEMO, "--data.task", "medqa_usmle", "--trainer.logger.init_args.save_dir",
                 str(logs), "--trainer.enable_progress_bar", "false", *args[1:]])


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """The demo's 10 epochs on the synthetic USMLE set, 20 batches of 8 questions each."""
    logs = tmp_path_factory.mktemp("logs")
    cli("fit", "--trainer.limit_train_batches", "20", logs=logs)
    return logs


@pytest.mark.slow
def test_synthetic_set_is_learned_and_scored_over_the_letters(synthetic_run, tmp_path):
    tested = cli("test", "--ckpt_path", "best", logs=synthetic_run)
    metrics = tested.trainer.callback_metrics
    assert metrics["test/acc"] >= 0.9 and {"test/f1_A", "test/f1_D"} <= set(metrics)
    predicted = cli("predict", "--ckpt_path", "best", logs=synthetic_run)
    run = Path(predicted.trainer.log_dir)
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 100 and set(rows[0]) == {"id", "label", "p_A", "p_B", "p_C", "p_D", "truth"}
    assert all(abs(sum(r[f"p_{w}"] for w in "ABCD") - 1) < 1e-4 for r in rows)
    scores = evaluate([str(run / "predictions.json"), "--task", "medqa_usmle", "--source", "synthetic"])
    assert scores["accuracy"] == pytest.approx(float(metrics["test/acc"]), abs=1e-6)


@pytest.mark.slow
def test_fit_test_predict_evaluate_on_the_published_files(medqa_folder, tmp_path):
    source = ["--data.source", str(medqa_folder), "--trainer.max_epochs", "1"]
    fitted = cli("fit", *source, logs=tmp_path)
    assert fitted.trainer.global_step == 1  # 8 training questions, batch 8
    tested = cli("test", *source, "--ckpt_path", "last", logs=tmp_path)
    assert 0 <= tested.trainer.callback_metrics["test/acc"] <= 1
    predicted = cli("predict", *source, "--ckpt_path", "last", logs=tmp_path)
    answers = json.loads((Path(predicted.trainer.log_dir) / "predictions.json").read_text())
    assert sorted(answers) == ["test-1", "test-2", "test-3", "test-4"] and set(answers.values()) <= set("ABCD")
    scores = evaluate([str(Path(predicted.trainer.log_dir) / "predictions.json"), "--task", "medqa_usmle",
                       "--source", str(medqa_folder)])
    truth = dict(zip(["test-1", "test-2", "test-3", "test-4"], "ABCD"))
    assert scores["accuracy"] == sum(answers[k] == v for k, v in truth.items()) / 4
    assert scores["accuracy"] == pytest.approx(float(tested.trainer.callback_metrics["test/acc"]))


def test_a_checkpoint_of_one_task_is_refused_by_another(synthetic_run, tmp_path):
    best = next((synthetic_run / "demo" / "fit-0" / "checkpoints").glob("best*.ckpt"))
    with pytest.raises(CheckpointMismatch, match=r"answer labels: checkpoint \['A', 'B', 'C', 'D'\], this run "
                                                 r"\['yes', 'no', 'maybe'\].*--data.task"):
        main(["test", "--config", DEMO, "--trainer.logger.init_args.save_dir", str(tmp_path), "--ckpt_path", str(best)])
    saved = torch.load(best, map_location="cpu", weights_only=True)
    assert saved["QADataModule"]["prompt"]["task"] == "medqa_usmle"
    assert saved["hyper_parameters"]["answer_tokens"]["labels"] == ["A", "B", "C", "D"]


def test_best_is_chosen_among_the_runs_of_the_commands_task(synthetic_run):
    from medqa.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match="no best checkpoint of a run with this command's task and model settings"):
        main(["test", "--config", DEMO, "--trainer.logger.init_args.save_dir", str(synthetic_run), "--ckpt_path", "best"])
    tested = cli("validate", "--ckpt_path", "best", logs=synthetic_run)
    assert Path(tested.config["validate"]["ckpt_path"]).name.startswith("best")
    assert tested.trainer.callback_metrics["val/acc"] >= 0.9


def medqa_cli(*args: str, logs: Path) -> subprocess.CompletedProcess:
    """`python -m medqa ...` on MedQA-USMLE as a user types it (one epoch of at most 2 batches)."""
    return inprocess.run([args[0], "--config", DEMO, "--data.task", "medqa_usmle", "--trainer.logger.init_args.save_dir",
                          str(logs), "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1",
                          "--trainer.limit_train_batches", "2", *args[1:]])


def refused(done: subprocess.CompletedProcess, message: str) -> bool:
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    return done.returncode == 1 and "Traceback" not in done.stderr and last.startswith("medqa fit: error: ") and message in last


def test_a_file_of_ones_own_gets_ids_of_its_own_and_trains_beside_the_official_sets(medqa_folder, tmp_path):
    rows = [published(*case) for case in CASES]
    rows = [{**r, "question": r["question"] + " (a new question)"} for r in rows]
    own = tmp_path / "mycorpus_dev.jsonl"  # named like a dev file, holding new training questions
    own.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_source(str(own))
    assert [r.id for r in records] == [f"mycorpus_dev-{n}" for n in range(1, len(rows) + 1)]
    assert [r.id for r in read_source(str(medqa_folder))][8:10] == ["dev-1", "dev-2"]  # the published files keep theirs
    done = medqa_cli("fit", "--data.source", str(medqa_folder), "--data.train_source", str(own), logs=tmp_path / "logs")
    assert done.returncode == 0, done.stderr[-3000:]  # not refused as test leakage: no question overlaps


@pytest.mark.slow
def test_commands_that_would_train_nothing_refuse_in_one_line(medqa_folder, tmp_path):
    test_file = str(medqa_folder / "phrases_no_exclude_test.jsonl")
    done = medqa_cli("fit", "--data.source", test_file, logs=tmp_path)
    assert refused(done, "nothing to train on: " + test_file + " has no training split"), done.stderr[-2000:]
    done = medqa_cli("fit", "--data.source", str(medqa_folder), "--data.train_source", test_file,
                     "--data.drop_eval_overlap", "true", logs=tmp_path)
    assert refused(done, "nothing to train on: every question of " + test_file + " is a dev or test question")
    done = medqa_cli("fit", "--data.source", str(medqa_folder), "--data.target", "long_answer", logs=tmp_path)
    assert refused(done, "record 'train-1': --data.target long_answer trains the model to write the record's long "
                         "answer, and it has none"), done.stderr[-2000:]
    assert not (tmp_path / "demo").exists()  # refused before anything was written
