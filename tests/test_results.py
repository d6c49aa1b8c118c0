"""Result files are written whole or not at all, and never over a file the user has."""

import os
import signal
import subprocess
import sys
import time

import pytest

from medqa.results import write_json, write_result


def test_written_whole_with_no_temporary_left(tmp_path):
    path = write_json(tmp_path / "deep" / "metrics.json", {"test/acc": 0.5})
    assert path.read_text() == '{\n "test/acc": 0.5\n}\n'
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


def test_an_existing_file_is_kept_unless_replacing_is_asked(tmp_path):
    path = tmp_path / "predictions.json"
    path.write_text("the user's own")
    with pytest.raises(FileExistsError, match="predictions.json exists"):
        write_result(path, "new")
    assert path.read_text() == "the user's own" and len(list(tmp_path.iterdir())) == 1
    write_result(path, "new", replace=True)
    assert path.read_text() == "new"


def test_a_kill_during_the_write_leaves_no_file_under_the_real_name(tmp_path):
    # The child stalls in fsync, after writing and before the move into place, and is killed there.
    child = (
        "import os, sys, time\n"
        "os.fsync = lambda fd: time.sleep(60)\n"
        "from medqa.results import write_result\n"
        "write_result(__import__('pathlib').Path(sys.argv[1]), 'x' * 5_000_000)\n"
    )
    target = tmp_path / "predictions.json"
    proc = subprocess.Popen([sys.executable, "-c", child, str(target)])
    deadline = time.time() + 60
    while not list(tmp_path.glob(".predictions.json.*.tmp")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # inside the stalled fsync, with the whole text written to the temporary file
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    write_result(target, "{}")  # the next run writes it; the stale temporary file is not in the way
    assert target.read_text() == "{}"
