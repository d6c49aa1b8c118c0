"""Result files written whole or not at all: every writer of predictions, scores, summaries
and speed figures calls `write_result`. A kill mid-write leaves at most a hidden temporary
file beside the target, never a half-written file under the real name, and an existing file
is never replaced unless the caller says it may be."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_result(path: Path, text: str, replace: bool = False) -> Path:
    """Write `text` to `path` atomically: a temporary file in the same folder, flushed and
    synced, then moved into place. Without `replace`, a file already at `path` stops it
    (FileExistsError naming it) and is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not replace and path.exists():
        raise FileExistsError(f"{path} exists; remove it or choose another place")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if another writer got there first: nothing is replaced
            except FileExistsError:
                raise FileExistsError(f"{path} exists; remove it or choose another place") from None
            except OSError:  # a file system without hard links: check, then move
                if path.exists():
                    raise FileExistsError(f"{path} exists; remove it or choose another place") from None
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def write_json(path: Path, value: Any, replace: bool = False) -> Path:
    """`value` as indented JSON, through `write_result`."""
    return write_result(path, json.dumps(value, indent=1) + "\n", replace)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename is still atomic
    finally:
        os.close(fd)
