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
