"""`python -m medqa {fit,validate,test,predict}`: the LightningCLI with medqa's defaults
(TensorBoard under logs/, best-by-val/macro_f1 and last checkpoints, learning-rate monitor,
prediction files) and the links that keep each value in one place.

Five more commands work on what those produce: `evaluate` (official scoring of a
prediction file), `compare` (two prediction files with bootstrap intervals), `cv` (the
10-fold cross-validation of PQA-L), `export` (the adapter in PEFT's format, optionally
merged) and `ask` (one question).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from medqa import hints
from medqa.backends import BackendError
from medqa.lora import LoraSettings
from medqa.bases import BaseModelError
from medqa.checkpoints import (CheckpointError, FinishedRun, adapter_dir, ensure_adapter, find_checkpoint, finished_run,
                               load_checkpoint)
from medqa.data import QADataModule
from medqa.memory import TrainingOutOfMemory
from medqa.messages import MedQAParser, explain, quiet
from medqa.model import CheckpointMismatch, MedQALoRA, SettingsError
from medqa.folders import CacheError
from medqa.predictions import PartialPredictions, PredictionWriter
from medqa.records import DataError
from medqa.results import write_json
from medqa.runs import NEW_RUNS, claim_run, discard_unused_runs, drop_empty_event_files, resuming, run_fits, runs
from medqa.speed import SpeedMonitor, busy_note
from medqa.stopping import StopOnSigterm, StoppedBySignal

LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"
TRAINER_DEFAULTS = {
    "logger": {"class_path": LOGGER, "init_args": {"save_dir": "logs", "name": "medqa", "default_hp_metric": False}},
    "plugins": [{"class_path": "medqa.checkpoints.BackgroundCheckpointIO"}],
}


class MedQACLI(LightningCLI):
    """LightningCLI for medqa: see `python -m medqa fit --help`."""

    claims_run = True  # a command that runs claims its run directory (logs/NAME/fit-N) as it starts

    def __init__(self, *args: Any, print_next: bool = True, **kwargs: Any) -> None:
        self._argv = kwargs.get("args")
        self.print_next = print_next  # what to run next, after fit; cv prints its own, once
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.pretrained", "data.pretrained")
        parser.link_arguments("data.max_length", "model.max_length")
        # The label words and their token ids exist once the data has its tokenizer: handed
        # to the model as both are built, never read back from the data by the model.
        parser.link_arguments("data.answer_tokens", "model.answer_tokens", apply_on="instantiate")
        # Two checkpoint callbacks: Lightning's save_last writes last.ckpt only when a top-k
        # checkpoint was saved at the same step, so with a monitor it would not follow the run.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                # Macro-F1, not accuracy: on PQA-L's 50 dev questions a model that answers "yes" to
                # everything ties the best accuracy (0.54) and wins the tie as the earlier checkpoint;
                # its macro-F1 is 0.23. A tie on macro-F1 keeps the earlier checkpoint.
                "checkpoint.monitor": "val/macro_f1",
                "checkpoint.mode": "max",
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-epoch{epoch}-step{step}-f1_{val/macro_f1:.4f}",
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
        parser.add_argument("--threads", type=int | None, default=None,
                            help="CPU threads for torch's kernels; results on the CPU depend on it, so the demo "
                                 "fixes it to give the same numbers on every machine")
        parser.link_arguments(("generate_rationale", "rationale_tokens"), "model.rationale_tokens",
                              compute_fn=lambda on, n: n if on else 0)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        """`add_arguments_to_parser` is not told the subcommand; `--test_after_fit` is fit's alone."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "fit":
            parser.add_argument("--test_after_fit", type=Literal["best", "last"] | None, default=None,
                                help="score the test split with the run's best or last checkpoint at the end of "
                                     "fit, in the same process (no second start and model load); the scores go "
                                     "to the run's metrics.json")
        return parser

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
        if str(config.trainer.get("accelerator")) in ("gpu", "cuda") and not torch.cuda.is_available():
            # Before the data loads its tokenizer, which for a GPU config is a hub model's.
            raise MisconfigurationException(f"--trainer.accelerator {config.trainer.accelerator}: no CUDA GPU is visible.")
        if config.get("threads") is not None:
            if config.threads < 1:
                raise SettingsError(f"--threads must be 1 or more, got {config.threads}")
            torch.set_num_threads(config.threads)
            if (note := busy_note(config.threads, os.getloadavg()[0], len(os.sched_getaffinity(0)))) is not None:
                rank_zero_info(f"Note: {note}")
        accumulate = config.trainer.get("accumulate_grad_batches")
        if accumulate is not None and accumulate < 1:
            raise SettingsError(f"--trainer.accumulate_grad_batches must be 1 or more, got {accumulate}")
        if config.get("weights_only") is None:
            # medqa's checkpoints hold only tensors and plain values: load them without
            # unpickling code. Pass --weights_only false for a checkpoint that needs more.
            config.weights_only = True
        if config.get("ckpt_path") in ("last", "best"):
            self._resolve_ckpt_path(config)
        experiment = self._experiment(config)
        if experiment is not None and experiment[0].version is None and not config.trainer.get("fast_dev_run"):
            # logs/NAME/fit-3, test-4, ...: created here, so commands started at once never share one
            experiment[0].version, claimed = claim_run(experiment[1], self.subcommand, self.claims_run)
            if claimed:
                NEW_RUNS.append(experiment[1] / experiment[0].version)
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

    @staticmethod
    def _experiment(config: Any) -> tuple[Any, Path] | None:
        """(the TensorBoard logger's settings, the experiment directory logs/NAME), or None
        with another logger."""
        logger = config.trainer.logger
        if not (hasattr(logger, "class_path") and logger.class_path == LOGGER):
            return None
        for key in ("name", "version"):  # the run's folders stay inside save_dir
            value = logger.init_args.get(key)
            if isinstance(value, str) and (Path(value).is_absolute() or ".." in Path(value).parts):
                raise SettingsError(f"--trainer.logger.init_args.{key} {value!r}: runs are written under save_dir "
                                    f"({logger.init_args.save_dir}); give a name inside it, without '..' or a leading '/'")
        return logger.init_args, Path(logger.init_args.save_dir) / (logger.init_args.name or "")

    def _resolve_ckpt_path(self, config: Any) -> None:
        experiment = self._experiment(config)
        if experiment is None:
            return  # another logger: leave 'last' to Lightning
        args, root = experiment
        model = config.model
        lora = LoraSettings.from_hparams(model)

        passed: list[str] = []

        def compatible(run: Path) -> bool:
            fits, why = run_fits(run, model.pretrained, config.data, lora, check_lora=config.ckpt_path == "best",
                                 check_settings=self.subcommand != "fit" or config.ckpt_path == "best")
            if why:
                passed.append(f"{run.name} ({why})")
            return fits

        found = find_checkpoint(root, config.ckpt_path, compatible, newest_fit=self.subcommand == "fit")
        if found is None:
            if self.subcommand == "fit" and config.ckpt_path == "last":
                rank_zero_info(f"--ckpt_path last: the newest fit run under {root} has no last.ckpt (or there is none); "
                               "starting a new run. To continue an earlier run, pass its checkpoint as --ckpt_path PATH.")
                config.ckpt_path = None
                return
            kind = ("last.ckpt" if config.ckpt_path == "last" else "best checkpoint") + \
                " of a run with this command's task and model settings"
            raise CheckpointError(f"--ckpt_path {config.ckpt_path}: no {kind} under {root}/*/checkpoints; "
                                  "train one with `fit`, or pass --ckpt_path PATH")
        which = ("the newest run's last.ckpt" if config.ckpt_path == "last" else "the best val/macro_f1") + \
            f" among runs of {model.pretrained} on {config.data.task}" + ("" if config.ckpt_path == "last" else
                                                                          " with this LoRA shape")
        rank_zero_info(f"--ckpt_path {config.ckpt_path} -> {found} (run {found.parent.parent.name}: {which})")
        if passed:
            rank_zero_info(f"Note: passed over runs trained with another target or reasoning setting than this "
                           f"command's (--data.target {config.data.target}, --data.reasoning {config.data.reasoning}): "
                           + ", ".join(passed))
        newest = runs(root)[0]
        if config.ckpt_path == "last" and newest != found.parent.parent:
            rank_zero_info(f"Note: {found.parent.parent.name} is not the newest run under {root} ({newest.name} is another "
                           "task or base, or has no checkpoint). Pass --ckpt_path PATH to choose another.")
        config.ckpt_path = str(found)
        if self.subcommand == "fit":
            args.version = found.parent.parent.name
            resuming(found.parent.parent)  # a refused resume leaves it as it was
            # Keep the first run's config.yaml; record the resumed run's beside it.
            n = len(list(found.parent.parent.glob("config*.yaml")))
            self.save_config_kwargs["config_filename"] = f"config.resume{n}.yaml"

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        """Lightning's own switches turn medqa's callbacks off with them: no checkpoints with
        `enable_checkpointing false`, no learning-rate curve and no config.yaml without a logger."""
        notes = []
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
            notes.append("--trainer.enable_checkpointing false: no checkpoint will be kept")
        if config.get("logger") in (False, None) and not config.get("fast_dev_run"):
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
            self.save_config_callback = None
            notes.append("--trainer.logger false: no TensorBoard curves, learning-rate curve or config.yaml")
        for note in notes:
            rank_zero_info(f"Note: {note}.")
        return super()._instantiate_trainer(config, [*callbacks, StopOnSigterm()])

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except StoppedBySignal as stop:
            if self.trainer.is_global_zero:
                print(f"medqa {subcommand}: stopped by {signal.Signals(stop.signum).name} after step {stop.step}; "
                      + (f"saved {stop.saved}. Continue with: {hints.interrupted(self.argv)}" if stop.saved
                         else "no checkpoint was saved."), file=sys.stderr)
            raise
        except SIGTERMException:  # Lightning's, before training starts or outside fit: nothing to save
            print(f"medqa {subcommand}: stopped by SIGTERM before it finished; nothing was saved.", file=sys.stderr)
            sys.exit(128 + signal.SIGTERM)
        except SystemExit:  # Lightning's answer to Ctrl-C
            if subcommand == "fit" and self.trainer.interrupted and self.trainer.is_global_zero:
                last = self.trainer.checkpoint_callbacks[1:2]
                saved = last[0].best_model_path if last else ""
                print(f"\nStopped. Continue from {saved} with:\n  {hints.interrupted(self.argv)}" if saved else
                      "\nStopped before the first checkpoint: nothing to continue from.", file=sys.stderr)
            raise

    @property
    def argv(self) -> list[str]:
        """This command's arguments after the subcommand, as given."""
        return list(self._argv[1:]) if self._argv is not None else sys.argv[2:]

    def after_fit(self) -> None:
        """Where the run went and what to do next; then the test split, if asked."""
        trainer = self.trainer
        log_dir = trainer.log_dir  # collective: every process asks
        callbacks = trainer.checkpoint_callbacks
        best, last = (callbacks + [None, None])[:2]
        which = self.config.fit.get("test_after_fit")
        if trainer.is_global_zero and self.print_next:
            print(hints.fit_summary(trainer, self.argv, log_dir, best, last, self.model.pretrained, tested=which is not None))
        if which is not None:
            path = getattr(best if which == "best" else last, "best_model_path", "")
            if not path:
                raise SettingsError(f"--test_after_fit {which}: the run saved no {which} checkpoint"
                                    + (" (it never validated: check --trainer.limit_val_batches and "
                                       "check_val_every_n_epoch), use --test_after_fit last" if which == "best" else ""))
            rank_zero_info(f"--test_after_fit {which}: scoring the test split with {path}")
            trainer.test(self.model, datamodule=self.datamodule, ckpt_path=path, weights_only=True)
            self._write_metrics(path)

    def after_validate(self) -> None:
        self._write_metrics(self.config.validate.get("ckpt_path"))

    def after_test(self) -> None:
        self._write_metrics(self.config.test.get("ckpt_path"))

    def after_predict(self) -> None:
        log_dir = self.trainer.log_dir  # collective: every process asks
        if self.trainer.is_global_zero and self.trainer.logger is not None and log_dir is not None:
            drop_empty_event_files(Path(log_dir))

    def _write_metrics(self, checkpoint: str | None) -> None:
        """The stage's scores, and the checkpoint they come from, as `metrics.json` in its
        run directory, which is printed."""
        log_dir = self.trainer.log_dir  # collective: every process asks
        if not self.trainer.is_global_zero or log_dir is None:
            return
        if checkpoint is None:
            print("Scored the base model as loaded, without a trained adapter (zero-shot): pass --ckpt_path best "
                  "(or a checkpoint) to score a trained run.")
        metrics = {k: float(v) for k, v in sorted(self.trainer.callback_metrics.items())}
        # The run directory's own file (a resumed fit scores again); without a logger the
        # folder is the user's, and a file there is kept.
        path = write_json(Path(log_dir) / "metrics.json", {"checkpoint": checkpoint, **metrics},
                          replace=self.trainer.logger is not None)
        print(f"Scores written to {path}")


