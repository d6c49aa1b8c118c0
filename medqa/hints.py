"""The commands medqa prints for the user to paste next: with the interpreter that ran this
one (a virtual environment the shell never activated included) and every option that chose
the run, so they work as printed. No torch."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

RUN_OPTIONS = ("--config", "--model.", "--data.", "--trainer.logger", "--trainer.accelerator", "--trainer.devices",
               "--trainer.precision", "--threads", "--seed_everything")
"""The options of a `fit` that decide which run a later `test` or `predict` finds and how it
scores: the config files, the base, task and data, the experiment, the hardware, threads."""


def _here(path: Path) -> str:
    """`path` as the user would type it: relative to the current directory when under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def in_activated_env() -> bool:
    """Whether a bare `python` in the user's shell is this interpreter's environment: no
    virtual environment, or the one the shell activated."""
    if sys.prefix == sys.base_prefix:
        return True
    active = os.environ.get("VIRTUAL_ENV")
    return active is not None and Path(active).resolve() == Path(sys.prefix).resolve()


def python() -> str:
    """How to call this interpreter from the user's shell: `python`, or `.venv/bin/python`
    where its environment was never activated, quoted (a checkout's path may hold a space or `$`)."""
    return "python" if in_activated_env() else quote(_here(Path(sys.executable)))


def tool(name: str) -> str:
    """A console script installed beside this interpreter (`tensorboard`), as the user can run it."""
    if in_activated_env():
        return name
    return quote(_here(Path(sys.executable).parent / name))


def run_options(argv: list[str]) -> list[str]:
    """The `RUN_OPTIONS` of a command line, each with its value, in their order."""
    kept, i = [], 0
    while i < len(argv):
        arg = argv[i]
        has_value = "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if arg.startswith(RUN_OPTIONS):
            kept += [arg, argv[i + 1]] if has_value else [arg]
        i += 2 if has_value else 1
    return kept


def medqa(subcommand: str, options: list[str], *extra: str) -> str:
    """A `python -m medqa` line, quoted for a POSIX shell."""
    return " ".join([python(), "-m", "medqa", subcommand, *map(shlex.quote, [*options, *extra])])


def after_fit(argv: list[str], best: str | None, run_dir: str, pretrained: str, tested: bool,
              by_name: bool = True) -> list[str]:
    """The commands to run after a `fit` with this command line: test and predict the best
    checkpoint of the same experiment, task and base (`--ckpt_path best`; its path where
    not `by_name`: without a logger there is no experiment to look in), and export it
    beside its run."""
    options = run_options(argv)
    ckpt = "best" if by_name or not best else best
    commands = [] if tested else [medqa("test", options, "--ckpt_path", ckpt)]
    commands.append(medqa("predict", options, "--ckpt_path", ckpt))
    if best:  # written beside its run (adapter-<checkpoint>), never into the current directory
        commands.append(medqa("export", [], "--ckpt_path", best, "--pretrained", pretrained))
    return commands


def fit_summary(trainer: Any, argv: list[str], log_dir: str | None, best: Any, last: Any, pretrained: str,
                tested: bool) -> str:
    """What a `fit` prints at its end: its run directory, best and last checkpoints, the
    TensorBoard command and the commands to run next (`best` and `last`: its checkpoint
    callbacks, or None)."""
    if trainer.fast_dev_run:
        return ("--trainer.fast_dev_run: the setup works (one batch of each stage ran); no run directory or "
                "checkpoint was kept.")
    where = log_dir or trainer.default_root_dir
    lines = [f"Run directory: {where}"]
    if best is not None and best.best_model_path:
        lines.append(f"Best checkpoint: {best.best_model_path} ({best.monitor} {float(best.best_model_score):.4f})")
    if last is not None and last.best_model_path:
        lines.append(f"Last checkpoint: {last.best_model_path} (step {trainer.global_step})")
    if best is None:
        lines.append("No checkpoint was kept (--trainer.enable_checkpointing false).")
        return "\n".join(lines)
    logged = trainer.logger is not None
    if logged and log_dir is not None:
        lines.append(f"Curves: {tool('tensorboard')} --logdir {quote(str(Path(log_dir).parent))}")
    commands = after_fit(argv, best.best_model_path, where, pretrained, tested, by_name=logged)
    lines.append("Next: " + "\n      ".join(commands))
    return "\n".join(lines)


def interrupted(argv: list[str]) -> str:
    """What to run to continue a stopped fit (Ctrl-C, SIGTERM): its whole command line, every
    option that shapes the training included (epochs, steps, accumulation), from `last`."""
    kept, i = [], 0
    while i < len(argv):
        if argv[i].split("=", 1)[0] == "--ckpt_path":
            i += 1 if "=" in argv[i] else 2
            continue
        kept.append(argv[i])
        i += 1
    return medqa("fit", kept, "--ckpt_path", "last")


def quote(text: str) -> str:
    return shlex.quote(text)
