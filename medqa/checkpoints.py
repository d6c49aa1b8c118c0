"""Checkpoint files: atomic, durable writes and finding the checkpoint to resume from.

What a checkpoint holds (the LoRA weights, optimizer, scheduler and loop state, never the
frozen base) is the LightningModule's business, in `model.py`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

TMP_SUFFIX = ".tmp"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `X.ckpt` as `X.ckpt.tmp`, syncs it to disk, then renames it over `X.ckpt`.

    A run killed mid-write leaves the previous `X.ckpt` whole (and a stray `.tmp`, which
    resume ignores); after a power loss the rename is never seen without its data.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        with open(tmp, "wb") as f:  # truncates what a killed write left behind
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def find_checkpoint(run_root: Path, which: str) -> Path | None:
    """The newest run's `last.ckpt` (which='last') or its best checkpoint (which='best')."""
    versions = sorted(
        (d for d in run_root.glob("version_*") if d.name[8:].isdigit() and (d / "checkpoints").is_dir()),
        key=lambda d: int(d.name[8:]),
        reverse=True,
    )
    for version in versions:
        ckpts = version / "checkpoints"
        if which == "last" and (ckpts / "last.ckpt").is_file():
            return ckpts / "last.ckpt"
        if which == "best":
            best = [p for p in ckpts.glob("best*.ckpt") if p.is_file()]
            if best:
                return max(best, key=lambda p: p.stat().st_mtime)
    return None
