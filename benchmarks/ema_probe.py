"""An exponential moving average of the LoRA weights, as a probe for issue 40's sweep (not a
medqa option: it keeps no state for an exact resume). Validation scores the averaged weights,
so the checkpoints saved at validation (best and last) hold what was scored; training goes on
with its own weights from the next epoch.

    python benchmarks/sweep.py ... --run "ema=--trainer.callbacks+=benchmarks.ema_probe.AdapterEMA \\
        --trainer.callbacks.decay 0.98"
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class AdapterEMA(L.Callback):
    def __init__(self, decay: float = 0.98) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params: list[torch.Tensor] = []
        self.average: list[torch.Tensor] = []
        self.held: list[torch.Tensor] | None = None  # the training weights while the average is in
        self.step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.params = [p for p in pl_module.parameters() if p.requires_grad]
        self.average = [p.detach().float().clone() for p in self.params]
        self.step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:  # no optimizer step in this batch (accumulation)
            return
        self.step = trainer.global_step
        for average, p in zip(self.average, self.params):
            average.lerp_(p.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.params or self.held is not None:
            return
        self.held = [p.detach().clone() for p in self.params]
        for average, p in zip(self.average, self.params):
            p.copy_(average)

    @torch.no_grad()
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.held is not None:
            for held, p in zip(self.held, self.params):
                p.copy_(held)
            self.held = None
