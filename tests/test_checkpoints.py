"""Checkpoint files survive a kill in the middle of a write."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import inprocess
import pytest
import torch

from medqa.checkpoints import AtomicCheckpointIO, BackgroundCheckpointIO, find_checkpoint
from medqa.runs import next_run_name

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


def test_atomic_write_replaces_whole_files_and_clears_leftovers(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    (tmp_path / "checkpoints" / "last.ckpt.tmp").write_bytes(b"half a checkpoint")
    io.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 2}
    assert os.listdir(path.parent) == ["last.ckpt"]


def test_background_writes_keep_the_saved_values_and_their_order(tmp_path):
    """The tensors are copied when the save is asked for (training goes on changing them),
    and an old best is removed only after the write before it."""
    io = BackgroundCheckpointIO()
    weights = torch.zeros(1_000_000)
    first, second, third = (tmp_path / f"best-{i}.ckpt" for i in (1, 2, 3))
    io.save_checkpoint({"w": weights}, first)
    weights += 1  # the next optimizer step, while the write may still be running
    io.save_checkpoint({"w": weights}, second)
    io.save_checkpoint({"w": weights}, third)
    io.remove_checkpoint(second)
    io.teardown()  # the end of the run waits for every write
    assert sorted(os.listdir(tmp_path)) == ["best-1.ckpt", "best-3.ckpt"]
    assert torch.load(first, weights_only=True)["w"].eq(0).all()
    assert torch.load(third, weights_only=True)["w"].eq(1).all()


def test_a_failed_background_write_is_raised(tmp_path):
    io = BackgroundCheckpointIO()
    (tmp_path / "taken").write_text("a file where the checkpoint folder should be")
    with pytest.raises(OSError):  # at this save if the thread is done first, else at the end of the run
        io.save_checkpoint({"step": 1}, tmp_path / "taken" / "last.ckpt")
        io.teardown()


def test_last_is_the_newest_runs_and_best_the_best_score_of_the_compatible_runs(tmp_path):
    for run, names in (("version_0", ["last.ckpt", "best-epoch0-step4-acc0.9400.ckpt"]),
                       ("fit-1", ["last.ckpt", "best-epoch0-step2-acc0.4400.ckpt"]),
                       ("fit-2", ["last.ckpt", "best-epoch1-step9-acc0.9600.ckpt"]),
                       ("test-3", []), ("fit-10", [])):
        d = tmp_path / run / "checkpoints"
        d.mkdir(parents=True)
        for name in names:
            (d / name).write_bytes(b"x")
    assert find_checkpoint(tmp_path, "last") == tmp_path / "fit-2" / "checkpoints" / "last.ckpt"
    assert find_checkpoint(tmp_path, "best") == tmp_path / "fit-2" / "checkpoints" / "best-epoch1-step9-acc0.9600.ckpt"
    assert find_checkpoint(tmp_path, "best", lambda run: run.name != "fit-2") == (
        tmp_path / "version_0" / "checkpoints" / "best-epoch0-step4-acc0.9400.ckpt")  # not the newer 0.44
    assert next_run_name(tmp_path, "test") == "test-11"
    assert find_checkpoint(tmp_path / "nothing", "last") is None and next_run_name(tmp_path / "nothing", "fit") == "fit-0"
    # a fit resumes only the newest fit run: fit-10 stopped before its first checkpoint
    assert find_checkpoint(tmp_path, "last", newest_fit=True) is None



def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until_stalled(run: subprocess.Popen, seconds: float = 3.0, deadline: float = 120.0) -> bool:
    """True once the process is alive but has used no CPU for `seconds`: blocked in a call."""
    end = time.time() + deadline
    last, since = cpu_seconds(run.pid), time.time()
    while run.poll() is None and time.time() < end:
        time.sleep(0.25)
        now = cpu_seconds(run.pid)
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= seconds:
            return True
    return False


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path):
    args = [sys.executable, "-m", "medqa", "fit", "--config", DEMO, "--trainer.logger.init_args.save_dir",
            str(tmp_path), "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "2",
            "--trainer.limit_train_batches", "8", "--trainer.limit_val_batches", "1"]
    ckpts = tmp_path / "demo" / "fit-0" / "checkpoints"
    last = ckpts / "last.ckpt"
    run = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not last.exists() and run.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert last.exists(), "no first checkpoint"
        # The next write of last.ckpt opens last.ckpt.tmp: make it a FIFO with no reader, so
        # the writer blocks inside the write, and kill it there.
        os.mkfifo(ckpts / "last.ckpt.tmp")
        assert wait_until_stalled(run), "the run did not block in its second write"
        assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 8
        run.send_signal(signal.SIGKILL)
        run.wait()
    finally:
        if run.poll() is None:
            run.kill()
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 8  # the first checkpoint, whole
    # A real kill leaves a partial regular file, not our FIFO: put one there instead.
    (ckpts / "last.ckpt.tmp").unlink()
    (ckpts / "last.ckpt.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")

    resumed = inprocess.run(args[3:] + ["--ckpt_path", "last"])  # the kill needed a process; the resume does not
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 16
    assert not (ckpts / "last.ckpt.tmp").exists()


def test_best_prefers_a_macro_f1_checkpoint_and_compares_scores_within_one_metric(tmp_path):
    for run, name in (("fit-0", "best-epoch3-step9-acc0.9800.ckpt"),  # an earlier medqa's val/acc name
                      ("fit-1", "best-epoch1-step4-f1_0.5100.ckpt"),
                      ("fit-2", "best-epoch0-step2-f1_0.2340-v1.ckpt")):
        d = tmp_path / run / "checkpoints"
        d.mkdir(parents=True)
        (d / name).write_bytes(b"x")
    assert find_checkpoint(tmp_path, "best").name == "best-epoch1-step4-f1_0.5100.ckpt"


def _fit(logs: Path, name: str, *extra: str):
    from medqa.cli import main

    return main(["fit", "--config", DEMO, "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
                 "--trainer.logger.init_args.save_dir", str(logs), "--trainer.logger.init_args.name", name, *extra])


@pytest.mark.slow
def test_phase_two_starts_from_phase_ones_adapter_with_a_fresh_optimizer_and_schedule(tmp_path):
    """The PubMedQA paper's recipe on small files: phase 1 trains, phase 2 starts from its
    adapter (checkpoint or exported PEFT folder) as a new run: step 0, a fresh optimizer."""
    from medqa.cli import main
    from medqa.checkpoints import CheckpointError

    one = _fit(tmp_path, "phase1", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4")
    last = Path(one.trainer.log_dir) / "checkpoints" / "last.ckpt"
    phase1 = torch.load(last, weights_only=True)["state_dict"]
    assert any(v.abs().sum() > 0 for k, v in phase1.items() if "lora_B" in k)  # it trained
    folder = main(["export", "--ckpt_path", str(last), "--pretrained", "builtin:tiny-llama", "--out", str(tmp_path / "peft")])
    frozen = ("--trainer.max_steps", "1", "--model.optimizer.init_args.lr", "0")  # one step that moves nothing
    for start in (last, folder):
        two = _fit(tmp_path, "phase2", *frozen, "--model.init_adapter", str(start))
        state = torch.load(Path(two.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=True)
        assert state["global_step"] == 1  # a new run, not phase 1's step 4
        assert state["optimizer_states"][0]["state"][0]["step"] == 1  # its own optimizer
        assert state["state_dict"].keys() == phase1.keys()
        assert all(torch.equal(state["state_dict"][k], phase1[k]) for k in phase1)  # phase 1's weights
    fresh = torch.load(Path(_fit(tmp_path, "fresh", *frozen).trainer.log_dir) / "checkpoints" / "last.ckpt",
                       weights_only=True)["state_dict"]
    assert all(v.abs().sum() == 0 for k, v in fresh.items() if "lora_B" in k)  # without it: a fresh adapter
    with pytest.raises(CheckpointError, match=r"--model.init_adapter .* does not fit this run's model: lora_r: "
                                              r"checkpoint 8, this run 4"):
        _fit(tmp_path, "other", *frozen, "--model.init_adapter", str(last), "--model.lora_r", "4")
