"""SpeedMonitor: what each process timed, summed and maxed over processes, and a real fit's
figures against the tokens its batches hold."""

import json
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from medqa.speed import SpeedMonitor, describe, process_seconds, summarize


def row(tokens, fit_s, step_tokens, in_steps, wall, warmup_s, timed, gaps, median=0.5, slow=((0.0, -1),) * 3, loading=1.0):
    flat = [x for gap in gaps for x in gap]
    return [tokens, fit_s, step_tokens, in_steps, wall, warmup_s, timed, 0.0, *flat, median, *[x for s in slow for x in s],
            loading]


def test_summary_sums_tokens_takes_the_slowest_process_and_one_wait_per_batch():
    rows = [row(1000, 10.0, 800, 4.0, 5.0, 3.0, 8, [(0.5, 7), (0.2, 4), (0.0, -1)], 0.4, [(2.5, 5), (0.6, 6), (0.5, 2)]),
            row(900, 11.0, 700, 4.5, 5.2, 2.0, 8, [(0.6, 7), (0.1, 3), (0.0, -1)], 0.45, [(2.0, 5), (0.7, 3), (0.4, 4)], 7.5)]
    s = summarize(rows, warmup_steps=2)
    assert s["tokens"] == 1900 and s["fit_seconds"] == 11.0
    assert s["step_tokens_per_s"] == pytest.approx(1500 / 4.5)
    assert s["wall_tokens_per_s"] == pytest.approx(1500 / 5.2)
    assert s["seconds_between_steps"] == pytest.approx(1.0)  # the larger of 5.0-4.0 and 5.2-4.5
    # batch 7 waited on both processes: listed once, with the longer wait
    assert [(g["before_batch"], g["seconds"]) for g in s["longest_gaps"]] == [(7, 0.6), (4, 0.2), (3, 0.1)]
    # step times: the slowest process's median; a step slow on both processes listed once
    assert s["median_step_seconds"] == 0.45
    assert [(g["batch"], g["seconds"]) for g in s["slowest_steps"]] == [(5, 2.5), (3, 0.7), (6, 0.6)]
    text = describe({**s, "processes": 2})
    assert "1,900 non-padding tokens" in text and "Median step 0.450 s; slowest: 2.50 s (batch 5)" in text
    assert s["loading_seconds"] == 7.5 and text.startswith("Loaded the model in 7.5 s. ")  # the slower process


class Batches(torch.utils.data.Dataset):
    """Batches of known non-padding token counts, one a step."""

    def __init__(self, counts):
        self.counts = counts

    def __len__(self):
        return len(self.counts)

    def __getitem__(self, i):
        return {"x": torch.ones(2, 4), "num_tokens": self.counts[i], "ids": [f"{i}a", f"{i}b"]}


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def configure_model(self):
        time.sleep(0.3)  # loading

    def training_step(self, batch, batch_idx):
        return self.layer(batch["x"]).pow(2).mean()

    def test_step(self, batch, batch_idx):
        self.layer(batch["x"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_fit_counts_every_batch_and_times_only_those_after_warm_up(tmp_path):
    counts = list(range(10, 22))
    loader = torch.utils.data.DataLoader(Batches(counts), batch_size=None)
    monitor = SpeedMonitor(warmup_steps=3)
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="speed")
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=logger, callbacks=[monitor], enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=1)
    before = process_seconds()
    trainer.fit(Tiny(), train_dataloaders=loader)
    after = process_seconds()
    s = json.loads((tmp_path / "speed" / "version_0" / "speed.json").read_text())
    assert before <= s["start"]["seconds"] <= after  # the process's age when the fit set up
    assert "unsloth_import_seconds" not in s["start"]  # no Unsloth imported on the CPU
    assert s["tokens"] == 2 * sum(counts) and s["timed_steps"] == 2 * len(counts) - 3
    assert s["step_tokens_per_s"] == pytest.approx((2 * sum(counts) - sum(counts[:3])) / s["seconds_in_steps"])
    assert 0 < s["seconds_in_steps"] <= s["seconds_in_steps"] + s["seconds_between_steps"] <= s["fit_seconds"]
    assert 0.3 <= s["loading_seconds"] < 5  # Tiny.configure_model's 0.3 s, as a model load would take
    assert s["processes"] == 1 and len(s["per_process"]) == 1
    assert "speed/tokens_per_s" in trainer.logged_metrics


@pytest.mark.slow
def test_process_seconds_counts_from_the_process_start():
    code = "import time; time.sleep(1.5); from medqa.speed import process_seconds; print(process_seconds())"
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 1.5 <= age < 60  # the sleep, then the import; not the machine's uptime


def test_negative_warm_up_is_refused():
    with pytest.raises(ValueError, match="warmup_steps"):
        SpeedMonitor(warmup_steps=-1)


