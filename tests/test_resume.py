"""A run killed mid-epoch and resumed ends exactly where the uninterrupted run ends."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import inprocess
from test_checkpoints import wait_until_stalled

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
EPOCHS = 2  # of 12 batches: a kill in the second epoch resumes mid-epoch, after an epoch's end was saved


def fit_args(logs: Path, accumulate: int, every: int) -> list[str]:
    return [sys.executable, "-m", "medqa", "fit", "--config", DEMO, "--trainer.logger.init_args.save_dir", str(logs),
            "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", str(EPOCHS),
            "--trainer.limit_train_batches", "12", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
            "--trainer.accumulate_grad_batches", str(accumulate), "--last_checkpoint.every_n_train_steps", str(every)]


def losses(run_dir: Path) -> dict[int, float]:
    """train/loss by step; where a resumed run logged a step again, its later value wins."""
    out: dict[int, float] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*"), key=os.path.getmtime):
        acc = EventAccumulator(str(events))
        acc.Reload()
        out.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return out


def global_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"] if path.exists() else -1


@pytest.fixture(scope="module")
def whole_runs(tmp_path_factory):
    """The uninterrupted fit for each (accumulate, every), run once for the tests that compare with it."""
    made: dict[tuple[int, int], Path] = {}

    def whole(accumulate: int, every: int) -> Path:
        if (accumulate, every) not in made:
            logs = tmp_path_factory.mktemp(f"whole-{accumulate}-{every}")
            done = inprocess.run(fit_args(logs, accumulate, every)[3:])  # needs no process of its own
            assert done.returncode == 0, done.stderr[-3000:]
            made[accumulate, every] = logs / "demo" / "fit-0"
        return made[accumulate, every]

    return whole


def assert_same_run(whole: Path, resumed: Path, total: int) -> None:
    """The resumed run ends with the uninterrupted run's weights and logged the same losses."""
    want = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    got = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert want["global_step"] == got["global_step"] == total
    assert want["state_dict"].keys() == got["state_dict"].keys()
    for name, tensor in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][name], tensor, rtol=1e-6, atol=1e-9, msg=name)

    want_losses, got_losses = losses(whole), losses(resumed)
    assert sorted(want_losses) == sorted(got_losses) and max(got_losses) >= total - 1
    for step, value in want_losses.items():
        assert got_losses[step] == pytest.approx(value, rel=1e-6), f"step {step}"


@pytest.mark.slow
@pytest.mark.parametrize("accumulate, every, kill_after", [(1, 4, 16), (2, 3, 9)], ids=["plain", "accumulate2"])
def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path, whole_runs, accumulate, every, kill_after):
    steps_per_epoch = 12 // accumulate
    assert kill_after % steps_per_epoch != 0  # the checkpoint we resume from is mid-epoch

    logs = tmp_path / "cut"
    args = fit_args(logs, accumulate, every)
    ckpts = logs / "demo" / "fit-0" / "checkpoints"
    run = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while global_step(ckpts / "last.ckpt") < kill_after and run.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert global_step(ckpts / "last.ckpt") == kill_after
        os.mkfifo(ckpts / "last.ckpt.tmp")  # the next save blocks here; kill the run there
        assert wait_until_stalled(run)
        run.send_signal(signal.SIGKILL)
        run.wait()
    finally:
        if run.poll() is None:
            run.kill()
    (ckpts / "last.ckpt.tmp").unlink()
    assert global_step(ckpts / "last.ckpt") == kill_after

    resumed = inprocess.run(args[3:] + ["--ckpt_path", "last"])  # the kill needed a process; the resume does not
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert_same_run(whole_runs(accumulate, every), logs / "demo" / "fit-0", EPOCHS * steps_per_epoch)


@pytest.mark.slow
def test_sigterm_stops_after_the_step_saves_and_resumes_exactly(tmp_path, whole_runs):
    """SIGTERM mid-fit (accumulating 2 batches a step): the run finishes the optimizer step in
    progress, saves last.ckpt there, exits 143 with one line naming the command that continues,
    and that command ends where the uninterrupted run ends."""
    accumulate, every = 2, 3  # the whole run of the SIGKILL test's accumulate2 case
    logs = tmp_path / "cut"
    args = fit_args(logs, accumulate, every)
    ckpts = logs / "demo" / "fit-0" / "checkpoints"
    run = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while global_step(ckpts / "last.ckpt") < every and run.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert run.poll() is None, "the fit ended before it could be stopped"
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    said = [line for line in stderr.splitlines() if line.startswith("medqa fit: stopped by SIGTERM")]
    assert len(said) == 1, stderr[-3000:]
    step = int(said[0].split("after step ")[1].split(";")[0])
    assert every <= step < EPOCHS * 12 // accumulate  # stopped before the end, at a step boundary it counted
    assert f"saved {ckpts / 'last.ckpt'}. Continue with: " in said[0] and said[0].endswith("--ckpt_path last")
    assert global_step(ckpts / "last.ckpt") == step  # saved where it stopped, not at the last periodic save
    assert not list(ckpts.glob("*.tmp"))

    command = said[0].split("Continue with: ")[1]
    resumed = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(whole_runs(accumulate, every), logs / "demo" / "fit-0", EPOCHS * 12 // accumulate)
