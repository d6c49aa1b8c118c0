"""Checkpoint files: atomic, durable writes and finding the checkpoint to resume from.

What a checkpoint holds (the LoRA weights, optimizer, scheduler and loop state, never the
frozen base) is the LightningModule's business, in `model.py`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from medqa.model import LLAMA_LORA_TARGETS

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
        _fsync_dir(path.parent)
        if checkpoint.get("state_dict") and "hyper_parameters" in checkpoint:
            save_adapter(checkpoint, adapter_dir(path))

    def remove_checkpoint(self, path: _PATH) -> None:
        super().remove_checkpoint(path)
        shutil.rmtree(adapter_dir(Path(path)), ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def adapter_dir(checkpoint: Path) -> Path:
    """Where a checkpoint's adapter is written in PEFT's format: `X.ckpt` -> `X.adapter/`."""
    return checkpoint.with_suffix(".adapter")


def save_adapter(checkpoint: dict[str, Any], out: Path) -> None:
    """Write the checkpoint's LoRA weights as a PEFT adapter (`adapter_config.json` and
    `adapter_model.safetensors`) that `PeftModel.from_pretrained(base, out)` loads."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    hp = checkpoint["hyper_parameters"]
    # medqa's names: "model." + PEFT's, with the adapter name; PEFT saves without either.
    weights = {
        key.removeprefix("model.").replace(".default.", "."): tensor.detach().contiguous().cpu()
        for key, tensor in checkpoint["state_dict"].items()
    }
    config = LoraConfig(
        r=hp["lora_r"], lora_alpha=hp["lora_alpha"], lora_dropout=hp.get("lora_dropout", 0.0),
        target_modules=hp.get("target_modules") or LLAMA_LORA_TARGETS, use_rslora=hp.get("use_rslora", False),
        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=hp.get("pretrained"),
    )
    tmp = out.with_name(out.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    save_file(weights, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


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
