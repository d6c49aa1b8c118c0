"""`python -m medqa {fit,validate,test,predict}`: the LightningCLI with medqa's defaults
(TensorBoard under logs/, best-by-val/acc and last checkpoints, learning-rate monitor,
prediction files) and the links that keep each value in one place.

Three more commands work on what those produce: `evaluate` (official scoring of a
prediction file), `cv` (the 10-fold cross-validation of PQA-L) and `export` (the adapter
in PEFT's format, optionally merged).
"""

from __future__ import annotations

import importlib
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from medqa.backends import BackendError
from medqa.checkpoints import CheckpointError, FinishedRun, adapter_dir, ensure_adapter, find_checkpoint, load_checkpoint
from medqa.data import DataError
from medqa.data import PubMedQADataModule
from medqa.model import CheckpointMismatch, MedQALoRA
from medqa.predictions import PredictionWriter
from medqa.speed import SpeedMonitor

LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"


class MedQACLI(LightningCLI):
    """LightningCLI for medqa: see `python -m medqa fit --help`."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.pretrained", "data.pretrained")
        parser.link_arguments("data.max_length", "model.max_length")
        # Two checkpoint callbacks: Lightning's save_last writes last.ckpt only when a top-k
        # checkpoint was saved at the same step, so with a monitor it would not follow the run.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-epoch{epoch}-step{step}-acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "last_checkpoint.filename": "last",  # rewritten at every save: what resume reads
                "last_checkpoint.save_top_k": 1,
                "last_checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(SpeedMonitor, "speed")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_argument("--generate_rationale", type=bool, default=False,
                            help="predict: after each scored decision, generate a short explanation "
                                 "(written to predictions.jsonl; predictions.json is unchanged)")
        parser.add_argument("--rationale_tokens", type=int, default=64, help="longest explanation, in tokens")
        parser.link_arguments(("generate_rationale", "rationale_tokens"), "model.rationale_tokens",
                              compute_fn=lambda on, n: n if on else 0)

    def _parse_ckpt_path(self) -> None:
        """Lightning would overwrite this run's model settings, command line included, with
        those saved in the checkpoint. medqa keeps the settings given and refuses a
        checkpoint that does not fit them, naming the difference (`MedQALoRA.on_load_checkpoint`)."""

    def before_instantiate_classes(self) -> None:
        """Load checkpoints weights-only unless told otherwise; resolve `--ckpt_path
        last|best` from the run directories on disk, and let a resumed fit write its curves
        into the run it resumes. A checkpoint is read once here, so a damaged or foreign
        file is refused in one line before any model is built, and its adapter is rewritten
        if a save was interrupted between the two."""
        config = self.config[self.subcommand]
        if config.get("weights_only") is None:
            # medqa's checkpoints hold only tensors and plain values: load them without
            # unpickling code. Pass --weights_only false for a checkpoint that needs more.
            config.weights_only = True
        if config.get("ckpt_path") in ("last", "best"):
            self._resolve_ckpt_path(config)
        if config.get("ckpt_path") is not None:
            path = Path(config.ckpt_path)
            checkpoint = load_checkpoint(path, config.weights_only)
            if self.subcommand == "fit":
                finished = finished_run(checkpoint, config.trainer.max_epochs, config.trainer.max_steps)
                if finished:
                    raise FinishedRun(
                        f"{path} comes from a run that finished ({finished}): resuming it would train nothing. "
                        "Start a new run (leave out --ckpt_path), or raise --trainer.max_epochs / "
                        "--trainer.max_steps to train it further")
            if rank_zero_only.rank == 0 and ensure_adapter(checkpoint, path):
                rank_zero_info(f"Rewrote {adapter_dir(path)}: it was missing or held other weights than {path.name} "
                               "(a save was interrupted).")

    def _resolve_ckpt_path(self, config: Any) -> None:
        logger = config.trainer.logger
        if not (hasattr(logger, "class_path") and logger.class_path == LOGGER):
            return  # another logger: leave 'last' to Lightning
        args = logger.init_args
        root = Path(args.save_dir) / (args.name or "")
        found = find_checkpoint(root, config.ckpt_path)
        if found is None:
            if self.subcommand == "fit" and config.ckpt_path == "last":
                rank_zero_info(f"--ckpt_path last: no last.ckpt under {root}; starting a new run.")
                config.ckpt_path = None
                return
            raise CheckpointError(f"--ckpt_path {config.ckpt_path}: no such checkpoint under {root}/version_*/checkpoints")
        rank_zero_info(f"--ckpt_path {config.ckpt_path} -> {found}")
        newest = max((d for d in root.glob("version_*") if d.name[8:].isdigit()), key=lambda d: int(d.name[8:]))
        if newest != found.parent.parent:
            rank_zero_info(f"Note: that is an earlier run's checkpoint ({found.parent.parent.name}); the newest run, "
                           f"{newest.name}, has none. Pass --ckpt_path PATH to choose another.")
        config.ckpt_path = str(found)
        if self.subcommand == "fit":
            version = found.parent.parent.name
            args.version = version
            # Keep the first run's config.yaml; record the resumed run's beside it.
            n = len(list(found.parent.parent.glob("config*.yaml")))
            self.save_config_kwargs["config_filename"] = f"config.resume{n}.yaml"


def finished_run(checkpoint: dict[str, Any], max_epochs: int | None, max_steps: int | None) -> str | None:
    """Why a checkpoint's run has nothing left to train under these limits, or None."""
    step = checkpoint.get("global_step", 0)
    epochs = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {}).get("processed", 0)
    if max_steps is not None and max_steps > 0 and step >= max_steps:
        return f"step {step} of --trainer.max_steps {max_steps}"
    if max_epochs is None and (max_steps is None or max_steps == -1):
        max_epochs = 1000  # Lightning's default when neither is set
    if max_epochs is not None and max_epochs >= 0 and epochs >= max_epochs:
        return f"{epochs} of --trainer.max_epochs {max_epochs} epochs done"
    return None


COMMANDS = {"evaluate": "medqa.evaluate", "cv": "medqa.crossval", "export": "medqa.export"}
"""Commands beside Lightning's, each a module with its own `main(argv)`."""

USER_ERRORS = (DataError, CheckpointError, CheckpointMismatch, BackendError, FloatingPointError)
"""What a user can act on: printed as one line (set MEDQA_DEBUG=1 for the traceback)."""


def main(args: list[str] | None = None) -> Any:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] in (["-h"], ["--help"]):
        print("medqa commands: fit, validate, test, predict (below), and evaluate, cv, export "
              "(python -m medqa evaluate --help, ...).\n")
    if argv and argv[0] in COMMANDS:
        command = importlib.import_module(COMMANDS[argv[0]])
        run = partial(command.main, argv[1:])
        expected: tuple[type[BaseException], ...] = (ValueError, OSError, *USER_ERRORS)
    else:
        run = partial(
            MedQACLI,
            MedQALoRA,
            PubMedQADataModule,
            args=args,
            trainer_defaults={
                "logger": {"class_path": LOGGER, "init_args": {"save_dir": "logs", "name": "medqa", "default_hp_metric": False}},
                "plugins": [{"class_path": "medqa.checkpoints.AtomicCheckpointIO"}],
            },
            save_config_kwargs={"config_filename": "config.yaml"},
        )
        expected = USER_ERRORS
    if args is not None or os.environ.get("MEDQA_DEBUG") == "1":  # from Python, or asked for: the traceback
        return run()
    try:
        return run()
    except expected as e:  # medqa's errors say what and where
        sys.exit(f"medqa {argv[0] if argv else ''}: error: {e}")
