"""Checkpoint files: atomic, durable writes, finding the checkpoint to resume from, and
whether a checkpoint fits the model built for this run (`misfits`).

What a checkpoint holds (the LoRA weights, optimizer, scheduler and loop state, never the
frozen base) is the LightningModule's business, in `model.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

from medqa.lora import LoraSettings
from medqa.records import parse_json
from medqa.runs import runs

TMP_SUFFIX = ".tmp"


class CheckpointError(ValueError):
    """A checkpoint file medqa cannot use: what the file is, and what was expected."""


class FinishedRun(CheckpointError):
    """`fit --ckpt_path` on a checkpoint whose run has nothing left to train."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `X.ckpt` as a temporary file, syncs it to disk, writes its adapter (`X.adapter/`),
    then renames the file over `X.ckpt`.

    A run killed mid-write leaves the previous `X.ckpt` whole (and a stray `.tmp`, which
    resume ignores); after a power loss the rename is never seen without its data. The
    adapter is published just before the checkpoint and records which weights it holds, so
    a kill between the two renames leaves an adapter that `ensure_adapter` sees is not the
    checkpoint's and rewrites on the next load.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        try:
            with open(tmp, "wb") as f:  # truncates what a killed write left behind
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            if checkpoint.get("state_dict") and "hyper_parameters" in checkpoint:
                save_adapter(checkpoint, adapter_dir(path))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves the previous checkpoint alone
            raise
        _fsync_dir(path.parent)

    def remove_checkpoint(self, path: _PATH) -> None:
        super().remove_checkpoint(path)
        shutil.rmtree(adapter_dir(Path(path)), ignore_errors=True)


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """`AtomicCheckpointIO` in a background thread: the training loop waits only while the
    checkpoint's tensors are copied (Lightning's `AsyncCheckpointIO` clones them on the
    caller's thread), not while 500 MB are written and synced to disk. Saves and removals
    run one at a time, in order, so an old best checkpoint is removed only after the write
    that replaces it; a failed write is raised at the next save or at the end of the run,
    and the end of the run waits for the last write."""

    def __init__(self) -> None:
        super().__init__(AtomicCheckpointIO())

    def remove_checkpoint(self, path: _PATH) -> None:
        self._ensure_setup()

        def remove() -> None:
            try:
                self.checkpoint_io.remove_checkpoint(path)
            except BaseException as e:
                self._error = e

        self._executor.submit(remove)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def load_checkpoint(path: Path, weights_only: bool = True) -> dict[str, Any]:
    """A medqa training checkpoint's contents, or a one-line error saying what the file is
    instead (empty, damaged, code to unpickle, a plain state dict, another program's)."""
    import pickle

    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint; resume from another one or start afresh")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if weights_only and "Unsupported global" in str(e):  # a class or function to import: code
            raise CheckpointError(
                f"{path} holds Python objects that loading would execute, and medqa's checkpoints hold only "
                "tensors and plain values; pass --weights_only false only for a file you trust") from None
        raise CheckpointError(f"{path} is damaged or not a PyTorch checkpoint (unreadable pickle data)") from None
    except Exception as e:  # torch.load raises many types for a damaged file (EOFError, RuntimeError, ...)
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path} is damaged or not a PyTorch checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a medqa training checkpoint")
    if "state_dict" not in checkpoint:
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            raise CheckpointError(f"{path} is a plain state dict ({len(checkpoint)} tensors), not a medqa training "
                                  "checkpoint (no settings, optimizer or loop state); medqa writes .ckpt files under "
                                  "logs/NAME/fit-N/checkpoints")
        raise CheckpointError(f"{path} is not a Lightning checkpoint: it has no 'state_dict' "
                              f"(keys: {', '.join(map(str, list(checkpoint)[:6]))})")
    if not checkpoint["state_dict"] or "hyper_parameters" not in checkpoint:
        raise CheckpointError(f"{path} is a Lightning checkpoint but not medqa's (no LoRA weights or no model settings in it)")
    for key, kind in STRUCTURE.items():
        value = checkpoint.get(key, kind())
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{path}: its {key!r} is a {type(value).__name__}, not a {kind.__name__} as medqa "
                                  "saves it: the file was damaged or edited; resume from another checkpoint")
    if not all(isinstance(v, torch.Tensor) for v in checkpoint["state_dict"].values()):
        raise CheckpointError(f"{path}: its 'state_dict' holds values that are not tensors: the file was damaged or edited")
    for name, state in checkpoint["loops"].items():
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: its loop state {name!r} is a {type(state).__name__}, not a mapping: "
                                  "the file was damaged or edited")
    return checkpoint


