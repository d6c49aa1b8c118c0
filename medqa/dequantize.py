"""`--model.keep_dequantized`: a 4-bit base dequantized once and kept in its compute dtype
(`--model.dtype`), instead of dequantized again before every use (each projection twice a
training step: in the forward and in the backward). `true` does it at load, in every command.

The weights keep the values the 4-bit kernels compute with (each NF4 code times its block's
scale), so the model trained and scored is the same one; only where those values are made
changes. The cost is memory: 2 bytes a weight in bfloat16 where NF4 holds about half a byte
(an 8B base: 13.0 GiB against 3.4). Only the linear layers bitsandbytes holds in 4-bit change;
the embeddings, norms and head were never quantized.

`auto` (the default) spends that memory only where it costs nothing else: in `fit`, with
`--model.gradient_checkpointing auto`, when the card still keeps every layer's activations
for the chosen micro-batch with the dequantized weights held. The micro-batch and keeping
activations come first: each gains more than this does.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info


def keep_dequantized(model: Any, why: str) -> None:
    """Dequantize `model`'s 4-bit base (`dequantize_base`) and say so, with `why`."""
    before, after = dequantize_base(model)
    rank_zero_info(f"Dequantized the 4-bit base once ({why}): its linear layers now hold {after / 2**20:,.0f} MiB, "
                   f"{before / 2**20:,.0f} MiB in 4-bit; no dequantization in each step." if after else
                   f"{why}: the base has no 4-bit layer; nothing to dequantize.")


def extra_bytes(model: Any) -> int:
    """The memory `dequantize_base` would add to `model`; 0 without a 4-bit layer."""
    extra = 0
    for _, _, layer in _four_bit_layers(model):
        state = layer.weight.quant_state
        dense = layer.in_features * layer.out_features * state.dtype.itemsize
        extra += dense - layer.weight.numel() * layer.weight.element_size() - _quant_state_bytes(state)
    return extra


def _four_bit_layers(model: Any) -> list[tuple[torch.nn.Module, str, Any]]:
    """(parent, name, layer) of each bitsandbytes 4-bit linear layer; none where bitsandbytes
    is not installed (nothing can be in 4-bit then)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, Linear4bit)]


def dequantize_base(model: Any) -> tuple[int, int]:
    """Replace every bitsandbytes 4-bit linear layer in `model` (a LoRA layer's base included)
    by a frozen `torch.nn.Linear` holding its dequantized weight. Returns the bytes the
    weights took before and after, as (before, after); (0, 0) where nothing was in 4-bit."""
    layers = _four_bit_layers(model)
    if not layers:
        return 0, 0
    from bitsandbytes.functional import dequantize_4bit

    before = after = 0
    while layers:
        parent, name, child = layers.pop()  # out of the list: its 4-bit blocks are freed once replaced
        packed = child.weight
        weight = dequantize_4bit(packed.data, packed.quant_state)  # in the compute dtype, as each use makes it
        linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        if child.bias is not None:
            linear.bias = torch.nn.Parameter(child.bias.data.to(weight.dtype), requires_grad=False)
        linear.train(child.training)
        setattr(parent, name, linear)
        before += packed.numel() * packed.element_size() + _quant_state_bytes(packed.quant_state)
        after += weight.numel() * weight.element_size()
        del packed, child
    gc.collect()  # a 4-bit weight and its layer refer to each other: free the blocks now, before a plan counts them
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return before, after


def _quant_state_bytes(state: Any) -> int:
    """The scales of a 4-bit weight (with double quantization, their own scales too)."""
    tensors = [state.absmax, getattr(state, "code", None)]
    if getattr(state, "state2", None) is not None:
        tensors += [state.state2.absmax, state.state2.code]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
