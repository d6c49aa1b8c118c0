"""The tasks medqa trains on, by name (`--data.task`). A task is data (`medqa.tasks.task`):
its label words, its prompt text, how its records are read and split, and how one record is
written as the user's message. Everything after that (tokens, batches, the model, the
metrics) is shared.

Adding a task is one module that defines `TASK` and one entry in `TASKS`. The name in a
config picks from this table only: no config or checkpoint names code to import.
"""

from __future__ import annotations

from medqa.records import DataError
from medqa.tasks import medqa_usmle, pubmedqa
from medqa.tasks.task import Record, Task

__all__ = ["Record", "Task", "TASKS", "get_task", "task_names"]

TASKS: dict[str, Task] = {t.name: t for t in (pubmedqa.TASK, medqa_usmle.TASK)}


def get_task(name: str) -> Task:
    """The task called `name`, or an error listing the ones there are."""
    if name not in TASKS:
        raise DataError(f"--data.task {name!r} is not a medqa task; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def task_names() -> list[str]:
    return list(TASKS)
