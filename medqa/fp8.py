"""`--model.load_in_fp8`: the frozen base's linear layers computed in FP8, on cards whose tensor
cores multiply float8 at twice bfloat16's rate (compute capability 8.9 and up: Ada, Hopper,
Blackwell).

LoRA never changes the base, so its weights are quantized once, after loading: float8 e4m3
with one scale an output channel (row-wise, the layout Unsloth's and TorchAO's FP8 keep), one
byte a weight where the dequantized default keeps two. Each use quantizes its input alike,
one scale a token, and multiplies on the FP8 units (`torch._scaled_mm`), in the forward and,
in training, for the gradient that flows back to the layers below (dX = dY W; the base needs
no weight gradient). The output channels' scales of W lie along that product's summed
dimension, where a row-wise product cannot apply them: they are folded into dY before it is
quantized. The LoRA weights, norms, attention and the head stay in the compute dtype.

The layer keeps Unsloth's FP8 layout (`weight` in e4m3, `weight_scale` one an output row), so
on the unsloth backend Unsloth's fused LoRA kernels read it themselves (their forward in FP8,
their backward on the weight dequantized); on the hf backend PEFT calls the layer, and both
products below run in FP8.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from medqa.backends import BackendError

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# Cards on which FP8 training was measured faster than the bfloat16 default (benchmarks/README.md);
# `auto` turns FP8 on only on these. None yet: the benchmark has not run on a card with FP8.
MEASURED_FASTER: tuple[str, ...] = ()


class Fp8Unavailable(BackendError):
    """`--model.load_in_fp8 true` where nothing computes in FP8."""


def why_not(device: torch.device) -> str | None:
    """Why `device` cannot compute in FP8, or None where it can."""
    if device.type != "cuda":
        return f"the {device.type.upper()} has no FP8 units (the products would be emulated, far slower)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no FP8 tensor cores; "
                "they start at 8.9 (Ada, Hopper, Blackwell)")
    return None


def choose(setting: bool | str, device: torch.device) -> tuple[bool, str]:
    """Whether this run computes the base in FP8, and why, for `--model.load_in_fp8` = `setting`."""
    if setting is False:  # nothing to ask the device
        return False, ""
    reason = why_not(device)
    if setting is True:
        if reason:
            raise Fp8Unavailable(f"--model.load_in_fp8 true: {reason}; pass false (or auto)")
        return True, "--model.load_in_fp8 true"
    if reason:  # said only where a card is there to be asked about: on a CPU nobody expects FP8
        return False, f"--model.load_in_fp8 auto: off, as {reason}" if device.type == "cuda" else ""
    name = torch.cuda.get_device_name(device)
    if any(card in name for card in MEASURED_FASTER):
        return True, f"--model.load_in_fp8 auto: on, as FP8 training was measured faster on {name}"
    return False, f"--model.load_in_fp8 auto: off, as FP8 has not been measured faster than bfloat16 on {name}"


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """`x` (2-D) in e4m3 with one float32 scale a row, as (values, scales [rows, 1]): x ~ values * scales."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class _Fp8Product(torch.autograd.Function):
    """x W^T with W frozen in e4m3 (`weight` [out, in], `scale` [out, 1]); the gradient of x only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        q, q_scale = quantize_rows(rows)
        out = torch._scaled_mm(q, weight.t(), scale_a=q_scale, scale_b=scale.view(1, -1), out_dtype=x.dtype,
                               use_fast_accum=True)
        ctx.save_for_backward(weight, scale)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        weight, scale = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        q, q_scale = quantize_rows(rows * scale.view(1, -1))  # W's row scales, along dY's columns
        # The second operand column-major: the transpose of W's transpose, one byte a weight copied.
        grad_x = torch._scaled_mm(q, weight.t().contiguous().t(), scale_a=q_scale,
                                  scale_b=torch.ones(1, weight.shape[1], device=grad.device), out_dtype=grad.dtype)
        return grad_x.view(*grad.shape[:-1], weight.shape[1]), None, None


class Fp8Linear(torch.nn.Module):
    """A frozen linear layer held in e4m3 with row-wise scales (no bias: Llama's have none)."""

    def __init__(self, weight: Tensor, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        values, scale = quantize_rows(weight)
        self.weight = torch.nn.Parameter(values, requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
        self.compute_dtype = compute_dtype

    def forward(self, x: Tensor) -> Tensor:
        return _Fp8Product.apply(x.to(self.compute_dtype), self.weight, self.weight_scale)

    def dequantized(self) -> Tensor:
        """The weight this layer computes with, in the compute dtype."""
        return (self.weight.float() * self.weight_scale).to(self.compute_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 row-wise"


def _frozen_linears(decoder: Any) -> list[tuple[torch.nn.Module, str, Any]]:
    """(parent, name, layer) of each frozen linear layer of the decoder stack (a LoRA layer's
    base included), 16-bit or bitsandbytes 4-bit."""
    kinds: tuple[type, ...] = (torch.nn.Linear,)
    try:
        from bitsandbytes.nn import Linear4bit

        kinds += (Linear4bit,)
    except ImportError:
        pass
    return [(parent, name, child) for parent in decoder.modules() for name, child in parent.named_children()
            if isinstance(child, kinds) and not child.weight.requires_grad and child.bias is None]


def _fits(layer: Any) -> bool:
    """`torch._scaled_mm` multiplies sizes that are multiples of 16 (every Llama's are)."""
    return layer.in_features % 16 == 0 and layer.out_features % 16 == 0


def to_fp8(decoder: Any, compute_dtype: torch.dtype) -> tuple[int, int, int, int]:
    """Replace the frozen linear layers of `decoder` (4-bit ones dequantized first) by
    `Fp8Linear`s. Returns (layers replaced, layers left as they were for their sizes, bytes
    of the replaced weights before, after)."""
    replaced = before = after = 0
    frozen = _frozen_linears(decoder)
    layers = [entry for entry in frozen if _fits(entry[2])]
    left = len(frozen) - len(layers)
    while layers:
        parent, name, child = layers.pop()  # out of the list: the old weight is freed once replaced
        weight = child.weight
        state = getattr(weight, "quant_state", None)
        before += weight.numel() * weight.element_size()
        if state is not None:
            from bitsandbytes.functional import dequantize_4bit

            weight = dequantize_4bit(weight.data, state)
        layer = Fp8Linear(weight.data, compute_dtype)
        layer.train(child.training)
        setattr(parent, name, layer)
        replaced += 1
        after += layer.weight.numel() + layer.weight_scale.numel() * 4
        del weight, child
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return replaced, left, before, after


def use_fp8(decoder: Any, compute_dtype: torch.dtype, why: str) -> None:
    """`to_fp8`, said once."""
    replaced, left, before, after = to_fp8(decoder, compute_dtype)
    rank_zero_info(f"The base's {replaced} frozen linear layers compute in FP8 ({why}): e4m3 with row-wise scales, "
                   f"{after / 2**20:,.0f} MiB where they held {before / 2**20:,.0f} MiB"
                   + (f"; {left} stay as they were (sizes not multiples of 16, which FP8 products need)." if left else "."))
