"""Whether `--model.keep_dequantized` trains the same model: Unsloth's per-use dequantization
of every 4-bit layer against bitsandbytes' (what `medqa.dequantize` keeps), then one batch's
loss, last hidden states and LoRA gradients with the base in 4-bit and kept dequantized.

    source .gpukit/activate.sh   # on the lent GPU machine
    python benchmarks/make_random_llama.py --shape 8b --nf4 --out /tmp/llama-8b --corpus .gpudata/ori_pqal.json
    python benchmarks/dequantized_same.py --model /tmp/llama-8b --data .gpudata/ori_pqal.json

LoRA's B starts at zero, which leaves A's gradients zero; it is set to small random values
first so that every gradient is compared. Run first as .gpudata/check_deq.py (the same code, paths fixed, its
second figure mislabelled "answer log-prob"); results: benchmarks/results/issue30-h200-2026-12-02-session4.md.
"""

import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))
from medqa.backends import import_unsloth_first  # noqa: E402

import_unsloth_first(["fit"])  # before transformers and peft
import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a 4-bit base (make_random_llama.py --nf4)")
    p.add_argument("--data", required=True, help="ori_pqal.json")
    args = p.parse_args()
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from unsloth.kernels.utils import fast_dequantize

    from medqa.data import QADataModule
    from medqa.dequantize import dequantize_base
    from medqa.model import MedQALoRA
    from medqa.tokens import collate

    dm = QADataModule(source=args.data, pretrained=args.model, max_length=1024)
    dm.setup("fit")
    m = MedQALoRA(pretrained=args.model, answer_tokens=dm.answer_tokens, gradient_checkpointing=False).cuda()
    m.configure_model()
    layers = [x for x in m.model.modules() if isinstance(x, bnb.nn.Linear4bit)]
    worst = 0.0
    for lin in layers:
        a = fast_dequantize(lin.weight, lin.weight.quant_state)
        b = dequantize_4bit(lin.weight.data, lin.weight.quant_state)
        worst = max(worst, float((a.float() - b.float()).abs().max()))
    print(f"{len(layers)} 4-bit layers; Unsloth's dequantization against bitsandbytes': largest difference {worst}, "
          f"dtypes {a.dtype} {b.dtype}")
    batch = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in collate(dm.examples["train"][:8], dm.pad_id).items()}
    g = torch.Generator().manual_seed(0)
    for n, param in m.named_parameters():
        if "lora_B" in n:
            param.data = (torch.randn(param.shape, generator=g) * 0.01).to(param.device, param.dtype)
    out = []
    for kept in (False, True):
        if kept:
            print("bytes before/after", dequantize_base(m.model))
        m.zero_grad(set_to_none=True)
        loss, hidden = m._loss(batch)
        loss.backward()
        norms = torch.stack([q.grad.float().norm() for q in m.parameters() if q.requires_grad])
        out.append((loss.item(), hidden.float(), norms))
        print(f"kept_dequantized={kept}: loss {loss.item():.6f}, grad norm {norms.norm().item():.6f}, "
              f"memory {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
    print(f"loss difference {abs(out[0][0] - out[1][0]):.3e}; largest last-hidden-state difference "
          f"{(out[0][1] - out[1][1]).abs().max().item():.3e}; largest relative grad-norm difference "
          f"{((out[0][2] - out[1][2]).abs() / out[0][2].clamp_min(1e-12)).max().item():.3e}")


if __name__ == "__main__":
    main()
