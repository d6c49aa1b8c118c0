"""Learning-rate schedules for `--model.scheduler`."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine(LambdaLR):
    """Linear warm-up from 0, then cosine decay to `min_ratio` of the peak learning rate.

    Args:
        optimizer: The optimizer whose learning rate is scheduled.
        warmup: Warm-up length: a fraction of all steps when below 1, else a step count.
        total_steps: All optimizer steps; left out, the trainer's estimate is used.
        min_ratio: Final learning rate as a fraction of the peak.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, warmup: float = 0.03, total_steps: int | None = None,
        min_ratio: float = 0.0,
    ) -> None:
        self.warmup, self.total_steps, self.min_ratio = warmup, total_steps, min_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if self.total_steps is None:  # only at construction, before the trainer's estimate is set
            return 0.0 if self.warmup > 0 else 1.0
        warm = self.warmup * self.total_steps if self.warmup < 1 else self.warmup
        if step < warm:
            return step / warm
        progress = min(1.0, (step - warm) / max(1.0, self.total_steps - warm))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def replan(self, total_steps: int) -> str | None:
        """Fit the schedule to `total_steps`, keeping the step it is at, and say what changed
        (None if nothing). A resumed run whose step limit differs from its checkpoint's needs
        it: the restored schedule ends at the old length, and past its end it trains on at
        `min_ratio` of the peak (0 by default)."""
        if total_steps == self.total_steps:
            return None
        old, lr = self.total_steps, self.get_last_lr()[0]
        self.total_steps = total_steps
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        return (f"The checkpoint's learning-rate schedule ends at step {old} and this run trains to step {total_steps}: "
                f"warm-up + cosine re-planned over {total_steps} steps; at step {self.last_epoch} the learning rate "
                f"goes from {lr:.3g} to {self._last_lr[0]:.3g}.")
