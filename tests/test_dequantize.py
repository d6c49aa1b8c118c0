import gc
import weakref

import pytest
import torch

from medqa.model import MedQALoRA
from test_model import answers


def four_bit(**kwargs) -> MedQALoRA:
    module = MedQALoRA(pretrained="builtin:tiny-llama", backend="hf", load_in_4bit=True, dtype="float32", lora_r=4,
                       answer_tokens=answers(), gradient_checkpointing=False, **kwargs)
    module.configure_model()
    return module


def test_a_base_kept_dequantized_trains_and_scores_as_the_4bit_one(medqa_cache):
    """The same loss, answer scores and LoRA gradients as dequantizing before every use: the
    weights hold the values the 4-bit kernels compute with."""
    bnb = pytest.importorskip("bitsandbytes", reason="the dev extra installs bitsandbytes for the 4-bit path")
    from medqa.data import QADataModule
    from medqa.tokens import collate

    packed, kept = four_bit(), four_bit(keep_dequantized=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in packed.model.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in kept.model.modules())
    q_proj = kept.model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer) is torch.nn.Linear and not q_proj.base_layer.weight.requires_grad
    assert kept.trainable_names() == packed.trainable_names()

    dm = QADataModule(source="synthetic", pretrained="builtin:tiny-llama", max_length=512)
    dm.setup("fit")
    batch = collate(dm.examples["train"][:4], dm.pad_id)
    results = []
    for module in (packed, kept):
        g = torch.Generator().manual_seed(0)
        for name, p in module.named_parameters():  # B starts at zero, which would leave A's gradients zero
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.1
        loss, logp = module._forward(batch)  # the answer loss and the label words' log-probs
        loss.backward()
        grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
        results.append((loss.detach(), logp.detach(), grads))
    (loss_a, logp_a, grads_a), (loss_b, logp_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logp_b, logp_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and all(g.abs().sum() > 0 for g in grads_a.values())
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_auto_plans_the_memory_dequantizing_adds_and_leaves_a_cpu_run_in_4bit(medqa_cache):
    """`extra_bytes` is what `dequantize_base` then adds; without a GPU nothing is measured, so
    `auto` keeps the base in 4-bit (a CPU plan is measured, but for the machine's memory)."""
    bnb = pytest.importorskip("bitsandbytes", reason="the dev extra installs bitsandbytes for the 4-bit path")
    from medqa.dequantize import dequantize_base, extra_bytes
    from medqa.memory import first_plan

    module = four_bit()
    plan = first_plan(module.model, "hf", "float32", 512, None, dequantize=True)
    assert (plan.free_bytes is None or plan.cpu) and any(isinstance(m, bnb.nn.Linear4bit) for m in module.model.modules())
    extra = extra_bytes(module.model)
    packed = [weakref.ref(m.weight) for m in module.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    gc.disable()  # the blocks must be free when it returns, not at the next collection
    try:
        before, after = dequantize_base(module.model)
    finally:
        gc.enable()
    assert extra > 0 and after - before == extra
    assert packed and all(ref() is None for ref in packed)
    assert extra_bytes(module.model) == 0


def test_keeping_a_16bit_base_dequantized_changes_nothing(medqa_cache):
    from medqa.dequantize import dequantize_base

    module = MedQALoRA(pretrained="builtin:tiny-llama", backend="hf", load_in_4bit=False, dtype="float32", lora_r=4,
                       answer_tokens=answers(), gradient_checkpointing=False)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    assert dequantize_base(module.model) == (0, 0)
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())
