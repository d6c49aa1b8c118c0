"""`fit` stopped by SIGTERM (a `timeout`, a container stop, a scheduler's grace period):
finish the optimizer step in progress, save `last.ckpt` when the run has trained since its
last save, and end the process non-zero with the command that continues it.

Lightning's own handler stops after any batch, mid-accumulation too (a checkpoint there
would lose the step's accumulated gradients, so a resume could not be exact), and saves
nothing. This callback takes SIGTERM over once training starts; Lightning puts its own
handlers back at the end of the run.

A fit that ends normally also ends with `last.ckpt` at its last step: Lightning saves it after
validation, or at an epoch's end, so one stopped by `--trainer.max_steps` between validations
would otherwise keep an earlier step.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class StoppedBySignal(SystemExit):
    """A fit stopped by SIGTERM after an optimizer step; `code` is 128 + the signal's number,
    as a shell reports a process the signal ended."""

    def __init__(self, signum: int, step: int, saved: str | None) -> None:
        super().__init__(128 + signum)
        self.signum, self.step, self.saved = signum, step, saved


class StopOnSigterm(L.Callback):
    """Stop `fit` at the first optimizer-step boundary after SIGTERM, saving `last.ckpt`
    first. Under DDP the processes agree at each step boundary, so all stop at the same step."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._trainer: L.Trainer | None = None
        self._stop: StoppedBySignal | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning registered its handlers (it puts the process's own back at teardown).
        if threading.current_thread() is threading.main_thread():
            self._trainer = trainer
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            launcher = self._trainer.strategy.launcher if self._trainer is not None else None
            if launcher is not None:  # the processes a launcher started stop with this one, as in Lightning
                launcher.kill(signum)
            print(f"Received {signal.Signals(signum).name}: stopping after this optimizer step.", file=sys.stderr,
                  flush=True)
        self.received = signum

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._stop is not None or trainer.fit_loop.epoch_loop._should_accumulate():
            return  # decided already; or mid-step, where its accumulated gradients would be lost
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        saved = save_last(trainer)
        # Raised before the next batch, not here: Lightning logs this step's values after this hook.
        self._stop = StoppedBySignal(self.received or signal.SIGTERM, trainer.global_step, saved)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._stop is not None:
            raise self._stop

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A fit that reached --trainer.max_steps mid-epoch, between validations (an integer
        # --trainer.val_check_interval), saved nothing at its end: its last steps would be lost
        # to test, predict, export and a resume.
        save_last(trainer, at_end=True)


def save_last(trainer: L.Trainer, at_end: bool = False) -> str | None:
    """Write `last.ckpt` (the second checkpoint callback, `--last_checkpoint`) at this step
    unless it holds it already (`at_end`: nor where Lightning saves nothing, as in
    `fast_dev_run`); returns its path, or None where there is none."""
    last = next((c for c in trainer.checkpoint_callbacks[1:2] if isinstance(c, ModelCheckpoint)), None)
    if last is None or (at_end and last._should_skip_saving_checkpoint(trainer)):
        return None
    if last._last_global_step_saved != trainer.global_step:
        last._save_topk_checkpoint(trainer, last._monitor_candidates(trainer))
        last._last_global_step_saved = trainer.global_step
    return last.best_model_path or None
