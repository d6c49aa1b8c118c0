"""Training speed as a user of one or several GPUs needs it: tokens/s inside the steps
after warm-up, the time spent between steps (checkpoint writes, validation, data), and the
whole fit, each summed or maxed over the processes."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from medqa.backends import unsloth_import_seconds
from medqa.results import write_json

SPEED_FILE = "speed.json"
TOP_GAPS = 3


class SpeedMonitor(L.Callback):
    """Times every training batch of every process and says, at the end of `fit`, where the
    time went; logs `speed/tokens_per_s` (this process's step rate) to TensorBoard.

    Each batch's start and end are marked on the GPU's timeline (CUDA events, read once the
    GPU has passed them: no host sync a step, which would stop the host from queueing the next
    step's kernels while the GPU runs this one), so a step's time is its GPU time, and the time
    from one batch's end to the next one's start is time the GPU spent waiting for the host:
    checkpoint writes, validation, the data loader, epoch ends. Without a GPU the marks are
    the host's clock. Under DDP the processes meet in every backward pass, so their step times
    agree; the figures take the slowest process and sum the tokens of all of them.
    `test` and `predict` say how long loading the model and scoring took (`speed.json` too).

    Args:
        warmup_steps: Batches left out of the step figures: the first steps compile
            Unsloth's kernels and allocate memory.
        profile_steps: After the warm-up, record this many batches with torch's profiler
            and write, for each process, where their time went (`profile-rank<R>.txt`: time
            in GPU kernels, in NCCL kernels and in all, a step, and the kernels and host
            calls that took longest) and their trace (`trace-rank<R>.json.gz`, for
            Perfetto or chrome://tracing) beside `speed.json`. These batches, and the one
            after them, are left out of the step figures too. In `test` and `predict`
            (and `fit --test_after_fit`), scoring batches 1 to N are profiled the same way
            (`profile-scoring-rank<R>.txt`); their scoring time then includes the profiler's.
    """

    def __init__(self, warmup_steps: int = 10, profile_steps: int = 0) -> None:
        if warmup_steps < 0:
            raise ValueError(f"--speed.warmup_steps must be 0 or more, got {warmup_steps}")
        if profile_steps < 0:
            raise ValueError(f"--speed.profile_steps must be 0 or more, got {profile_steps}")
        self.warmup_steps, self.profile_steps = warmup_steps, profile_steps
        self.summary: dict[str, Any] = {}
        self.profiler: torch.profiler.profile | None = None
        self.scoring: dict[str, float] = {}
        self.start: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.setup_start = time.perf_counter()  # the model is loaded (configure_model) after this
        if not self.start and (age := process_seconds()) is not None:  # the command's first stage only
            self.start = {"seconds": age}
            unsloth = unsloth_import_seconds()
            if unsloth is not None:
                self.start["unsloth_import_seconds"] = unsloth
            rank_zero_info(f"Ready to load the model {age:.1f} s after the process started"
                           + (f" (importing Unsloth: {unsloth:.1f} s)" if unsloth is not None else "")
                           + ": Python, the imports, the settings and the data.")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)
        self.fit_start = time.perf_counter()
        self.origin = self._mark(pl_module)  # the GPU's timeline at fit_start
        self.loading_seconds = self.fit_start - self.setup_start
        self.starts: list[float | torch.cuda.Event] = []
        self.ends: list[float | torch.cuda.Event] = []
        self.tokens: list[int] = []
        self.summary = {}
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    @property
    def skipped_steps(self) -> int:
        """Batches left out of the step figures: warm-up, then the profiled ones and the one
        after them (the profiler's report is written before it; under DDP the other processes
        wait for it inside that batch: 3 s on 2 x H200)."""
        return self.warmup_steps + self.profile_steps + (1 if self.profile_steps else 0)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.profile_steps and len(self.starts) == self.warmup_steps:
            self._start_profiler(pl_module)
        self.starts.append(self._mark(pl_module))
        self.tokens.append(int(batch["num_tokens"]))  # counted on the host by collate: no sync

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.ends.append(self._mark(pl_module))
        # The newest step the GPU has finished: this one's rate would wait for the GPU.
        i = len(self.ends) - (2 if isinstance(self.ends[-1], torch.cuda.Event) else 1)
        if i >= 0 and self._passed(self.ends[i]):
            # A tensor on the host: Lightning would copy a Python float to the GPU, a host sync.
            pl_module.log("speed/tokens_per_s", torch.tensor(self.tokens[i] / max(self._step_seconds(i), 1e-9)),
                          batch_size=1)
        if self.profiler is not None and len(self.ends) == self.warmup_steps + self.profile_steps:
            self._sync(pl_module)
            profiled = range(self.warmup_steps, len(self.ends))
            self._write_profile(trainer, sum(map(self._step_seconds, profiled)),
                                [self.tokens[i] for i in profiled], self.warmup_steps)

    @staticmethod
    def _mark(pl_module: L.LightningModule) -> float | torch.cuda.Event:
        if pl_module.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def _passed(mark: float | torch.cuda.Event) -> bool:
        return not isinstance(mark, torch.cuda.Event) or mark.query()

    def _at(self, mark: float | torch.cuda.Event) -> float:
        """A mark on the host's clock (`time.perf_counter`); a GPU mark must have passed."""
        if isinstance(mark, torch.cuda.Event):
            return self.fit_start + self.origin.elapsed_time(mark) / 1000
        return mark

    def _step_seconds(self, i: int) -> float:
        return self._at(self.ends[i]) - self._at(self.starts[i])

    def _start_profiler(self, pl_module: L.LightningModule) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if pl_module.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        self.profiler.start()

    def _write_profile(self, trainer: L.Trainer, wall: float, tokens: list[int], first: int, stage: str = "") -> None:
        """Stop the profiler and write this process's report and trace (see `profile_steps`)
        of the batches from `first` on, which took `wall` seconds and held `tokens`."""
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        folder = Path(trainer.log_dir if trainer.logger is not None else trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        rank, name = trainer.global_rank, f"profile{stage}-rank"
        (folder / f"{name}{rank}.txt").write_text(profile_report(profiler, wall, tokens, rank, stage) + "\n")
        profiler.export_chrome_trace(str(folder / f"trace{stage}-rank{rank}.json.gz"))
        rank_zero_info(f"Profiled{stage.replace('-', ' ')} batches {first}-{first + len(tokens) - 1}: "
                       f"see {folder}/{name}*.txt.")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)
        ours = self._process_figures(time.perf_counter())
        everyone = _gather(trainer, ours)
        self.summary = summarize(everyone, self.skipped_steps)
        self.summary["processes"] = trainer.world_size
        rank_zero_info(describe(self.summary))
        self._write(trainer, self.summary)

    def _write(self, trainer: L.Trainer, figures: dict[str, Any]) -> None:
        """`speed.json` in the run directory (from the first process)."""
        log_dir = trainer.log_dir if trainer.logger is not None else None  # collective: every process asks
        if log_dir is not None and trainer.is_global_zero:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            start = {"start": self.start} if self.start else {}
            write_json(Path(log_dir) / SPEED_FILE, {**figures, **start}, replace=True)

    # Scoring: `test` and `predict` say how long the questions took (the GPU synchronised at both ends).

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._scoring_start(pl_module)

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._scoring_start(pl_module)

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._count(pl_module, batch, batch_idx)

    def on_predict_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        self._count(pl_module, batch, batch_idx)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._profiled_batch_end(trainer, pl_module, batch_idx)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._profiled_batch_end(trainer, pl_module, batch_idx)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._scoring_end(trainer, pl_module)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._scoring_end(trainer, pl_module)

    def _scoring_start(self, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)
        self.scored = [0, 0]  # questions, non-padding tokens
        self.scoring_start = time.perf_counter()
        self.loading_seconds = self.scoring_start - self.setup_start

    def _count(self, pl_module: L.LightningModule, batch: dict[str, Any], batch_idx: int) -> None:
        if self.profile_steps and batch_idx == 1:  # after the first batch, which compiles
            self._sync(pl_module)
            self._start_profiler(pl_module)
            self.profiled: tuple[float, list[int]] = (time.perf_counter(), [])
        if self.profiler is not None:
            self.profiled[1].append(int(batch["num_tokens"]))
        self.scored[0] += len(batch["ids"])
        self.scored[1] += int(batch["num_tokens"])

    def _profiled_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, batch_idx: int) -> None:
        """With `profile_steps`, scoring batches 1 to `profile_steps` are profiled too
        (`profile-scoring-rank<R>.txt`); the scoring time then includes the profiler's cost."""
        if self.profiler is not None and batch_idx == self.profile_steps:
            self._sync(pl_module)
            self._write_scoring_profile(trainer)

    def _write_scoring_profile(self, trainer: L.Trainer) -> None:
        began, tokens = self.profiled
        self._write_profile(trainer, time.perf_counter() - began, tokens, 1, "-scoring")

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def _scoring_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)
        if self.profiler is not None:  # fewer batches than asked for: report those there were
            self._write_scoring_profile(trainer)
        rows = _gather(trainer, [*map(float, self.scored), time.perf_counter() - self.scoring_start, self.loading_seconds])
        questions, tokens = int(sum(r[0] for r in rows)), int(sum(r[1] for r in rows))
        seconds, loading = max(r[2] for r in rows), max(r[3] for r in rows)
        self.scoring = {"questions": questions, "tokens": tokens, "seconds": seconds, "loading_seconds": loading}
        # After `fit --test_after_fit`, the run's speed.json keeps the fit's figures beside.
        self._write(trainer, {**self.summary, "scoring": self.scoring, "processes": trainer.world_size})
        ready = "Loaded the model" if not self.summary else "Restored the checkpoint into the fitted model"
        rank_zero_info(f"{ready} in {loading:.1f} s. Scored {questions} questions ({tokens:,} tokens) in {seconds:.1f} s: "
                       f"{questions / max(seconds, 1e-9):,.1f} questions/s, {tokens / max(seconds, 1e-9):,.0f} tokens/s.")

    def _process_figures(self, now: float) -> list[float]:
        """This process's figures, as one flat list of floats (gathered over processes)."""
        done = len(self.ends)  # a batch that raised has a start and no end
        starts, ends = [self._at(m) for m in self.starts[:done]], [self._at(m) for m in self.ends]
        tokens, w = self.tokens[:done], min(self.skipped_steps, done)
        timed = range(w, done)
        in_steps = sum(ends[i] - starts[i] for i in timed)
        wall = (ends[-1] - starts[w]) if done > w else 0.0
        gaps = sorted(((starts[i] - ends[i - 1], i) for i in range(w + 1, done)), reverse=True)[:TOP_GAPS]
        gaps += [(0.0, -1)] * (TOP_GAPS - len(gaps))
        durations = sorted(((ends[i] - starts[i], i) for i in timed), reverse=True)
        median = durations[len(durations) // 2][0] if durations else 0.0
        slow = durations[:TOP_GAPS] + [(0.0, -1)] * (TOP_GAPS - len(durations[:TOP_GAPS]))
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        return [
            float(sum(tokens)), now - self.fit_start, float(sum(tokens[i] for i in timed)), in_steps, wall,
            (starts[w] - self.fit_start) if done > w else now - self.fit_start, float(len(timed)), peak,
            *[x for gap in gaps for x in gap], median, *[x for step in slow for x in step], self.loading_seconds,
        ]


def process_seconds() -> float | None:
    """Seconds since this process started, from Linux's /proc (10 ms steps); None elsewhere."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime; the name may hold spaces
        return float(Path("/proc/uptime").read_text().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _gather(trainer: L.Trainer, figures: list[float]) -> list[list[float]]:
    """Every process's figures (one row a process); a single process's own."""
    if trainer.world_size == 1:
        return [figures]
    import torch.distributed as dist

    mine = torch.tensor(figures, dtype=torch.float64, device=trainer.strategy.root_device)
    rows = [torch.empty_like(mine) for _ in range(trainer.world_size)]
    dist.all_gather(rows, mine)
    return [row.tolist() for row in rows]


def summarize(rows: list[list[float]], warmup_steps: int) -> dict[str, Any]:
    """Sum the tokens over processes, take the slowest process's times."""
    def column(i: int) -> list[float]:
        return [row[i] for row in rows]

    tokens, fit_s, step_tokens = sum(column(0)), max(column(1)), sum(column(2))
    in_steps, wall, warmup_s = max(column(3)), max(column(4)), max(column(5))
    gaps = _longest(rows, 8)  # batch -> the longest wait before it on any process
    steps_first = 8 + 2 * TOP_GAPS + 1
    slow_steps = _longest(rows, steps_first)
    return {
        "tokens": int(tokens),
        "fit_seconds": fit_s,
        "fit_tokens_per_s": tokens / max(fit_s, 1e-9),
        "warmup_steps": warmup_steps,
        "warmup_seconds": warmup_s,
        "timed_steps": int(min(column(6))),
        "step_tokens_per_s": step_tokens / max(in_steps, 1e-9) if in_steps else None,
        "wall_tokens_per_s": step_tokens / max(wall, 1e-9) if wall else None,
        "seconds_in_steps": in_steps,
        "seconds_between_steps": max(w - s for w, s in zip(column(4), column(3))),
        "longest_gaps": [{"seconds": s, "before_batch": i} for s, i in gaps[:TOP_GAPS]],
        "median_step_seconds": max(column(steps_first - 1)),
        "slowest_steps": [{"seconds": s, "batch": i} for s, i in slow_steps[:TOP_GAPS]],
        "peak_gpu_gib": max(column(7)),
        "loading_seconds": max(column(steps_first + 2 * TOP_GAPS)),
        "per_process": [{"seconds_in_steps": r[3], "seconds_between_steps": r[4] - r[3], "tokens": int(r[0])}
                        for r in rows],
    }


KERNEL_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                   "cudaLaunchCooperativeKernel", "cudaGraphLaunch")
"""The host calls that start work on the GPU, as torch's profiler names them (a CUDA graph's
replay counts once)."""


def profile_report(profiler: torch.profiler.profile, wall_seconds: float, tokens: list[int], rank: int,
                   stage: str = "") -> str:
    """Where the profiled steps' (or scoring batches') time went: kernel time a step (NCCL
    apart) against the steps' wall time, then the longest kernels and host calls."""
    from torch.autograd import DeviceType

    averages = profiler.key_averages()
    on_gpu = [e for e in averages if e.device_type == DeviceType.CUDA and not e.is_user_annotation]  # kernels, each once
    kernels = sum(e.self_device_time_total for e in on_gpu) / 1e6  # seconds
    nccl = sum(e.self_device_time_total for e in on_gpu if "nccl" in e.key.lower()) / 1e6
    launches = sum(e.count for e in averages if e.device_type == DeviceType.CPU and e.key in KERNEL_LAUNCHES)
    steps = max(len(tokens), 1)
    unit = "scoring batch" if stage else "step"
    compute = kernels - nccl
    lines = [
        f"process {rank}: {len(tokens)} profiled {unit}{'es' if stage else 's'}, {sum(tokens):,} non-padding tokens, "
        f"{wall_seconds / steps:.4f} s a {unit} (with the profiler's own cost)",
        f"GPU kernels {kernels / steps:.4f} s a {unit}: compute {compute / steps:.4f} s, NCCL {nccl / steps:.4f} s "
        f"(NCCL overlaps compute); wall minus compute {(wall_seconds - compute) / steps:.4f} s a {unit}",
        f"{launches / steps:,.0f} kernel launches a {unit}; GPU idle (no compute kernel running) "
        f"{max(0.0, 1 - compute / wall_seconds) if wall_seconds > 0 else 0.0:.0%} of the wall time",
        "",
        "Kernels and calls by time on the GPU:",
        averages.table(sort_by="self_device_time_total", row_limit=30),
        "Host calls by time on the CPU:",
        averages.table(sort_by="self_cpu_time_total", row_limit=20),
    ]
    return "\n".join(lines)


def _longest(rows: list[list[float]], first: int) -> list[tuple[float, int]]:
    """The TOP_GAPS (seconds, batch) pairs stored from column `first` on, merged over processes
    (a batch's longest time on any process), longest first."""
    longest: dict[int, float] = {}
    for row in rows:
        for k in range(TOP_GAPS):
            batch = int(row[first + 1 + 2 * k])
            longest[batch] = max(longest.get(batch, 0.0), row[first + 2 * k])
    return sorted(((s, i) for i, s in longest.items() if i >= 0), reverse=True)


def describe(s: dict[str, Any]) -> str:
    """The end-of-fit lines."""
    over = f" over {s['processes']} processes" if s.get("processes", 1) > 1 else ""
    lines = [f"Loaded the model in {s['loading_seconds']:.1f} s. Trained on {s['tokens']:,} non-padding tokens{over} in {s['fit_seconds']:.1f} s: "
             f"{s['fit_tokens_per_s']:,.0f} tokens/s over the whole fit (warm-up, validation and checkpoints included)."]
    if s["step_tokens_per_s"] is not None:
        gaps = ", ".join(f"{g['seconds']:.1f} s before batch {g['before_batch']}" for g in s["longest_gaps"])
        lines.append(
            f"After {s['warmup_steps']} warm-up batches ({s['warmup_seconds']:.1f} s): {s['step_tokens_per_s']:,.0f} "
            f"tokens/s in steps, {s['wall_tokens_per_s']:,.0f} tokens/s of wall time; "
            f"{s['seconds_between_steps']:.1f} s between steps" + (f" (longest: {gaps})" if gaps else "") + "."
        )
        slow = ", ".join(f"{g['seconds']:.2f} s (batch {g['batch']})" for g in s["slowest_steps"])
        lines.append(f"Median step {s['median_step_seconds']:.3f} s" + (f"; slowest: {slow}" if slow else "") + ".")
    if s["peak_gpu_gib"]:
        lines.append(f"Peak GPU memory {s['peak_gpu_gib']:.2f} GiB.")
    return " ".join(lines)


def busy_note(threads: int, load: float, cores: int) -> str | None:
    """What to do where other work holds the cores `threads` CPU threads would need (a load
    average `load` on `cores` cores), or None on a machine with room. A thread that waits
    for a core stalls every other at each kernel's end: at load 4.5 on 2 cores the demo took
    10x longer with 2 threads."""
    if threads <= 1 or load < cores + 1:  # no more than about one job beyond the cores: no collapse yet
        return None
    return (f"This machine is busy: load {load:.1f} on {cores} cores, so {threads} threads will wait for each other and "
            f"can run many times slower. --threads 1 is faster here; CPU results depend on the thread count, so its "
            f"scores differ from --threads {threads}'s in the last digits.")
