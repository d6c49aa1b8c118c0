"""Result files are written whole or not at all, and never over a file the user has."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import inprocess
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


ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
STALLED_MEDQA = (  # `python -m medqa ...` whose sync of the file named in $STALL_ON stalls, to be killed there
    "import os, runpy, sys, time\n"
    "sync = os.fsync\n"
    "def stalled(fd):\n"
    "    if os.path.basename(os.readlink(f'/proc/self/fd/{fd}')).startswith(os.environ['STALL_ON']):\n"
    "        time.sleep(120)\n"
    "    return sync(fd)\n"
    "os.fsync = stalled\n"
    "sys.argv = ['medqa', *sys.argv[1:]]\n"
    "runpy.run_module('medqa', run_name='__main__')\n"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    logs = tmp_path_factory.mktemp("logs")
    fit = inprocess.run(["fit", "--config", DEMO, "--trainer.logger.init_args.save_dir", str(logs),
                         "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1",
                         "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"])
    assert fit.returncode == 0, fit.stderr[-3000:]
    return logs / "demo" / "fit-0" / "checkpoints" / "last.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize("command, name", [("predict", "predictions.json"), ("test", "metrics.json")])
def test_a_kill_while_a_command_writes_its_result_leaves_no_half_file(checkpoint, tmp_path, command, name):
    proc = subprocess.Popen([sys.executable, "-c", STALLED_MEDQA, command, "--config", DEMO, "--ckpt_path", str(checkpoint),
                             "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "STALL_ON": f".{name}."})
    run = tmp_path / "demo" / f"{command}-0"
    deadline = time.time() + 300
    while not list(run.glob(f".{name}.*.tmp")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert list(run.glob(f".{name}.*.tmp")), f"{command} never began writing {name}"
    time.sleep(0.5)  # inside the stalled sync, the whole text in the temporary file
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / name).exists()  # no half-written file under the real name


@pytest.mark.slow
def test_without_a_logger_test_never_writes_over_the_users_metrics_file(checkpoint, tmp_path):
    mine = tmp_path / "metrics.json"
    mine.write_text('{"mine": true}\n')
    done = subprocess.run([sys.executable, "-m", "medqa", "test", "--config", DEMO, "--ckpt_path", str(checkpoint),
                           "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                           "--trainer.limit_test_batches", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].endswith("metrics.json exists; remove it or choose another place")
    assert mine.read_text() == '{"mine": true}\n'
