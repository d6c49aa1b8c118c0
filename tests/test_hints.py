"""What medqa prints for the user to run next works as printed, in a shell where nothing was
activated; Lightning's own switches (fast_dev_run, no logger, no checkpointing) end cleanly;
Ctrl-C says how to continue; `--ckpt_path last` stays within the task; mistakes in one line."""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import pytest
import torch

import inprocess
from medqa import hints

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
SHORT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2",
         "--trainer.enable_progress_bar", "false"]


def fresh_shell_env() -> dict[str, str]:
    """A new user's shell: the virtual environment, if any, never activated."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MEDQA_DEBUG")}
    if sys.prefix != sys.base_prefix:
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != venv_bin)
    return env


def odd_environment(venv: Path) -> Path:
    """This virtual environment seen from another path (links to its interpreter and packages,
    its own pyvenv.cfg): the python of a checkout under `venv`'s path."""
    real = Path(sys.prefix)
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text((real / "pyvenv.cfg").read_text())
    (venv / "lib").symlink_to(real / "lib")
    (venv / "bin" / "python").symlink_to(Path(sys.executable).resolve())
    for tool in ("tensorboard", "hf"):
        if (real / "bin" / tool).exists():
            (venv / "bin" / tool).symlink_to(real / "bin" / tool)
    return venv / "bin" / "python"