COMMANDS = {"evaluate": "medqa.evaluate", "compare": "medqa.compare", "cv": "medqa.crossval", "export": "medqa.export",
            "ask": "medqa.ask", "priors": "medqa.priors"}
"""Commands beside Lightning's, each a module with its own `main(argv)`."""
MedQAParser.commands = ("fit", "validate", "test", "predict", *COMMANDS)

USER_ERRORS = (DataError, CheckpointError, CheckpointMismatch, BackendError, BaseModelError, SettingsError, FloatingPointError,
               TrainingOutOfMemory, MisconfigurationException, FileExistsError, PartialPredictions, CacheError)
"""What a user can act on: printed as one line (set MEDQA_DEBUG=1 for the traceback)."""


class _Unrun(MedQACLI):
    claims_run = False  # built, not run: it claims no run directory

    def _run_subcommand(self, subcommand: str) -> None:
        """Built, not run: for commands that use the model and data another way (`ask`)."""


def cli_for(subcommand: str, args: list[str]) -> tuple[MedQACLI, str | None]:
    """The model, data and trainer `subcommand` would use, built but not run, and the
    checkpoint it resolved (`--ckpt_path last|best` included), or None."""
    with mock.patch.object(sys, "argv", sys.argv[:1]):  # the command line is `args`, not this process's
        cli = _Unrun(MedQALoRA, QADataModule, args=[subcommand, *args], trainer_defaults=TRAINER_DEFAULTS,
                     parser_class=MedQAParser)
    return cli, cli.config[subcommand].get("ckpt_path")


