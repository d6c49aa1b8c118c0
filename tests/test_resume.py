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

from test_checkpoints import wait_until_stalled

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


def fit_args(logs: Path, accumulate: int, every: int) -> list[str]:
    return [sys.executable, "-m", "medqa", "fit", "--config", DEMO, "--trainer.logger.init_args.save_dir", str(logs),
            "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "12",
            "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
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


@pytest.mark.parametrize("accumulate, every, kill_after", [(1, 4, 16), (2, 3, 9)], ids=["plain", "accumulate2"])
def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path, accumulate, every, kill_after):
    steps_per_epoch = 12 // accumulate
    assert kill_after % steps_per_epoch != 0  # the checkpoint we resume from is mid-epoch

    whole = subprocess.run(fit_args(tmp_path / "whole", accumulate, every), cwd=ROOT, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-3000:]

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

    resumed = subprocess.run(args + ["--ckpt_path", "last"], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    total = 3 * steps_per_epoch
    want = torch.load(tmp_path / "whole" / "demo" / "fit-0" / "checkpoints" / "last.ckpt", weights_only=True)
    got = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert want["global_step"] == got["global_step"] == total
    assert want["state_dict"].keys() == got["state_dict"].keys()
    for name, tensor in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][name], tensor, rtol=1e-6, atol=1e-9, msg=name)

    want_losses, got_losses = losses(tmp_path / "whole" / "demo" / "fit-0"), losses(logs / "demo" / "fit-0")
    assert sorted(want_losses) == sorted(got_losses) and max(got_losses) >= total - 1
    for step, value in want_losses.items():
        assert got_losses[step] == pytest.approx(value, rel=1e-6), f"step {step}"