def run(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m medqa *args` from a new user's shell (in this process: `inprocess`)."""
    return inprocess.run(args, cwd=cwd, env=fresh_shell_env())


def test_run_options_keep_what_chose_the_run_and_drop_the_rest():
    argv = ["--config", "a.yaml", "--trainer.max_epochs", "3", "--trainer.logger.init_args.name=ref", "--threads", "1",
            "--data.task", "medqa_usmle", "--ckpt_path", "last", "--model.lora_r", "4", "--test_after_fit", "best"]
    assert hints.run_options(argv) == ["--config", "a.yaml", "--trainer.logger.init_args.name=ref", "--threads", "1",
                                       "--data.task", "medqa_usmle", "--model.lora_r", "4"]
    assert hints.medqa("test", ["--data.source", "my file.json"]).endswith("test --data.source 'my file.json'")


def test_every_word_of_a_printed_command_is_quoted_whatever_the_checkouts_path(tmp_path, monkeypatch):
    """A checkout under a path with a space, or with `$(...)` in it: the interpreter's path is
    one word of the pasted command, and nothing in it runs."""
    weird = tmp_path / "my projects" / "$(touch pwned)" / ".venv" / "bin"
    weird.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(weird / "python"))
    monkeypatch.setattr(hints, "in_activated_env", lambda: False)
    line = hints.medqa("test", ["--config", "a b.yaml"], "--ckpt_path", "best")
    assert shlex.split(line) == [str(weird / "python"), "-m", "medqa", "test", "--config", "a b.yaml", "--ckpt_path", "best"]
    assert shlex.split(hints.tool("tensorboard")) == [str(weird / "tensorboard")]
    echoed = subprocess.run(["bash", "-c", f"echo {line}"], cwd=tmp_path, capture_output=True, text=True)
    assert echoed.stdout.startswith(str(weird / "python")) and not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_the_printed_next_steps_work_pasted_into_a_shell_that_activated_nothing(tmp_path):
    # A decoy experiment first: "Next" must not lead to its checkpoint.
    decoy = run(["fit", "--config", DEMO, *SHORT, "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert decoy.returncode == 0, decoy.stderr[-3000:]
    # The checkout's environment at a path with a space and a `$(...)` in it: every printed
    # command must still paste as one word a path, and run nothing.
    python = odd_environment(tmp_path / "my projects" / "$(touch pwned)" / ".venv")
    fit = subprocess.run([str(python), "-m", "medqa", "fit", "--config", DEMO, *SHORT, "--trainer.logger.init_args.save_dir",
                          str(tmp_path), "--trainer.logger.init_args.name", "ref", "--threads", "1"],
                         cwd=ROOT, capture_output=True, text=True, env=fresh_shell_env())
    assert fit.returncode == 0, fit.stderr[-3000:]
    out = fit.stdout
    assert f"Next: {shlex.quote(str(python))} -m medqa test" in out
    curves = next(line for line in out.splitlines() if line.startswith("Curves: "))
    tensorboard = shlex.split(curves.removeprefix("Curves: "))[0]
    assert (ROOT / tensorboard).is_file() or subprocess.run(["which", tensorboard], env=fresh_shell_env()).returncode == 0
    commands = [line.strip().removeprefix("Next: ") for line in out.split("Next: ", 1)[1].splitlines()]
    test, predict, export = commands
    assert "--trainer.logger.init_args.name ref" in test and "--threads 1" in test and "max_epochs" not in test
    tested = subprocess.run(test, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=600, env=fresh_shell_env())
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert f"-> {tmp_path / 'ref' / 'fit-0' / 'checkpoints'}" in tested.stdout + tested.stderr  # this run's, not the decoy's
    exported = subprocess.run(export, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env=fresh_shell_env())
    assert exported.returncode == 0, exported.stderr[-3000:]
    best = Path(shlex.split(export)[shlex.split(export).index("--ckpt_path") + 1])
    adapter = tmp_path / "ref" / "fit-0" / f"adapter-{best.stem}"
    assert (adapter / "adapter_config.json").is_file()  # beside its run, not in the repo
    assert f"upload YOUR_NAME/REPO {adapter} ." in exported.stdout
    assert not (ROOT / "pwned").exists() and not (tmp_path / "pwned").exists()  # nothing in the path ran


def test_fast_dev_run_ends_cleanly_and_keeps_nothing(tmp_path):
    done = run(["fit", "--config", DEMO, "--trainer.fast_dev_run", "true", "--trainer.logger.init_args.save_dir",
                str(tmp_path / "logs")], cwd=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "no run directory or checkpoint was kept" in done.stdout
    assert list(tmp_path.iterdir()) == []  # nothing in the current directory, no empty run


@pytest.mark.slow
def test_without_a_logger_fit_trains_and_drops_what_needs_one(tmp_path):
    done = run(["fit", "--config", DEMO, *SHORT, "--trainer.logger", "false"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Note: --trainer.logger false: no TensorBoard curves, learning-rate curve or config.yaml" in done.stderr
    assert not (tmp_path / "config.yaml").exists() and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert "Curves:" not in done.stdout
    test = next(line for line in done.stdout.splitlines() if line.startswith("Next: ")).removeprefix("Next: ")
    assert test.endswith(f"--ckpt_path {tmp_path / 'checkpoints'}/best-epoch0-step4-f1_" + test.split("f1_")[1])
    tested = subprocess.run(test, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env=fresh_shell_env())
    assert tested.returncode == 0, tested.stderr[-3000:]


def test_a_failed_command_leaves_nothing_in_the_current_directory(tmp_path):
    done = run(["fit", "--config", DEMO, "--trainer.logger", "false", "--data.source", "nope.json"], cwd=tmp_path)
    assert done.returncode == 1 and "nope.json: no such file" in done.stderr.strip().splitlines()[-1]
    done = run(["fit", "--config", DEMO, "--data.source", "nope.json"], cwd=tmp_path)  # the default logs/
    assert done.returncode == 1 and list(tmp_path.iterdir()) == []


def test_without_checkpointing_fit_trains_and_says_nothing_was_kept(tmp_path):
    done = run(["fit", "--config", DEMO, *SHORT, "--trainer.enable_checkpointing", "false",
                "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no checkpoint will be kept" in done.stderr and "No checkpoint was kept" in done.stdout
    assert not (tmp_path / "demo" / "fit-0" / "checkpoints").exists()


@pytest.mark.slow
def test_ctrl_c_says_how_to_continue_and_that_command_resumes(tmp_path):
    args = ["fit", "--config", DEMO, "--trainer.max_epochs", "50", "--trainer.val_check_interval", "3",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path)]
    # Ctrl-C as in a terminal: a shell that started these tests in the background made its
    # children ignore SIGINT, and Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-m", "medqa", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=fresh_shell_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        last = tmp_path / "demo" / "fit-0" / "checkpoints" / "last.ckpt"
        deadline = time.time() + 300
        while not last.exists():
            assert proc.poll() is None and time.time() < deadline, "no checkpoint before the deadline"
            time.sleep(0.2)
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never left training after a failure
    assert proc.returncode != 0
    hint = err.split(f"Continue from {last} with:\n", 1)[1].splitlines()[0].strip()
    # the whole command line, so the run continues as it was going (here: 50 epochs, not the config's 10)
    assert hint.endswith("--ckpt_path last") and "--trainer.max_epochs 50" in hint
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    resumed = subprocess.run(hint + f" --trainer.max_steps {step + 1}", shell=True, cwd=ROOT, capture_output=True,
                             text=True, timeout=600, env=fresh_shell_env())  # one step more, then it ends
    assert "--ckpt_path last -> " + str(last) in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    assert resumed.returncode == 0 and torch.load(last, map_location="cpu", weights_only=True)["global_step"] == step + 1


@pytest.mark.slow
def test_ckpt_path_last_stays_within_the_commands_task(tmp_path):
    logs = ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    for task in ("pubmedqa", "medqa_usmle"):  # the USMLE run is the newest
        done = run(["fit", "--config", DEMO, *SHORT, "--data.task", task, *logs])
        assert done.returncode == 0, done.stderr[-3000:]
    done = run(["validate", "--config", DEMO, "--ckpt_path", "last", "--trainer.limit_val_batches", "2", *logs])
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout + done.stderr
    assert f"--ckpt_path last -> {tmp_path / 'demo' / 'fit-0' / 'checkpoints' / 'last.ckpt'} (run fit-0" in said
    assert "Note: fit-0 is not the newest run" in said and "(fit-1 is another task or base" in said


def test_a_mistyped_command_gets_a_suggestion_in_medqas_own_form():
    done = run(["evaluat", "x.json"])
    assert done.returncode == 2
    assert done.stderr.startswith("medqa: error: no command 'evaluat'; the commands are fit, validate, test, predict, "
                                  "evaluate")
    assert "did you mean evaluate?" in done.stderr


def test_a_value_of_the_wrong_type_is_one_line():
    done = run(["fit", "--config", DEMO, "--model.optimizer.init_args.lr", "abc"])
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 2, done.stderr
    assert done.stderr.startswith("medqa fit: error: --model.optimizer -> lr: 'abc' is not float")


@pytest.mark.parametrize("kind, value, said", [
    (int, "x", "--n: 'x' is not int"),
    (int | None, "x", "--n: 'x' is not int or null"),
    (Literal["best", "last"] | None, "true", "--n: 'true' is not best, last or null"),
    (bool | Literal["auto"], "maybe", "--n: 'maybe' is not true, false or auto"),
])
def test_a_wrong_value_names_what_the_option_takes(kind, value, said):
    """`--test_after_fit true` once said "'true' is not NoneType"; `--data.batch_size x` gave
    jsonargparse's first line alone."""
    from jsonargparse import ArgumentParser

    from medqa.messages import short

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--n", type=kind)
    with pytest.raises(Exception) as error:
        parser.parse_args(["--n", value])
    assert short(str(error.value)) == said


@pytest.mark.slow
def test_an_unreachable_hub_fails_at_once_without_retries(tmp_path):
    env = {**fresh_shell_env(), "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens: refused at once
    for offline in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.pop(offline, None)
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "medqa", "fit", "--trainer.accelerator", "cpu",
                           "--model.pretrained", "someone/not-cached-model", "--data.source", "synthetic"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 1 and time.time() - start < 60
    assert "Retrying" not in done.stderr and "cannot be reached" in done.stderr
    assert "'someone/not-cached-model' is not in the local Hugging Face cache" in done.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_test_without_a_checkpoint_says_it_scored_the_untrained_base(tmp_path):
    done = run(["test", "--config", DEMO, "--trainer.limit_test_batches", "1", "--trainer.logger.init_args.save_dir",
                str(tmp_path), "--trainer.enable_progress_bar", "false"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Scored the base model as loaded, without a trained adapter (zero-shot)" in done.stdout


@pytest.mark.parametrize("option,value", [("name", "../../outside"), ("name", "/tmp/elsewhere"), ("version", "../v")])
def test_an_experiment_name_that_leaves_save_dir_is_refused(tmp_path, option, value):
    logs = tmp_path / "a" / "logs"
    done = run(["fit", "--config", DEMO, *SHORT, "--trainer.logger.init_args.save_dir", str(logs),
                f"--trainer.logger.init_args.{option}", value])
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"--trainer.logger.init_args.{option} {value!r}: runs are written under save_dir" in done.stderr
    assert not any(p.is_dir() for p in tmp_path.rglob("*") if p.name not in ("a",)) and not Path("/tmp/elsewhere").exists()