STRUCTURE = {"state_dict": dict, "hyper_parameters": dict, "global_step": int, "epoch": int, "loops": dict,
             "optimizer_states": list, "lr_schedulers": list, "callbacks": dict, "datamodule_hyper_parameters": dict,
             "QADataModule": dict, "medqa_base": dict}
"""The type of each part of a checkpoint as Lightning and medqa save it, checked on load."""


def adapter_dir(checkpoint: Path) -> Path:
    """Where a checkpoint's adapter is written in PEFT's format: `X.ckpt` -> `X.adapter/`."""
    return checkpoint.with_suffix(".adapter")


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().contiguous().cpu()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


ADAPTER_FILE = "adapter_model.safetensors"
STAMP_KEY = "medqa_checkpoint"
"""Metadata of the adapter's safetensors file: the checkpoint weights it was written from."""


def save_adapter(checkpoint: dict[str, Any], out: Path) -> None:
    """Write the checkpoint's LoRA weights as a PEFT adapter (`adapter_config.json` and
    `adapter_model.safetensors`) that `PeftModel.from_pretrained(base, out)` loads, synced to
    disk and swapped in whole. Only paths of its own are made and removed beside `out`."""
    from safetensors.torch import save_file

    hp = checkpoint["hyper_parameters"]
    # medqa's names: "model." + PEFT's, with the adapter name; PEFT saves without either.
    weights = {
        key.removeprefix("model.").replace(".default.", "."): tensor.detach().contiguous().cpu()
        for key, tensor in checkpoint["state_dict"].items()
    }
    lora = LoraSettings.from_hparams(hp)
    layers = sorted({int(m) for key in weights for m in re.findall(r"\.layers\.(\d+)\.", key)}) if lora.layers else None
    config = lora.peft_config(base_model=hp.get("pretrained"), layers=layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=TMP_SUFFIX, dir=out.parent))
    try:
        config.save_pretrained(tmp)
        save_file(weights, tmp / ADAPTER_FILE,
                  metadata={"format": "pt", STAMP_KEY: weights_digest(checkpoint["state_dict"])})
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def adapter_matches(checkpoint: dict[str, Any], adapter: Path) -> bool:
    """Whether `adapter` holds exactly the checkpoint's LoRA weights."""
    from safetensors import safe_open

    try:
        with safe_open(str(adapter / ADAPTER_FILE), framework="pt") as f:
            stamp = (f.metadata() or {}).get(STAMP_KEY)
    except Exception:  # missing, damaged, or written by something else
        return False
    return stamp == weights_digest(checkpoint["state_dict"]) and (adapter / "adapter_config.json").is_file()


def ensure_adapter(checkpoint: dict[str, Any], path: Path) -> bool:
    """Rewrite the adapter beside checkpoint `path` when it is missing or not the
    checkpoint's (a run killed between the two renames of a save). True if rewritten."""
    adapter = adapter_dir(path)
    if adapter_matches(checkpoint, adapter):
        return False
    save_adapter(checkpoint, adapter)
    return True


SCORE = re.compile(r"-(f1_|acc)(\d+(?:\.\d+)?)")
"""The monitored score in a best checkpoint's name: val/macro_f1 (`best-epoch{epoch}-step{step}-f1_{val/macro_f1:.4f}`),
or val/acc (`...-acc0.9400`) in runs from before medqa monitored macro-F1."""


