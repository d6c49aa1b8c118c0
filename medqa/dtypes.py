"""`--model.dtype`: the base model's compute dtype, and what `auto` chooses.

bfloat16 halves the memory of float32 and, where the hardware computes it, runs about twice
as fast; where it does not, it is emulated and runs far slower. On a 2-core AMD EPYC (Zen 4,
AVX-512 BF16, no AMX), a 4096 x 576 by 576 x 1536 matmul took 66 ms in float32 and 30 ms
in bfloat16; the same machine held to AVX2 (`ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`) took 55 ms and 3,556 ms. So `auto` is:

- on CUDA, bfloat16 (float16 on cards without bf16);
- on a CPU, bfloat16 only where its flags name native bf16 units (AMX-BF16 or AVX-512 BF16)
  and a short probe confirms that bf16 matmuls beat float32 ones here (flags say what the
  chip has, not what the math libraries use: a library held to another instruction set, or
  a hypervisor that hides state, can make them lie); float32 otherwise.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags of units that compute bfloat16 natively."""


class DtypeError(ValueError):
    """A `--model.dtype` that is not a torch floating dtype or `auto`."""


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def probe_speedup(size: tuple[int, int, int] = (512, 576, 1536), reps: int = 7) -> float:
    """How many times faster a bfloat16 matmul of `size` runs than a float32 one, on this
    process's threads: the best of `reps` each, the two dtypes taking turns so that other
    work on the machine slows both alike (a probe beside a busy process once read 1.13x where
    an idle one reads 2.2-2.5x). Well under a second on any CPU."""
    m, k, n = size
    pairs = {dtype: (torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(pairs, float("inf"))
    for a, b in pairs.values():
        a @ b  # the first call picks and loads kernels
    for _ in range(reps):
        for dtype, (a, b) in pairs.items():
            began = time.perf_counter()
            a @ b
            best[dtype] = min(best[dtype], time.perf_counter() - began)
        if best[torch.bfloat16] > 0.25:  # emulated bf16 is 50x slower: nothing more to learn
            break
    return best[torch.float32] / best[torch.bfloat16]


def choose_cpu(flags: set[str], speedup: Callable[[], float] | None = None) -> tuple[torch.dtype, str]:
    """(dtype, why) for `auto` on a CPU with `flags`; `speedup()` is called only where the
    flags name bf16 units (`probe_speedup` by default)."""
    native = sorted(set(BF16_FLAGS) & flags)
    if not native:
        return torch.float32, "the CPU has no bfloat16 units (no AMX-BF16 or AVX-512 BF16 flag), where bfloat16 is emulated"
    ratio = (speedup or probe_speedup)()
    if ratio < 1.2:
        return torch.float32, (f"the CPU names {', '.join(native)} but a bfloat16 matmul ran {ratio:.2f}x float32's "
                               "speed here, so its math libraries do not use them")
    return torch.bfloat16, f"the CPU has {', '.join(native)} and a bfloat16 matmul ran {ratio:.1f}x float32's speed"


def describe_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU as CPU figures should name it: model, cores, the vector units that decide its
    speed here (AMX-BF16, AVX-512 BF16, AVX-512, AVX2) and the load now."""
    import os

    name = ""
    try:
        name = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                     if line.startswith("model name")), "")
    except OSError:
        pass
    flags = cpu_flags(cpuinfo)
    units = [label for flag, label in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX-512 BF16"),
                                       ("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags]
    return (f"{name or 'unknown CPU'}, {os.cpu_count()} cores, {' + '.join(units) or 'no AVX2'}, "
            f"load {os.getloadavg()[0]:.1f}")


@functools.cache
def _auto() -> torch.dtype:
    from lightning.pytorch.utilities import rank_zero_info

    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        why = "a CUDA GPU" + ("" if dtype == torch.bfloat16 else " without bfloat16")
    else:
        dtype, why = choose_cpu(cpu_flags())
    rank_zero_info(f"--model.dtype auto: {str(dtype).removeprefix('torch.')}, as {why}.")
    return dtype


def compute_dtype(name: str) -> torch.dtype:
    """The torch dtype `--model.dtype name` computes in: `auto` as the module says (chosen and
    said once a process); bfloat16 is taken as float16 on cards without bf16."""
    if name == "auto":
        return _auto()
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise DtypeError(f"--model.dtype {name!r} is not a floating torch dtype (use auto, bfloat16, float16 or float32)")
    if dtype == torch.bfloat16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return dtype
