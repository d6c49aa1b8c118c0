"""Lightning's DDP on the CPU (gloo, 2 processes) through the CLI: training runs, test
metrics equal the single-process run's, and predict answers every question exactly once;
the same over 2 nodes x 1 process launched by torchrun, as a multi-node job is."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import inprocess
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medqa.tasks.pubmedqa import official_split, synthetic_records

ROOT = Path(__file__).resolve().parents[1]


def medqa(command: str, logs: Path, *args: str) -> Path:
    """Run a medqa command, in its own process where it runs two (DDP launches its workers
    from it), else in this one (`inprocess`: the single-process runs they are compared
    with); return the run directory it wrote."""
    before = set((logs / "demo").glob("*-*"))
    argv = [command, "--config", str(ROOT / "configs" / "demo.yaml"), "--trainer.logger.init_args.save_dir", str(logs),
            "--trainer.enable_progress_bar", "false", *args]
    if "ddp" in args:
        done = subprocess.run([sys.executable, "-m", "medqa", *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    else:
        done = inprocess.run(argv)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    (run,) = set((logs / "demo").glob("*-*")) - before
    return run


def medqa_on_nodes(command: str, logs: Path, *args: str, nodes: int = 2) -> Path:
    """Run a medqa command as `nodes` nodes x 1 process on this machine: one torchrun per
    node, as the README's multi-node launch does, meeting at 127.0.0.1 (gloo)."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = set((logs / "demo").glob("*-*"))
    launches = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node", "1",
             "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
             "-m", "medqa", command, "--config", str(ROOT / "configs" / "demo.yaml"),
             "--trainer.num_nodes", str(nodes), "--trainer.devices", "1", "--trainer.strategy", "ddp",
             "--trainer.logger.init_args.save_dir", str(logs), "--trainer.enable_progress_bar", "false", *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for rank in range(nodes)
    ]
    outputs = [launch.communicate(timeout=600)[0] for launch in launches]
    for rank, (launch, out) in enumerate(zip(launches, outputs)):
        assert launch.returncode == 0, f"node {rank}:\n{out[-4000:]}"
    (run,) = set((logs / "demo").glob("*-*")) - before
    return run


def test_metrics(run: Path) -> dict[str, float]:
    events = EventAccumulator(str(run))
    events.Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"] if tag.startswith("test/")}


test_metrics.__test__ = False  # a helper, not a test


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_checkpoint(tmp_path_factory):
    logs = tmp_path_factory.mktemp("ddp")
    run = medqa("fit", logs, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "1",
                "--trainer.limit_train_batches", "6", "--trainer.limit_val_batches", "2", "--trainer.max_steps", "4",
                "--test_after_fit", "last")  # ends mid-epoch, between validations: last.ckpt saved at the end
    return logs, run / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_ddp_training_saves_a_checkpoint_of_the_steps_of_both_processes(ddp_checkpoint):
    import torch

    _, last = ddp_checkpoint
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 4 and (last.parent / "last.adapter").is_dir()
    # Where a resume continues: 4 batches of each of the 2 processes into epoch 0.
    position = state["QADataModule"]["train_position"]
    assert (position["epoch"], position["batches"], position["processes"]) == (0, 4, 2)


@pytest.mark.slow
def test_ddp_test_and_predict_equal_the_single_process_run(ddp_checkpoint):
    logs, last = ddp_checkpoint
    one = ["--ckpt_path", str(last), "--trainer.devices", "1"]
    two = ["--ckpt_path", str(last), "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    single = test_metrics(medqa("test", logs, *one))
    assert {"test/acc", "test/macro_f1", "test/ece"} <= set(single)
    # The fit's own test (--test_after_fit last) of that checkpoint, in its 2 processes after training,
    # scores each question once: the single process's scores.
    after_fit = json.loads((last.parent.parent / "metrics.json").read_text())
    assert after_fit["checkpoint"] == str(last)
    for tag in ("test/acc", "test/macro_f1", "test/f1_yes", "test/f1_no", "test/f1_maybe", "test/ece"):
        assert after_fit[tag] == pytest.approx(single[tag], abs=1e-6), tag

    # The 500 test questions in batches of 7: the last batch is short and the processes get
    # different numbers of questions (252 and 248); none may be lost or answered twice.
    extra = ["--data.eval_batch_size", "7"]
    alone, shared = rows(medqa("predict", logs, *one, *extra)), rows(medqa("predict", logs, *two, *extra))
    ids = [r["id"] for r in shared]
    assert sorted(ids) == sorted(r.id for r in official_split(synthetic_records())["test"])
    assert ids == [r["id"] for r in alone]  # the data's order, as one process writes it
    for a, b in zip(alone, shared):
        assert a["label"] == b["label"] and abs(a["p_yes"] - b["p_yes"]) < 1e-5 and abs(a["p_no"] - b["p_no"]) < 1e-5


@pytest.mark.slow
def test_two_nodes_train_and_predict_every_question_once_as_one_process_does(tmp_path):
    import torch

    logs = tmp_path / "logs"
    run = medqa_on_nodes("fit", logs, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4",
                         "--trainer.limit_val_batches", "2")
    last = run / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    position = state["QADataModule"]["train_position"]
    # The finished epoch 0, all 4 of its batches taken: a resume starts epoch 1 from its start.
    assert state["global_step"] == 4 and (position["epoch"], position["batches"], position["processes"]) == (0, 4, 2)
    assert json.loads((run / "speed.json").read_text())["processes"] == 2

    # The 50 dev questions in batches of 7: the last batch is short, the nodes' shares differ.
    extra = ["--ckpt_path", str(last), "--data.predict_split", "dev", "--data.eval_batch_size", "7"]
    shared = rows(medqa_on_nodes("predict", logs, *extra))
    alone = rows(medqa("predict", logs, *extra, "--trainer.devices", "1"))
    ids = [r["id"] for r in shared]
    assert len(ids) == len(set(ids)) == 50 and ids == [r["id"] for r in alone]
    for a, b in zip(alone, shared):
        assert a["label"] == b["label"] and abs(a["p_yes"] - b["p_yes"]) < 1e-5 and abs(a["p_no"] - b["p_no"]) < 1e-5


@pytest.mark.slow
def test_a_nonfinite_loss_in_one_process_skips_or_stops_in_every_process(medqa_cache, tmp_path):
    """Process 1 alone gets a NaN loss. With `--model.nonfinite skip` both processes skip that
    update (the weights stay finite and equal); then, in the same processes, with `error` both
    stop, each naming where the loss was non-finite. Neither is left waiting for the other's
    gradients."""
    from test_model import tiny_module

    tiny_module()  # the tiny model built once, before two processes load it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(port), str(ROOT / "tests" / "ddp_nonfinite.py"),
         "skip,error", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    results = {(mode, rank): json.loads((tmp_path / f"result-{mode}-{rank}.json").read_text())
               for mode in ("skip", "error") for rank in (0, 1) if (tmp_path / f"result-{mode}-{rank}.json").exists()}
    assert len(results) == 4, done.stdout[-2000:] + done.stderr[-4000:]
    assert all(results["skip", rank] == {"skipped": 1, "steps": 5, "finite": True} for rank in (0, 1))
    assert done.returncode != 0
    assert "questions in the batch" in results["error", 1]["error"]
    assert "in another process's batch (process 0's loss was finite)" in results["error", 0]["error"]
    assert all("at step 2 (epoch 0, batch 2)" in results["error", rank]["error"] for rank in (0, 1))