def find_checkpoint(run_root: Path, which: str, compatible: Callable[[Path], bool] | None = None,
                    newest_fit: bool = False) -> Path | None:
    """The `last.ckpt` of the newest run that `compatible` does not refuse (which='last';
    with `newest_fit`, that fit run's alone: a resume never continues an earlier run because
    a later one stopped before its first checkpoint; a run that recorded no settings is not
    refused), or the best checkpoint by the score in its name over the runs that
    `compatible` accepts (which='best'; the newest on ties). Scores compare within one
    metric: a checkpoint named by val/macro_f1 beats one named by the val/acc of earlier
    medqa versions."""
    candidates = []
    for order, run in enumerate(runs(run_root)):
        ckpts = run / "checkpoints"
        if which == "last":
            other = compatible is not None and (run / "hparams.yaml").is_file() and not compatible(run)
            if other or (newest_fit and not run.name.startswith("fit-")):
                continue
            if (ckpts / "last.ckpt").is_file():
                return ckpts / "last.ckpt"
            if newest_fit:
                return None  # the newest fit run has none: never an earlier run's
        if which == "best" and ckpts.is_dir() and (compatible is None or compatible(run)):
            for path in ckpts.glob("best*.ckpt"):
                score = SCORE.search(path.stem)
                if path.is_file() and score:
                    candidates.append((score.group(1) == "f1_", float(score.group(2)), -order, path.stat().st_mtime, path))
    return max(candidates)[-1] if candidates else None


def finished_run(checkpoint: dict[str, Any], max_epochs: int | None, max_steps: int | None) -> str | None:
    """Why a checkpoint's run has nothing left to train under these limits, or None."""
    step, epochs = checkpoint.get("global_step", 0), checkpoint.get("loops", {})
    for key in ("fit_loop", "epoch_progress", "current", "processed"):  # checked as it is read: untrusted
        epochs = epochs.get(key, 0) if isinstance(epochs, dict) else 0
    if not isinstance(epochs, int):
        raise CheckpointError(f"the checkpoint's count of finished epochs is a {type(epochs).__name__}, not a number")
    if max_steps is not None and max_steps > 0 and step >= max_steps:
        return f"step {step} of --trainer.max_steps {max_steps}"
    if max_epochs is None and (max_steps is None or max_steps == -1):
        max_epochs = 1000  # Lightning's default when neither is set
    if max_epochs is not None and max_epochs >= 0 and epochs >= max_epochs:
        return f"{epochs} of --trainer.max_epochs {max_epochs} epochs done"
    return None


def base_fingerprint(model: Any, pretrained: str) -> dict[str, Any]:
    """What identifies a PEFT model's base: its name, architecture and a digest of weights no
    LoRA touches (the input embeddings' first rows and the final norm, rounded to bfloat16
    so 4-bit, 16-bit and CPU loads of one model agree)."""
    base = model.get_base_model()
    config = base.config
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    digest = hashlib.sha256()
    norm = getattr(getattr(base, "model", base), "norm", None)
    for tensor in (base.get_input_embeddings().weight[:64], *([norm.weight] if norm is not None else [])):
        digest.update(tensor.detach().to(torch.bfloat16).float().cpu().numpy().tobytes())
    return {"name": Path(pretrained.rstrip("/")).name, **{k: getattr(config, k, None) for k in keys},
            "weights_sha256": digest.hexdigest()}


