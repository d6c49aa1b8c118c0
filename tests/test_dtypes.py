"""`--model.dtype auto`: bfloat16 only where the CPU computes it natively (flags, then a probe),
float32 elsewhere; said once; the answers do not depend on the choice beyond the last digits."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medqa.dtypes import DtypeError, choose_cpu, compute_dtype, cpu_flags, describe_cpu, probe_speedup

from test_cli import cli, read_rows

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
"""torch's, oneDNN's and MKL's kernels held to AVX2: a CPU whose flags may name bf16 units
computes as one without them (what the probe is for)."""


def never() -> float:
    raise AssertionError("the probe ran although no flag names bf16 units")


def test_no_bf16_units_is_float32_without_a_probe():
    dtype, why = choose_cpu({"avx2", "fma", "avx512f"}, never)
    assert dtype == torch.float32 and "no bfloat16 units" in why


@pytest.mark.parametrize("flag", ["amx_bf16", "avx512_bf16"])
def test_bf16_units_are_confirmed_by_the_probe(flag):
    assert choose_cpu({"avx2", flag}, lambda: 2.2)[0] == torch.bfloat16
    dtype, why = choose_cpu({"avx2", flag}, lambda: 0.02)  # flags that lie: 50x slower
    assert dtype == torch.float32 and f"names {flag}" in why and "0.02x float32's speed" in why


def test_the_probe_measures_emulated_bf16_as_slow():
    """Held to AVX2, bf16 matmuls are emulated on any x86 CPU: the probe (a real measurement,
    well under a second) finds them slower than float32."""
    code = "from medqa.dtypes import probe_speedup; print(probe_speedup())"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **AVX2_ONLY}, capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip()) < 1.0
    assert probe_speedup() > 0  # and runs here as it is


def test_flags_and_the_cpu_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert describe_cpu(info).startswith("Test CPU 9000, ") and "AVX-512 BF16 + AVX-512 + AVX2, load " in describe_cpu(info)
    assert cpu_flags(tmp_path / "missing") == set()


def test_dtype_names_are_checked():
    assert compute_dtype("float32") == torch.float32 and compute_dtype("bfloat16") == torch.bfloat16
    for bad in ("int8", "__import__", "bool"):
        with pytest.raises(DtypeError, match=f"--model.dtype '{bad}' is not a floating torch dtype"):
            compute_dtype(bad)


@pytest.mark.slow
def test_auto_says_once_what_it_chose_and_why(tmp_path):
    """Through the CLI, on a CPU held to AVX2: float32, and the reason, in one line."""
    done = subprocess.run([sys.executable, "-m", "medqa", "test", "--config", DEMO, "--model.dtype", "auto",
                           "--trainer.limit_test_batches", "1", "--trainer.logger.init_args.save_dir", str(tmp_path),
                           "--trainer.enable_progress_bar", "false"],
                          env={**os.environ, **AVX2_ONLY}, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    said = [line for line in (done.stdout + done.stderr).splitlines() if "--model.dtype auto:" in line]
    assert len(said) == 1 and "--model.dtype auto: float32, as the CPU " in said[0], said


@pytest.mark.slow
def test_answers_do_not_depend_on_the_dtype_beyond_the_last_digits(tmp_path):
    """The tiny model's dev split predicted in float32 and in bfloat16 (emulated, 7x slower, on
    a CPU without bf16 units): the same decision where float32's is not a near tie,
    probabilities within bfloat16's precision."""
    rows = {}
    for dtype in ("float32", "bfloat16"):
        done = cli("predict", "--model.dtype", dtype, "--data.predict_split", "dev", logs=tmp_path / dtype)
        rows[dtype] = {r["id"]: r for r in read_rows(Path(done.trainer.log_dir))}
    assert rows["float32"].keys() == rows["bfloat16"].keys() and len(rows["float32"]) == 50
    probs = lambda row: torch.tensor([row["p_yes"], row["p_no"], row["p_maybe"]])  # noqa: E731
    for qid, exact in rows["float32"].items():
        p32, p16 = probs(exact), probs(rows["bfloat16"][qid])
        assert (p32 - p16).abs().max() < 0.02, qid
        top2 = p32.topk(2).values
        if top2[0] - top2[1] > 0.05:
            assert p32.argmax() == p16.argmax(), qid
    flips = sum(probs(r).argmax() != probs(rows["bfloat16"][q]).argmax() for q, r in rows["float32"].items())
    assert flips <= 1  # near ties may go either way
