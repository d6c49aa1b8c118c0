"""Cache folders built once and shared (the tiny Llama, a GGUF base converted, tokenized
examples): check, lock, check again, build aside, rename into place. Processes that start
together (DDP's ranks, several commands) build a folder once; a reader never sees one
half-written; a build killed part-way leaves a `.partial` folder that the next build removes
(under the lock, so no one is writing it); a folder replaced by a symbolic link is never
deleted through the link; an unwritable cache gets one line naming it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


class CacheError(OSError):
    """A cache folder medqa cannot build or replace, saying which and what to do."""


def build_once(folder: Path, ready: Callable[[Path], bool], build: Callable[[Path], None], what: str) -> bool:
    """Make `folder` hold `what`: nothing to do where `ready(folder)`; else `build(aside)` into
    a folder beside it, under a file lock, then moved into place (replacing a damaged or stale
    `folder`). Returns whether this process built it."""
    from filelock import FileLock

    if ready(folder):
        return False
    root = folder.parent
    advice = "choose another cache folder (--data.cache_dir for tokenized examples, MEDQA_CACHE for models)"
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(root / f"{folder.name}.lock"))
        lock.acquire()
    except OSError as e:
        raise CacheError(f"{root}: cannot keep the {what} there ({e.strerror or e}); {advice}") from None
    try:
        if ready(folder):  # another process built it while this one waited
            return False
        if folder.is_symlink():
            raise CacheError(f"{folder} is a symbolic link, not the {what} medqa built; it is not followed to delete "
                             f"anything: remove the link (rm {folder}) or {advice}")
        for stale in root.glob(f".{folder.name}.*.partial"):  # builds killed part-way: no one else writes them now
            shutil.rmtree(stale, ignore_errors=True)
        aside = root / f".{folder.name}.{os.getpid()}.partial"
        try:
            aside.mkdir()
            build(aside)
            if folder.exists():  # damaged, foreign or an older version's: `ready` said so
                shutil.rmtree(folder)
            aside.rename(folder)
        except PermissionError as e:
            raise CacheError(f"{root}: cannot write the {what} there ({e.strerror}); {advice}") from None
        finally:  # a refused record, Ctrl-C: nothing half-written stays
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        lock.release()
    return True
