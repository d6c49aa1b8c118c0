"""LoRA's rank-r update of a projection, three ways, at the 8B shape's sizes: how long each
takes on the GPU, for the forward (Y = X W^T + s (X A^T) B^T) and for the input's gradient
in the backward (dX = dY W + s (dY B) A). W is the dense bf16 weight as Unsloth has it right
after dequantizing NF4.

  separate   Unsloth's: the GEMM, then the low-rank product added in place over the whole
             output (`addmm_`: one more pass over Y, or dX, through memory)
  epilogue   the low-rank product written first, then the GEMM adds itself onto it
             (beta = 1: the GEMM reads it while it computes)
  merged     W' = W + s B A (one pass over the weight, smaller than the output when there
             are more tokens than input features), then one GEMM

    source .gpukit/activate.sh   # on the lent GPU machine
    python benchmarks/lora_update.py --tokens 6144

Prints, for each projection of a Llama 3.1 8B layer and for the layer, microseconds a
variant and its largest difference from a float32 reference. `--check` runs small shapes
on the CPU in float32 and exits non-zero if any variant differs (the tests run it).
"""

from __future__ import annotations

import argparse
import sys

import torch

# (name, input features, output features) of one Llama 3.1 8B decoder layer.
PROJECTIONS = [("q_proj", 4096, 4096), ("k_proj", 4096, 1024), ("v_proj", 4096, 1024), ("o_proj", 4096, 4096),
               ("gate_proj", 4096, 14336), ("up_proj", 4096, 14336), ("down_proj", 14336, 4096)]


def forward(variant: str, X, W, A, B, s):
    """(Y, X A^T): Y = X W^T + s (X A^T) B^T; W is (out, in), A (r, in), B (out, r), as PEFT
    stores them. X A^T comes back from every variant: LoRA's weight gradients need it."""
    XA = X @ A.t()
    if variant == "separate":
        return (X @ W.t()).addmm_(XA, B.t(), alpha=s), XA
    if variant == "epilogue":
        return torch.mm(XA, B.t() * s).addmm_(X, W.t()), XA
    return X @ torch.addmm(W, B, A, alpha=s).t(), XA


def input_grad(variant: str, dY, W, A, B, s):
    """(dX, dY B): dX = dY W + s (dY B) A; dY B, which A's gradient needs, from every variant."""
    dYB = dY @ B
    if variant == "separate":
        return (dY @ W).addmm_(dYB, A, alpha=s), dYB
    if variant == "epilogue":
        return torch.mm(dYB, A * s).addmm_(dY, W), dYB
    return dY @ torch.addmm(W, B, A, alpha=s), dYB


VARIANTS = ["separate", "epilogue", "merged"]


def operands(tokens: int, n_in: int, n_out: int, r: int, dtype, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    made = [torch.randn(shape, generator=g) * scale for shape, scale in
            (((tokens, n_in), 1.0), ((n_out, n_in), n_in ** -0.5), ((r, n_in), n_in ** -0.5), ((n_out, r), 0.1),
             ((tokens, n_out), 1.0))]
    return [t.to(device=device, dtype=dtype) for t in made]


def errors(X, W, A, B, dY) -> dict[str, tuple[float, float]]:
    """Each variant's largest absolute difference from float32 arithmetic, forward and backward,
    relative to the reference's largest value."""
    ref = [t.float() for t in (X, W, A, B, dY)]
    s = 2.0
    want_y, want_dx = forward("separate", *ref[:4], s)[0], input_grad("separate", ref[4], *ref[1:4], s)[0]
    out = {}
    for v in VARIANTS:
        y, dx = forward(v, X, W, A, B, s)[0].float(), input_grad(v, dY, W, A, B, s)[0].float()
        out[v] = (float((y - want_y).abs().max() / want_y.abs().max()),
                  float((dx - want_dx).abs().max() / want_dx.abs().max()))
    return out


def microseconds(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=6144, help="tokens a micro-batch (16 PQA-L questions: about 6,000)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--check", action="store_true", help="small shapes on the CPU in float32; exit 1 on a difference")
    args = p.parse_args()
    if args.check:
        found = [errors(*operands(48, n_in // 128, n_out // 128, 4, torch.float32, "cpu")) for _, n_in, n_out in PROJECTIONS]
        worst = {v: max(max(e[v]) for e in found) for v in VARIANTS}
        print("largest relative difference from the reference, float32 on the CPU:",
              ", ".join(f"{v} {e:.1e}" for v, e in worst.items()))
        sys.exit(0 if all(e < 1e-5 for e in worst.values()) else 1)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --check)")
    dtype, device = torch.bfloat16, "cuda"
    print(f"{torch.cuda.get_device_name(0)}, {args.tokens} tokens, LoRA r={args.rank}, bf16; microseconds "
          "(forward + input gradient); largest relative difference from float32 in brackets\n")
    print("| projection | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    totals = dict.fromkeys(VARIANTS, 0.0)
    for name, n_in, n_out in PROJECTIONS:
        X, W, A, B, dY = operands(args.tokens, n_in, n_out, args.rank, dtype, device)
        err = errors(X, W, A, B, dY)
        cells = []
        for v in VARIANTS:
            us = microseconds(lambda: (forward(v, X, W, A, B, 2.0), input_grad(v, dY, W, A, B, 2.0)), args.repeats)
            totals[v] += us
            cells.append(f"{us:,.0f} ({max(err[v]):.0e})")
        print(f"| {name} {n_in}->{n_out} | " + " | ".join(cells) + " |")
    base = totals["separate"]
    print("| a layer | " + " | ".join(f"**{t:,.0f}** ({t / base:.2f}x)" for t in totals.values()) + " |")
    print("\n32 layers: " + ", ".join(f"{v} {t * 32 / 1000:,.1f} ms" for v, t in totals.items()))


if __name__ == "__main__":
    main()
