"""`--model.load_in_fp8` (`medqa.fp8`): the frozen base in e4m3 with row-wise scales, its two
products (forward, and the gradient of the input) in FP8. PyTorch's CPU build multiplies
float8 with `torch._scaled_mm` too (emulated, slowly), so the wiring and the numerics run here;
the speed is the GPU benchmark's (benchmarks/README.md)."""

import pytest
import torch

from medqa.backends import decoder_and_head
from medqa.fp8 import FP8_MAX, MEASURED_FASTER, Fp8Linear, Fp8Unavailable, choose, quantize_rows, to_fp8

import inprocess
from test_model import tiny_module

DEMO = str(inprocess.ROOT / "configs" / "demo.yaml")


def test_rows_are_quantized_within_e4m3s_rounding():
    x = torch.randn(16, 96) * torch.logspace(-3, 2, 16)[:, None]  # rows of very different sizes
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (16, 1)
    assert torch.equal(q.float().abs().amax(1), torch.full((16,), FP8_MAX))  # each row's largest uses the range
    back = q.float() * scale
    # 3 mantissa bits: within half a step (2^-4 of the value), or of the smallest subnormal step near zero
    assert ((back - x).abs() <= x.abs() * 2**-4 + scale * 2**-9 + 1e-30).all()


def test_the_layer_computes_x_times_its_weight_both_ways_in_fp8():
    torch.manual_seed(0)
    weight = torch.randn(48, 80) * torch.linspace(0.01, 1, 48)[:, None]  # output rows of different sizes
    layer = Fp8Linear(weight, torch.float32)
    assert layer.weight.dtype == torch.float8_e4m3fn and not layer.weight.requires_grad
    x = torch.randn(2, 7, 80, requires_grad=True)
    y = layer(x)
    # What the FP8 product is: the input quantized by rows, times the weight it holds.
    qx, sx = quantize_rows(x.detach().reshape(-1, 80))
    expected = (qx.float() * sx) @ layer.dequantized().t()
    torch.testing.assert_close(y.detach().reshape(-1, 48), expected, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    # The gradient: dY with W's row scales folded in, quantized by rows, times W's e4m3 values.
    qg, sg = quantize_rows(g.reshape(-1, 48) * layer.weight_scale.view(1, -1))
    torch.testing.assert_close(x.grad.reshape(-1, 80), (qg.float() * sg) @ layer.weight.float(), rtol=1e-4, atol=1e-5)
    # And both near the full-precision products, as far as e4m3's rounding allows.
    for got, exact in ((y.detach(), x.detach() @ weight.t()), (x.grad, g @ weight)):
        assert (got - exact).norm() / exact.norm() < 0.06
    assert layer.weight.grad is None and layer.weight_scale.grad is None


def test_the_tiny_models_base_in_fp8_keeps_its_answers_and_trains_its_lora(medqa_cache):
    module = tiny_module()
    decoder, head = decoder_and_head(module.model)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = head(decoder(input_ids=ids, use_cache=False)[0]).log_softmax(-1)
    trainable = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    replaced, left, was, now = to_fp8(decoder, torch.float32)
    layers = decoder.layers
    assert (replaced, left) == (7 * len(layers), 0)  # q, k, v, o, gate, up, down in every layer: LoRA's bases
    assert all(isinstance(layer.self_attn.q_proj.base_layer, Fp8Linear) for layer in layers)
    assert now < was / 3  # one byte a weight (plus a scale a row) where float32 held four
    # LoRA's own weights are untouched and still the only trainable ones.
    assert {n: p for n, p in module.model.named_parameters() if p.requires_grad}.keys() == trainable.keys()
    after = head(decoder(input_ids=ids, use_cache=False)[0]).log_softmax(-1)
    assert (after.detach().exp() - before.exp()).abs().max() < 0.05  # the same model, rounded
    after[:, -1, 5].sum().backward()
    # B starts at zero, so A has no gradient yet; B's in the lowest layer came back through the FP8 bases above.
    grads = [p.grad for n, p in module.model.named_parameters() if n in trainable and "lora_B" in n]
    assert len(grads) == 7 * len(layers) and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_true_is_refused_in_one_line_where_nothing_computes_in_fp8(medqa_cache, monkeypatch):
    with pytest.raises(Fp8Unavailable, match="the CPU has no FP8 units"):
        choose(True, torch.device("cpu"))
    assert choose("auto", torch.device("cpu")) == (False, "")  # silent: nobody expects FP8 on a CPU
    assert choose(False, torch.device("cpu")) == (False, "")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(Fp8Unavailable, match=r"A100-SXM4-80GB \(compute capability 8.0\) has no FP8 tensor cores"):
        choose(True, torch.device("cuda"))
    fp8, why = choose("auto", torch.device("cuda"))
    assert not fp8 and "off, as NVIDIA A100-SXM4-80GB (compute capability 8.0) has no FP8" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert choose(True, torch.device("cuda")) == (True, "--model.load_in_fp8 true")
    fp8, why = choose("auto", torch.device("cuda"))
    assert fp8 == any(card in "NVIDIA H100 80GB HBM3" for card in MEASURED_FASTER)
    assert "H100" in why


def test_the_cli_refuses_fp8_on_the_cpu_before_loading(medqa_cache):
    done = inprocess.run(["fit", "--config", DEMO, "--model.load_in_fp8", "true", "--trainer.fast_dev_run", "true"])
    assert done.returncode == 1 and "Loaded" not in done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "medqa fit: error: --model.load_in_fp8 true: the CPU has no FP8 units (the products would be emulated, "
        "far slower); pass false (or auto)")


def test_layers_fp8_cannot_multiply_stay_as_they_were_and_are_counted():
    stack = torch.nn.Sequential(torch.nn.Linear(32, 48, bias=False), torch.nn.Linear(48, 20, bias=False),
                                torch.nn.Linear(20, 16))  # 20 wide: not a multiple of 16; the last has a bias
    stack.requires_grad_(False)
    replaced, left, _, _ = to_fp8(stack, torch.float32)
    assert (replaced, left) == (1, 1)
    assert [type(m).__name__ for m in stack] == ["Fp8Linear", "Linear", "Linear"]
