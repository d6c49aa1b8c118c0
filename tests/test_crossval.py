"""The 10-fold cross-validation command: every fold, a summary, and a restart that skips
the folds already done."""

import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import inprocess
import pytest
import torch

from medqa.crossval import format_summary, summarize

ROOT = Path(__file__).resolve().parents[1]


def cv_command(cv_dir: Path) -> list[str]:
    return [sys.executable, "-m", "medqa", "cv", "--config", str(ROOT / "configs" / "demo.yaml"),
            "--cv_dir", str(cv_dir), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
            "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    """A cv killed after fold 1, then run again to the end: (its folder, what the restart printed)."""
    cv_dir = tmp_path_factory.mktemp("cv") / "cv"
    first = subprocess.Popen(cv_command(cv_dir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not (cv_dir / "fold1" / "result.json").exists():
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "fold 1 did not finish in time"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = {k: (cv_dir / f"fold{k}" / "result.json").stat().st_mtime_ns for k in (0, 1)}
    assert not (cv_dir / "summary.json").exists()

    second = inprocess.run(cv_command(cv_dir)[3:])  # the kill needed a process; the restart does not
    assert second.returncode == 0, second.stderr[-3000:]
    return cv_dir, second.stdout + second.stderr, done


@pytest.mark.slow
def test_cv_runs_every_fold_and_a_restart_skips_the_done_ones(cv_run):
    cv_dir, log, done = cv_run
    assert "fold 0 already done" in log and "fold 1 already done" in log and "fold 2 already done" not in log
    assert {k: (cv_dir / f"fold{k}" / "result.json").stat().st_mtime_ns for k in (0, 1)} == done  # not redone

    summary = json.loads((cv_dir / "summary.json").read_text())
    folds = summary["folds"]
    assert [f["fold"] for f in folds] == list(range(10))
    assert all(f["dev_questions"] == 50 and 0 <= f["dev_acc"] <= 1 for f in folds)
    assert len({f["checkpoint"] for f in folds}) == 10  # one run per fold
    assert summary["dev_acc_mean"] == statistics.fmean(f["dev_acc"] for f in folds)
    assert summary["dev_macro_f1_std"] == statistics.stdev(f["dev_macro_f1"] for f in folds)
    assert (cv_dir / "summary.md").read_text().strip() == format_summary(summary)

    # Every training question answered once, by the fold model that did not train on it: each
    # fold's rows score what its validation scored.
    rows = [json.loads(line) for line in (cv_dir / "oof.jsonl").read_text().splitlines()]
    assert len(rows) == 500 and len({r["id"] for r in rows}) == 500
    for fold in folds:
        held = [json.loads(line) for line in (cv_dir / f"fold{fold['fold']}" / "oof" / "predictions.jsonl")
                .read_text().splitlines()]
        assert len(held) == 50 and all(r in rows for r in held)
        assert abs(sum(r["label"] == r["truth"] for r in held) / 50 - fold["dev_acc"]) < 1e-6
    import yaml

    bias = yaml.safe_load((cv_dir / "label_bias.yaml").read_text())["model"]["label_bias"]
    assert summary["out_of_fold"]["label_bias"] == bias and len(bias) == 3 and bias[0] == 0.0
    assert summary["out_of_fold"]["questions"] == 500
    assert summary["out_of_fold"]["macro_f1_after"] >= summary["out_of_fold"]["macro_f1_before"]
    assert "10-fold cross-validation of synthetic" in log and "PQA-L" not in log  # the data it ran on
    assert log.count("Next") == 1 and "Run directory" not in log  # one hint at the end, not one a fold
    assert " -m medqa fit --config " in log and " -m medqa test --config " in log and "--cv_dir" not in log.split("Next")[1]
    assert f"--config {cv_dir / 'label_bias.yaml'}" in log.split("Next")[1]


@pytest.mark.slow
def test_an_ensemble_of_the_folds_averages_their_probabilities(cv_run, tmp_path):
    from medqa.checkpoints import find_checkpoint, load_checkpoint
    from medqa.cli import cli_for
    from medqa.tokens import collate

    cv_dir = cv_run[0]
    options = ["--config", str(ROOT / "configs" / "demo.yaml"), "--trainer.logger.init_args.save_dir", str(tmp_path),
               "--data.predict_split", "dev", "--trainer.enable_progress_bar", "false"]
    done = inprocess.run(["predict", *options, "--model.ensemble", str(cv_dir)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Scoring with the 10 fold adapters of {cv_dir}" in done.stdout + done.stderr
    rows = [json.loads(line) for line in next(tmp_path.glob("*/predict-*/predictions.jsonl")).read_text().splitlines()]

    # The same questions scored by each fold's best checkpoint alone, the probabilities averaged.
    cli, _ = cli_for("predict", options)
    model, data = cli.model, cli.datamodule
    data.setup("predict")
    model.configure_model()
    model.eval()
    examples = list(data.predict_dataloader().dataset)
    batch = collate(examples, data.pad_id)
    mean = 0
    for fold in range(10):
        model.load_state_dict(load_checkpoint(find_checkpoint(cv_dir / f"fold{fold}", "best"), True)["state_dict"],
                              strict=False)
        with torch.no_grad():
            mean = mean + model._scores(batch)[1].softmax(-1) / 10
    ours = {e.id: p for e, p in zip(examples, mean.tolist())}
    assert len(rows) == len(ours) == 50
    for row in rows:
        assert all(abs(row[f"p_{w}"] - p) < 1e-5 for w, p in zip(("yes", "no", "maybe"), ours[row["id"]])), (row, ours[row["id"]])

    # ask and test apply the same ensemble: ask's answer to a dev question, test's accuracy.
    from medqa.cli import main
    from medqa.tasks.pubmedqa import official_split, synthetic_records

    record = next(r for r in official_split(synthetic_records())["dev"] if r.id == rows[0]["id"])
    question = tmp_path / "question.json"
    question.write_text(json.dumps({"question": record.question,
                                    "context": {"contexts": record.contexts, "labels": record.context_labels}}))
    asked = main(["ask", *options, "--model.ensemble", str(cv_dir), "--record", str(question)])
    predicted = main(["predict", *options, "--model.ensemble", str(cv_dir), "--data.predict_split", "test"])
    tested = main(["test", *options, "--model.ensemble", str(cv_dir)])
    test_rows = [json.loads(line) for line in (Path(predicted.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()]
    correct = sum(r["label"] == r["truth"] for r in test_rows) / len(test_rows)
    assert correct == pytest.approx(float(tested.trainer.callback_metrics["test/acc"]), abs=1e-6)
    plain = main(["ask", *options, "--ckpt_path", str(find_checkpoint(cv_dir / "fold0", "best")),
                  "--record", str(question)])
    assert all(abs(asked[f"p_{w}"] - p) < 1e-4 for w, p in zip(("yes", "no", "maybe"), ours[record.id]))
    assert any(abs(asked[f"p_{w}"] - plain[f"p_{w}"]) > 1e-4 for w in ("yes", "no", "maybe"))  # not fold 0 alone

    # export writes one adapter: an ensemble is refused in one line, not exported as fold 0.
    exported = inprocess.run(["export", *options, "--model.ensemble", str(cv_dir), "--ckpt_path",
                              str(find_checkpoint(cv_dir / "fold0", "best")), "--out", str(tmp_path / "export")])
    assert exported.returncode != 0 and "export writes one adapter" in exported.stderr
    assert "Traceback" not in exported.stderr and not (tmp_path / "export").exists()

    refused = inprocess.run(["test", *options, "--model.ensemble", str(cv_dir), "--ckpt_path",
                             str(find_checkpoint(cv_dir / "fold0", "best"))])
    assert refused.returncode != 0 and "leave out --ckpt_path" in refused.stderr and "Traceback" not in refused.stderr
    kept = cv_dir / "fold7" / "fit-0" / "checkpoints"
    kept.rename(kept.with_name("moved"))
    try:
        missing = inprocess.run(["test", *options, "--model.ensemble", str(cv_dir)])
    finally:
        kept.with_name("moved").rename(kept)
    assert missing.returncode != 0 and "fold7 have no best checkpoint" in missing.stderr


def test_summary_mean_and_std():
    summary = summarize([{"fold": i, "dev_acc": a, "dev_macro_f1": a / 2} for i, a in enumerate([0.5, 0.7, 0.6])])
    assert summary["dev_acc_mean"] == 0.6 and abs(summary["dev_acc_std"] - 0.1) < 1e-12
    assert "| mean ± std | 0.6000 ± 0.1000 | 0.3000 ± 0.0500 |" in format_summary(summary)


def test_cv_refuses_the_settings_it_sets_per_fold(tmp_path):
    import pytest

    from medqa.crossval import main

    for flag in ("--data.fold", "--ckpt_path", "--trainer.logger.init_args.name"):
        with pytest.raises(ValueError, match=f"{flag} is set by cv for each fold"):
            main(["--config", str(ROOT / "configs" / "demo.yaml"), f"{flag}=3", "--cv_dir", str(tmp_path)])


@pytest.mark.slow
def test_a_fold_trained_to_the_end_but_not_scored_is_scored_not_refused(tmp_path):
    from medqa.cli import main
    from medqa.crossval import run_fold

    cv_dir = tmp_path / "cv"
    args = cv_command(cv_dir)[4:]  # the fit arguments cv passes on
    args = args[: args.index("--cv_dir")] + args[args.index("--cv_dir") + 2:]
    main(["fit", *args, "--data.fold", "3", "--trainer.logger.init_args.save_dir", str(cv_dir),
          "--trainer.logger.init_args.name", "fold3"])  # a kill came before result.json
    result = run_fold(args, cv_dir, 3)
    assert result["fold"] == 3 and result["dev_questions"] == 50 and 0 <= result["dev_acc"] <= 1
    assert "fold3/fit-0/checkpoints/best" in result["checkpoint"]
    held = (cv_dir / "fold3" / "oof" / "predictions.jsonl").read_text().splitlines()
    assert len(held) == 50  # its dev questions answered too