def misfits(checkpoint: dict[str, Any], lora: LoraSettings, answers: dict[str, Any], base: dict[str, Any],
            trainable: dict[str, torch.Size]) -> list[str]:
    """What keeps `checkpoint` (untrusted) from continuing a model with these LoRA settings,
    answer tokens (`labels`, `label_ids`), base fingerprint and trainable weight shapes,
    one entry a difference; empty where it fits."""
    saved_hp = checkpoint.get("hyper_parameters", {})
    differs = lora.differences(saved_hp)
    theirs = saved_hp.get("answer_tokens")
    if isinstance(theirs, dict):  # saved since medqa had a second task
        answer = [f"answer {k}: checkpoint {theirs[k]!r}, this run {v!r}" for k, v in answers.items()
                  if k in theirs and theirs[k] != v]
        if answer:  # the checkpoint answers another task, or in another tokenizer
            answer[-1] += " (pass the checkpoint's --data.task and base model)"
        differs += answer
    saved_base = checkpoint.get("medqa_base", {})
    differs += [f"base model {k}: checkpoint {saved_base[k]!r}, this run {base[k]!r}"
                for k in base if k in saved_base and saved_base[k] != base[k]]
    return differs + weight_misfits(checkpoint["state_dict"], trainable)


def weight_misfits(saved: dict[str, torch.Tensor], trainable: dict[str, torch.Size]) -> list[str]:
    """What keeps saved LoRA weights from loading into a model's trainable weights."""
    differs = []
    if set(saved) != set(trainable):
        only_ckpt, only_model = sorted(set(saved) - set(trainable)), sorted(set(trainable) - set(saved))
        differs.append(f"{len(only_ckpt)} weights only in the checkpoint (e.g. {only_ckpt[:2]}), "
                       f"{len(only_model)} only in the model (e.g. {only_model[:2]})")
    else:
        shapes = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(trainable[k])}"
                  for k, v in saved.items() if trainable[k] != v.shape]
        if shapes:
            differs.append(f"{len(shapes)} weights differ in shape (e.g. {shapes[0]})")
    return differs


def starting_weights(path: Path, lora: LoraSettings, base: dict[str, Any],
                     trainable: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The LoRA weights a new run starts from (`--model.init_adapter`): a medqa checkpoint
    (its LoRA weights alone: no optimizer, schedule or step) or a PEFT adapter folder
    (`export`'s). Refused, naming what differs, unless they were trained on this base
    (its fingerprint, or a PEFT folder's base name) with this LoRA shape."""
    where = f"--model.init_adapter {path}"
    if path.is_dir():
        from safetensors.torch import load_file

        from safetensors import SafetensorError

        try:
            config = parse_json((path / "adapter_config.json").read_text(), f"{where}: adapter_config.json", CheckpointError)
            weights = load_file(str(path / ADAPTER_FILE))
        except CheckpointError:
            raise
        except (OSError, ValueError, SafetensorError) as e:
            raise CheckpointError(f"{where}: not a PEFT adapter folder (adapter_config.json and {ADAPTER_FILE}): "
                                  f"{type(e).__name__}: {e}") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{where}: adapter_config.json is not an object")
        layers = config.get("layers_to_transform")
        hparams = {"lora_r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
                   "target_modules": config.get("target_modules"), "use_rslora": config.get("use_rslora", False),
                   "lora_layers": len(layers) if isinstance(layers, list) else 1 if isinstance(layers, int) else None,
                   "lora_dropout": lora.dropout}  # dropout does not shape the weights
        named = str(config.get("base_model_name_or_path") or "")
        differs = lora.differences(hparams)
        if Path(named.rstrip("/")).name != base["name"]:
            differs.append(f"base model: adapter {named!r}, this run {base['name']!r}")
        # PEFT's names lack medqa's "model." and the adapter's name
        weights = {"model." + k.replace(".lora_A.weight", ".lora_A.default.weight")
                   .replace(".lora_B.weight", ".lora_B.default.weight"): v for k, v in weights.items()}
        differs += weight_misfits(weights, trainable)
    else:  # a resume's checks, the answer tokens apart: an adapter may start another task
        checkpoint = load_checkpoint(path, weights_only=True)
        weights, differs = checkpoint["state_dict"], misfits(checkpoint, lora, {}, base, trainable)
    if differs:
        raise CheckpointError(f"{where} does not fit this run's model: " + "; ".join(differs))
    return weights
