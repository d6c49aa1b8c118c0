"""An experiment's run directories (`logs/NAME/fit-3`, `test-4`, ...): naming them, claiming
a new one so commands started at once never share it, leaving nothing behind where a
command failed before it wrote anything worth keeping, and which of them serve a command's
`--ckpt_path best|last`."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

RUN_NAME = re.compile(r"^(?:(fit|validate|test|predict)-|version_)(\d+)$")
"""A run directory: `fit-3`, `test-4`, ... (the command that made it and a number counted over
the experiment), or Lightning's `version_N` from before medqa named them."""


def runs(root: Path) -> list[Path]:
    """The experiment's run directories, newest first."""
    found = [(int(m.group(2)), d) for d in root.glob("*") if d.is_dir() and (m := RUN_NAME.match(d.name))]
    return [d for _, d in sorted(found, key=lambda x: x[0], reverse=True)]


def _number(run: Path) -> int:
    return int(RUN_NAME.match(run.name).group(2))


def _next_number(root: Path) -> int:
    return max(map(_number, runs(root)), default=-1) + 1


def next_run_name(root: Path, command: str) -> str:
    """`COMMAND-N`, N one past the experiment's highest run number."""
    return f"{command}-{_next_number(root)}"


RUN_ENV = "MEDQA_RUN_NAME"
"""The run a command claimed, for the processes DDP launches from it."""


def claim_run(root: Path, command: str, create: bool = True) -> tuple[str, bool]:
    """(a new run's name `COMMAND-N`, whether this process created its directory). The
    directory is created here, exclusively, so commands started at once in one experiment
    never share a run: where another command took N first, the next N. A process DDP
    launched (a rank or node above 0) creates nothing: it takes the name its launcher
    claimed, or one Lightning will replace with rank 0's (it broadcasts the log dir).
    `create=False` (a command built but not run): the name alone."""
    if any(int(os.environ.get(k) or 0) > 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK")):
        return os.environ.get(RUN_ENV) or next_run_name(root, command), False
    if not create:
        return next_run_name(root, command), False
    missing = [d for d in (root, *root.parents) if not d.exists()]
    root.mkdir(parents=True, exist_ok=True)
    MADE_DIRS.extend(missing)  # deepest first
    n = _next_number(root)
    while True:
        name = f"{command}-{n}"
        try:
            (root / name).mkdir()
        except FileExistsError:
            n += 1
            continue
        if any(d.name != name and _number(d) == n for d in runs(root)):
            (root / name).rmdir()  # another command took the number N at the same moment
            n += 1
            continue
        os.environ[RUN_ENV] = name
        return name, True


NEW_RUNS: list[Path] = []
"""Run directories this process's commands are writing to for the first time."""
MADE_DIRS: list[Path] = []
"""Folders above those runs that this process created for them (`logs/`, `logs/NAME`), deepest first."""
RESUMED_RUNS: list[tuple[Path, dict[Path, int]]] = []
"""Runs a `fit` continues, each with its files' modification times as the resume found them."""


def resuming(run: Path) -> None:
    """Note the files of a run a `fit` is about to continue, so that a refused resume can
    leave it as it was (`discard_unused_runs`)."""
    RESUMED_RUNS.append((run, {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}))


def discard_unused_runs() -> None:
    """After a failed command: remove the run directories it started and left with nothing
    in them worth keeping (no checkpoint, prediction or score), and from a run it resumed but
    saved no checkpoint in, the files it added (its config.resumeN.yaml, an event file)."""
    while NEW_RUNS:
        run = NEW_RUNS.pop()
        if run.is_dir() and not any((run / k).exists() for k in ("checkpoints", "predictions.json", "metrics.json")):
            shutil.rmtree(run, ignore_errors=True)
    while MADE_DIRS:  # the experiment folder (and logs/) made for them, where nothing else is there now
        folder = MADE_DIRS.pop(0)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    while RESUMED_RUNS:
        run, before = RESUMED_RUNS.pop()
        now = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
        if any(before.get(p) != t for p, t in now.items() if "checkpoints" in p.relative_to(run).parts):
            continue  # it trained: what it wrote belongs to the run now
        for path in now.keys() - before.keys():
            path.unlink(missing_ok=True)


def drop_empty_event_files(run: Path) -> None:
    """Remove the TensorBoard event files of `run` that hold nothing but their header: a
    `predict` logs no curves, and TensorBoard would list its empty file as a run."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for path in run.glob("events.out.tfevents.*"):
        try:
            kinds = {event.WhichOneof("what") for event in EventFileLoader(str(path)).Load()}
        except Exception:  # a damaged file is the user's to look at: kept
            continue
        if kinds <= {"file_version"}:
            path.unlink()


def run_fits(run: Path, pretrained: str, data: Any, lora: Any, check_lora: bool,
             check_settings: bool) -> tuple[bool, str]:
    """Whether a run's checkpoints serve a command (`--ckpt_path best|last`), from the run's
    hparams.yaml: trained on this base, on this task (runs from before medqa had a second
    task trained PubMedQA), with `check_lora` this LoRA shape, with `check_settings` this
    target and reasoning setting (runs from before those settings: the decision, reasoning
    required). A resumed fit checks neither: a changed LoRA or setting of the run it resumes is
    refused by the checkpoint's own checks, naming the difference. The second value says why a
    run of this base and task was passed over, for the user."""
    try:
        saved = yaml.safe_load((run / "hparams.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False, ""
    if not isinstance(saved, dict) or saved.get("pretrained") != pretrained or saved.get("task", "pubmedqa") != data.task:
        return False, ""
    if check_lora and lora.differences(saved):
        return False, ""
    if check_settings:
        differs = [f"{key} {saved.get(key, default)}" for key, default in (("target", "decision"), ("reasoning", "required"))
                   if saved.get(key, default) != data.get(key)]
        if differs:
            return False, ", ".join(differs)
    return True, ""
