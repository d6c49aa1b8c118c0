"""`--model.ensemble CV_DIR` (`test`, `predict`, `validate`, `ask`): score with the best adapters
of `cv`'s ten folds together, their label probabilities averaged.

Each fold's adapter trained on 450 of PQA-L's 500 training questions, so together they have
seen every one nine times over in ten different orders; averaging their answers cancels part
of what each got from its own order and dev fold. The base is loaded once: each batch runs
once per fold with that fold's LoRA weights copied in (LoRA's weights are a small share of a
step's work), so scoring costs ten times a single adapter's.

Every fold's checkpoint is checked as a resume is (LoRA shape, base fingerprint, label words
and their token ids) before anything is scored: a fold of another run, base or task is refused
naming the fold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medqa.checkpoints import CheckpointError, find_checkpoint, load_checkpoint, misfits
from medqa.lora import LoraSettings

FOLDS = range(10)
"""`cv`'s folds, each in CV_DIR/fold{k} (`medqa.crossval`, which imports the CLI, so not imported here)."""


def fold_checkpoints(cv_dir: Path) -> list[Path]:
    """Each fold's best checkpoint under `cv_dir` (as `cv` and `--ckpt_path best` choose it),
    or a `CheckpointError` naming the folds that have none."""
    if not cv_dir.is_dir():
        raise CheckpointError(f"--model.ensemble {cv_dir}: no such folder (a `python -m medqa cv --cv_dir` folder)")
    found = {fold: find_checkpoint(cv_dir / f"fold{fold}", "best") for fold in FOLDS}
    missing = [f"fold{fold}" for fold, path in found.items() if path is None]
    if missing:
        raise CheckpointError(f"--model.ensemble {cv_dir}: {', '.join(missing)} have no best checkpoint; run "
                              f"`python -m medqa cv --cv_dir {cv_dir}` with the same settings to finish them")
    return [path for path in found.values() if path is not None]


class Ensemble:
    """The folds' LoRA weights, checked, and scoring with each in turn."""

    def __init__(self, cv_dir: Path, lora: LoraSettings, answers: dict[str, Any], base: dict[str, Any],
                 trainable: dict[str, torch.nn.Parameter]) -> None:
        self.trainable = trainable
        shapes = {name: p.shape for name, p in trainable.items()}
        self.members: list[dict[str, Tensor]] = []
        for path in fold_checkpoints(cv_dir):
            checkpoint = load_checkpoint(path, weights_only=True)
            differs = misfits(checkpoint, lora, answers, base, shapes)
            if differs:
                raise CheckpointError(f"--model.ensemble: {path} does not fit this run's model: " + "; ".join(differs))
            self.members.append({name: checkpoint["state_dict"][name].to(p.device, p.dtype) for name, p in trainable.items()})

    def forward(self, score: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """(mean loss, log of the mean label probabilities) of `score()` run once per fold."""
        losses, log_probs = [], []
        for weights in self.members:
            with torch.no_grad():
                for name, p in self.trainable.items():
                    p.copy_(weights[name])
            loss, logp = score()
            losses.append(loss)
            log_probs.append(logp.log_softmax(-1))  # a label word of several tokens scores unnormalized
        mean_logp = torch.logsumexp(torch.stack(log_probs), 0) - math.log(len(log_probs))
        return torch.stack(losses).mean(), mean_logp
