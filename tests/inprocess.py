"""`python -m medqa ...` run inside the test process, answered like `subprocess.run`.

A new process pays Python's start and the imports of torch, Lightning and transformers (about
6 s on a 2-core machine) before medqa does anything; most CLI tests need none of that. This
runs `medqa.cli.main()` as `python -m medqa` would (the command line in `sys.argv`, errors as
one line and an exit status), with stdout and stderr captured (Lightning's log handlers
included), from the project's root, and puts back what a command changes in the process:
the environment, the working directory, warning filters, log handlers and filters, torch's
thread count, medqa's record of the runs a command claimed. Tests of signals, kills, DDP,
environment variables read at import and pasted hints keep processes of their own.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    return [h for lg in loggers for h in getattr(lg, "handlers", []) if type(h) is logging.StreamHandler]


def run(args: list[str], stdin: str | None = None, cwd: Path = ROOT, env: dict[str, str] | None = None,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """`python -m medqa *args` in this process: a `CompletedProcess` with its exit status and
    what it printed. `env`, as for `subprocess.run`, is the command's whole environment (this
    process's where None); `timeout` is accepted for `subprocess.run`'s signature and not enforced."""
    from medqa import runs
    from medqa.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_argv, saved_stdin = dict(os.environ), os.getcwd(), sys.argv, sys.stdin
    handlers = {h: h.stream for h in _stream_handlers()}
    filters = {lg: list(lg.filters) for lg in (logging.getLogger(n) for n in list(logging.root.manager.loggerDict))
               if isinstance(lg, logging.Logger)}
    threads = torch.get_num_threads()
    code = 0
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        os.environ.pop("MEDQA_DEBUG", None)  # a one-line error, as a user sees it
        os.chdir(cwd)
        sys.argv = [str(ROOT / "medqa" / "__main__.py"), *args]
        sys.stdin = io.StringIO(stdin or "")
        for handler in handlers:
            handler.setStream(err)
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                if isinstance(e.code, str):  # sys.exit("message") prints it and exits 1
                    print(e.code, file=sys.stderr)
                    code = 1
                else:
                    code = e.code or 0
    finally:
        for handler, stream in handlers.items():
            handler.setStream(stream)
        for logger, kept in filters.items():
            logger.filters[:] = kept
        torch.set_num_threads(threads)
        sys.argv, sys.stdin = saved_argv, saved_stdin
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        runs.NEW_RUNS.clear(), runs.MADE_DIRS.clear(), runs.RESUMED_RUNS.clear()  # a new process's
    return subprocess.CompletedProcess([sys.executable, "-m", "medqa", *args], code, out.getvalue(), err.getvalue())
