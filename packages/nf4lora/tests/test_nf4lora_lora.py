"""LoRA through a frozen NF4 base: initial equality, no base gradient, nothing dequantized saved for backward,
gradients equal to a dense fp64 reference, merge/unmerge."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nf4lora.lora import Linear4bit, LoRALinear4bit
from nf4lora.weight import NF4Weight


def _layer(out_f=97, in_f=72, r=8, dropout=0.0, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_f, out_f, bias=bias)
    weight = NF4Weight.from_float(linear.weight, 64, double_quant=True)
    layer = LoRALinear4bit(weight, linear.bias, r=r, alpha=16, dropout=dropout)
    return linear, layer


def test_lora_at_init_equals_base():
    _, layer = _layer()
    x = torch.randn(3, 5, 72)
    base = Linear4bit(layer.weight, layer.bias)
    assert torch.equal(layer(x), base(x))
    assert torch.equal(layer.lora_B.weight, torch.zeros_like(layer.lora_B.weight))
    bound = 1 / 72**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 72
    assert (
        float(layer.lora_A.weight.detach().abs().max()) <= bound
        and float(layer.lora_A.weight.detach().std()) > 0.3 * bound
    )
    assert layer.scaling == 16 / 8


def test_base_gets_no_gradient_and_only_adapters_train():
    _, layer = _layer()
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight"}
    x = torch.randn(4, 72, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.bias.grad is None
    assert all(not b.requires_grad and b.grad is None for b in layer.weight.buffers())
    assert layer.lora_A.weight.grad is not None and x.grad is not None


def test_backward_saves_no_dequantized_weight():
    _, layer = _layer(out_f=128, in_f=96)
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x = torch.randn(6, 96, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = Linear4bit(layer.weight, layer.bias)(x)
    assert saved == []  # the base function saves no tensor at all (not even x)
    y.sum().backward()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    assert (128, 96) not in saved and (96, 128) not in saved, saved


def test_input_and_lora_gradients_equal_dense_fp64_reference():
    _, layer = _layer(r=4)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    x = torch.randn(2, 7, 72, requires_grad=True)
    grad_out = torch.randn(2, 7, 97)
    (layer(x) * grad_out).sum().backward()

    w64 = layer.weight.dequantize(torch.float32).double()  # exact: the fp32 values are the spec
    a64 = layer.lora_A.weight.detach().double().requires_grad_()
    b64 = layer.lora_B.weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y64 = F.linear(x64, w64, layer.bias.double()) + layer.scaling * F.linear(F.linear(x64, a64), b64)
    (y64 * grad_out.double()).sum().backward()
    for got, ref, what in (
        (x.grad, x64.grad, "input"),
        (layer.lora_A.weight.grad, a64.grad, "lora_A"),
        (layer.lora_B.weight.grad, b64.grad, "lora_B"),
    ):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5, msg=what)
        assert float((got.double() - ref).abs().max()) < 1e-4 * float(ref.abs().max()) + 1e-6, what


def test_merge_requantizes_like_peft_and_unmerge():
    _, layer = _layer(r=4)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    x = torch.randn(5, 72)
    y = layer(x)
    original = layer.weight
    merged_dense = original.dequantize(torch.float32) + layer.delta_weight().float()
    layer.merge()
    assert layer.merged and layer.weight is not original
    # peft's bitsandbytes merge: the sum re-quantized with the same settings, then the base alone
    expected = NF4Weight.from_float(merged_dense, 64, double_quant=True)
    assert torch.equal(layer.weight.packed_bytes(), expected.packed_bytes())
    assert layer.weight.double_quant and layer.weight.quant_type == original.quant_type
    assert torch.equal(layer(x), F.linear(x, expected.dequantize(), layer.bias))
    rel = float((layer(x) - y).norm() / y.norm())
    assert 0 < rel < 0.1  # lossy: 4-bit rounding of the merged weight
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    back = NF4Weight.from_float(layer.weight.dequantize(torch.float32) - layer.delta_weight().float(), 64)
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.weight.packed_bytes(), back.packed_bytes())  # peft's unmerge: re-quantized again
    torch.testing.assert_close(layer(x), y, rtol=0.3, atol=0.3)  # back near the start, not exactly
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()


def test_bad_lora_arguments():
    w = NF4Weight.from_float(torch.randn(8, 64), 64)
    with pytest.raises(ValueError, match="r must be a positive int"):
        LoRALinear4bit(w, r=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        LoRALinear4bit(w, r=2, dropout=1.0)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        Linear4bit(NF4Weight.from_float(torch.randn(64), 64))


def test_triton_backend_matches_torch_backend_forward_and_backward():
    from shared_kernels.backend import triton_available, triton_interpreting

    if not triton_available() or not (torch.cuda.is_available() or triton_interpreting()):
        pytest.skip("needs triton with CUDA or TRITON_INTERPRET=1")
    _, layer = _layer(out_f=97, in_f=72, r=4)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    x = torch.randn(2, 3, 72, requires_grad=True)
    grad_out = torch.randn(2, 3, 97)
    (layer(x) * grad_out).sum().backward()
    grads = (x.grad.clone(), layer.lora_A.weight.grad.clone())
    x.grad = None
    layer.lora_A.weight.grad = None
    layer.backend = "triton"
    y = layer(x)
    (y * grad_out).sum().backward()
    layer.backend = "torch"
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, grads[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.weight.grad, grads[1], rtol=1e-5, atol=1e-5)


def test_compiled_forward_and_backward_in_one_graph_equal_eager():
    # The CPU path (native dequantize op inside the autograd.Function) compiles with fullgraph=True (any graph
    # break is an error) and gives eager's bits, for both layers, forward and input/adapter gradients.
    _, layer = _layer(out_f=75, in_f=130, r=8)
    torch.nn.init.normal_(layer.lora_B.weight)
    base = Linear4bit(layer.weight, layer.bias, compute_dtype=torch.float32)
    x = torch.randn(3, 5, 130, dtype=torch.bfloat16)
    for module in (base, layer):
        compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
        outs = []
        for run in (module, compiled):
            xi = x.clone().requires_grad_()
            y = run(xi)
            y.float().square().sum().backward()
            grads = [xi.grad] + [p.grad.clone() for p in module.parameters() if p.requires_grad]
            module.zero_grad(set_to_none=True)
            outs.append([y, *grads])
        for want, got in zip(*outs, strict=True):
            assert want.dtype == got.dtype and torch.equal(want, got)