def test_profiled_batches_are_reported_and_left_out_of_the_step_figures(tmp_path):
    counts = list(range(10, 22))
    loader = torch.utils.data.DataLoader(Batches(counts), batch_size=None)
    monitor = SpeedMonitor(warmup_steps=2, profile_steps=3)
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="speed")
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=logger, callbacks=[monitor], enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(Tiny(), train_dataloaders=loader)
    run = tmp_path / "speed" / "version_0"
    s = json.loads((run / "speed.json").read_text())
    assert s["timed_steps"] == len(counts) - 6 and s["warmup_steps"] == 6  # and the batch after the profiled ones
    assert s["step_tokens_per_s"] == pytest.approx(sum(counts[6:]) / s["seconds_in_steps"])
    report = (run / "profile-rank0.txt").read_text()
    assert report.startswith(f"process 0: 3 profiled steps, {sum(counts[2:5]):,} non-padding tokens")
    assert "aten::linear" in report or "aten::addmm" in report  # the step's own calls were recorded
    assert "\n0 kernel launches a step; GPU idle (no compute kernel running) 100% of the wall time\n" in report  # a CPU
    assert (run / "trace-rank0.json.gz").stat().st_size > 0
    assert monitor.profiler is None  # stopped after its batches


def test_negative_profile_steps_are_refused():
    with pytest.raises(ValueError, match="profile_steps"):
        SpeedMonitor(profile_steps=-1)


def test_scoring_batches_are_profiled_after_the_first(tmp_path):
    counts = list(range(10, 16))
    loader = torch.utils.data.DataLoader(Batches(counts), batch_size=None)
    monitor = SpeedMonitor(profile_steps=2)
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="speed")
    trainer = L.Trainer(accelerator="cpu", logger=logger, callbacks=[monitor], enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.test(Tiny(), dataloaders=loader, verbose=False)
    run = tmp_path / "speed" / "version_0"
    report = (run / "profile-scoring-rank0.txt").read_text()
    assert report.startswith(f"process 0: 2 profiled scoring batches, {sum(counts[1:3]):,} non-padding tokens")
    assert "aten::linear" in report or "aten::addmm" in report  # the batches' own calls were recorded
    assert (run / "trace-scoring-rank0.json.gz").stat().st_size > 0
    assert monitor.profiler is None  # stopped after its batches
    assert monitor.scoring["questions"] == 2 * len(counts) and monitor.scoring["tokens"] == sum(counts)

    # More batches asked for than there are: the profile covers those after the first.
    trainer = L.Trainer(accelerator="cpu", logger=logger, callbacks=[SpeedMonitor(profile_steps=50)],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.test(Tiny(), dataloaders=loader, verbose=False)
    report = (run / "profile-scoring-rank0.txt").read_text()
    assert report.startswith(f"process 0: {len(counts) - 1} profiled scoring batches, {sum(counts[1:]):,} non-padding")


def test_the_throughput_benchmark_times_steps_across_an_epoch_end():
    """benchmarks/throughput.py's timer counts steps over the fit: 4 warm-up + 8 timed steps of a
    5-batch epoch end in the third epoch (batch_idx 1), and every timed batch's tokens count."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        from throughput import bench_trainer, step_timer
    finally:
        sys.path.pop(0)
    counts = [10, 11, 12, 13, 14]
    loader = torch.utils.data.DataLoader(Batches(counts), batch_size=None)
    timer = step_timer(warmup=4, steps=8)
    trainer = L.Trainer(accelerator="cpu", max_steps=12, logger=False, callbacks=[timer], enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(Tiny(), train_dataloaders=loader)
    assert timer.timed == 8 and timer.seen == 12 and timer.seconds > 0
    assert timer.tokens == sum((counts * 3)[4:12])
    assert callable(bench_trainer)  # the GPU trainer the benchmark builds around the timer


def test_a_busy_machine_gets_advice_on_threads_and_a_free_one_none():
    from medqa.speed import busy_note

    assert busy_note(threads=2, load=0.3, cores=2) is None
    assert busy_note(threads=2, load=1.9, cores=2) is None  # busy, but not past the cores
    assert busy_note(threads=1, load=6.0, cores=2) is None  # one thread: nothing to trade
    note = busy_note(threads=2, load=4.5, cores=2)
    assert "load 4.5 on 2 cores" in note and "--threads 1 is faster here" in note and "last digits" in note
    assert busy_note(threads=8, load=3.6, cores=8) is None and "load 9.0 on 8 cores" in busy_note(8, 9.0, 8)


@pytest.mark.slow
def test_the_sync_sites_benchmark_runs_a_medqa_command_and_counts_its_batches(medqa_cache, tmp_path):
    """benchmarks/sync_sites.py runs the medqa command in its own process and reports the
    training batches it watched after the warm-up (on a CPU nothing synchronises)."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "sync_sites.py"), "--after", "2", "--", "fit",
         "--model.pretrained", "builtin:tiny-llama", "--data.source", "synthetic", "--trainer.accelerator", "cpu",
         "--model.backend", "hf", "--model.load_in_4bit", "false", "--model.dtype", "float32",
         "--trainer.max_steps", "5", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
         "--trainer.logger.init_args.save_dir", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Host syncs in 3 training batches after the first 2: 0 at 0 sites" in done.stdout
    assert (tmp_path / "medqa" / "fit-0" / "checkpoints" / "last.ckpt").exists()  # the command really ran


def test_the_lora_update_benchmark_computes_the_same_update_every_way():
    """benchmarks/lora_update.py's three ways of adding LoRA's update (its GPU timings decide
    between them) give the float32 reference's forward and input gradient on the CPU."""
    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "lora_update.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "separate" in done.stdout and "epilogue" in done.stdout and "merged" in done.stdout
