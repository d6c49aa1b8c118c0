"""Run directories: each command claims its own, even when many start at once."""

import subprocess
import sys
from pathlib import Path

import pytest

from medqa.runs import claim_run

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


def test_claims_take_the_next_free_number_and_workers_create_nothing(tmp_path, monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "MEDQA_RUN_NAME"):
        monkeypatch.delenv(k, raising=False)
    (tmp_path / "fit-0").mkdir()
    (tmp_path / "test-1").mkdir()
    assert claim_run(tmp_path, "fit") == ("fit-2", True) and (tmp_path / "fit-2").is_dir()
    assert claim_run(tmp_path, "test") == ("test-3", True)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process DDP launched from the one that claimed test-3
    assert claim_run(tmp_path, "test") == ("test-3", False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit-0", "fit-2", "test-1", "test-3"]


def _demo(command: str, logs: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "medqa", command, "--config", DEMO, "--trainer.logger.init_args.save_dir", str(logs),
         "--trainer.enable_progress_bar", "false", "--threads", "1", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_commands_started_at_once_in_one_experiment_each_get_their_own_run(tmp_path):
    short = ("--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1")
    fits = [_demo("fit", tmp_path, *short) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in fits]
    assert [p.returncode for p in fits] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    runs = tmp_path / "demo"
    assert sorted(p.name for p in runs.iterdir()) == ["fit-0", "fit-1"]
    for run in ("fit-0", "fit-1"):
        assert (runs / run / "config.yaml").is_file() and (runs / run / "checkpoints" / "last.ckpt").is_file()
    last = runs / "fit-0" / "checkpoints" / "last.ckpt"
    tests = [_demo("test", tmp_path, "--ckpt_path", str(last), "--trainer.limit_test_batches", "2") for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in tests]
    assert [p.returncode for p in tests] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert sorted(p.name for p in runs.iterdir()) == ["fit-0", "fit-1", "test-2", "test-3"]
    assert all((runs / run / "metrics.json").is_file() for run in ("test-2", "test-3"))