def main(args: list[str] | None = None, print_next: bool = True) -> Any:
    """Run a medqa command: `args` from Python (errors propagate), else this process's
    command line (errors a user can act on end in one line). `print_next`: after `fit`, print
    the commands to run next."""
    argv = sys.argv[1:] if args is None else list(args)
    quiet(argv[0] if argv else "")
    if argv[:1] in (["-h"], ["--help"]):
        print("medqa commands: fit, validate, test, predict (below), and evaluate, compare, cv, export, ask, priors "
              "(python -m medqa evaluate --help, ...).\n")
    if argv and argv[0] in COMMANDS:
        command = importlib.import_module(COMMANDS[argv[0]])
        run = partial(command.main, argv[1:])
        expected: tuple[type[BaseException], ...] = (ValueError, OSError, *USER_ERRORS)
    else:
        run = partial(MedQACLI, MedQALoRA, QADataModule, args=args, trainer_defaults=TRAINER_DEFAULTS,
                      save_config_kwargs={"config_filename": "config.yaml"}, parser_class=MedQAParser,
                      parser_kwargs={"prog": "python -m medqa"}, print_next=print_next)
        expected = USER_ERRORS
    if args is not None:  # from Python: errors propagate; the caller's own argv is not the command's
        with mock.patch.object(sys, "argv", sys.argv[:1]):
            return run()  # the caller may go on using the process group (cv validates after fit)
    if os.environ.get("MEDQA_DEBUG") == "1":  # asked for: the traceback
        return close_process_group(run())
    try:
        return close_process_group(run())
    except expected as e:  # medqa's errors say what and where
        discard_unused_runs()
        sys.exit(f"medqa {argv[0] if argv else ''}: error: {explain(e)}")
    except BaseException:
        discard_unused_runs()
        raise


def close_process_group(result: Any) -> Any:
    """Leave a finished distributed command together: every process waits for the others,
    then the group is closed. Lightning leaves it open, and under torchrun a process that
    exits while another still talks to the rendezvous store it hosts can abort."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result
