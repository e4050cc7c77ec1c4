"""Fused NF4 dequantize + matmul (Triton, tl.dot) against dequantize-then-matmul, forward and backward
shapes."""

from __future__ import annotations

import pytest
import torch

from shared_kernels.backend import triton_available, triton_interpreting
from shared_kernels.nf4 import dequantize_nf4, double_quantize_absmax, quantize_nf4
from shared_kernels.nf4_matmul import matmul_nf4
from shared_kernels.testing import assert_error_ratio


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _weight(n: int, k: int, double_quant: bool, seed: int = 0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(_device())
    packed, absmax = quantize_nf4(w, 64, backend="torch")
    kw = {}
    if double_quant:
        absmax, absmax2, offset = double_quantize_absmax(absmax)
        kw = dict(absmax2=absmax2, offset=offset)
    dense = dequantize_nf4(packed, absmax, (n, k), 64, backend="torch", **kw)
    return packed, absmax, kw, dense


@pytest.mark.parametrize("double_quant", (False, True))
@pytest.mark.parametrize("transpose_w", (True, False))
def test_triton_matmul_matches_reference(double_quant, transpose_w):
    if not triton_available() or not (torch.cuda.is_available() or triton_interpreting()):
        pytest.skip("needs triton with CUDA or TRITON_INTERPRET=1")
    n, k = 97, 72  # odd out_features: rows straddle bytes and blocks
    packed, absmax, kw, dense = _weight(n, k, double_quant)
    inner = k if transpose_w else n
    x = torch.randn(3, 5, inner, generator=torch.Generator().manual_seed(1)).to(
        _device()
    )  # fp32 (interpreter)
    got = matmul_nf4(x, packed, absmax, (n, k), 64, transpose_w=transpose_w, backend="triton", **kw)
    plain = matmul_nf4(x, packed, absmax, (n, k), 64, transpose_w=transpose_w, backend="torch", **kw)
    w64 = dense.double()
    ref = x.double() @ (w64.t() if transpose_w else w64)
    assert got.shape == plain.shape == (3, 5, n if transpose_w else k)
    assert_error_ratio(got, plain, ref, max_ratio=2.0, atol=1e-5, what="fused NF4 matmul")


def test_matmul_bad_shapes():
    packed, absmax, _, _ = _weight(8, 64, False)
    with pytest.raises(ValueError, match="x must have last dim 64"):
        matmul_nf4(torch.randn(2, 8), packed, absmax, (8, 64))
    with pytest.raises(ValueError, match="shape must be"):
        matmul_nf4(torch.randn(2, 64), packed, absmax, (512,))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_gpu_matmul_bf16_matches_reference(dtype):
    n, k = 4096, 4097
    packed, absmax, kw, dense = _weight(n, k, True)
    x = torch.randn(37, k, device="cuda", dtype=dtype)
    got = matmul_nf4(x, packed, absmax, (n, k), 64, **kw)
    plain = x @ dense.to(dtype).t()
    ref = x.double() @ dense.double().t()
    assert_error_ratio(got, plain, ref, max_ratio=2.0, atol=1e-3, what="fused NF4 matmul (GPU)")
    g = torch.randn(37, n, device="cuda", dtype=dtype)
    got_t = matmul_nf4(g, packed, absmax, (n, k), 64, transpose_w=False, **kw)
    assert_error_ratio(
        got_t,
        g @ dense.to(dtype),
        g.double() @ dense.double(),
        max_ratio=2.0,
        atol=1e-3,
        what="fused NF4 matmul backward (GPU)",
    )


@pytest.mark.parametrize("double_quant", (False, True))
def test_triton_matmul_is_a_custom_op_that_compiles_without_graph_breaks(double_quant):
    if not triton_available() or not (torch.cuda.is_available() or triton_interpreting()):
        pytest.skip("needs triton with CUDA or TRITON_INTERPRET=1")
    n, k = 97, 72
    packed, absmax, kw, dense = _weight(n, k, double_quant)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(2)).to(_device())

    def fwd_bwd(x, g):
        y = matmul_nf4(x, packed, absmax, (n, k), 64, backend="triton", **kw)
        return y, matmul_nf4(g * y, packed, absmax, (n, k), 64, transpose_w=False, backend="triton", **kw)

    compiled = torch.compile(fwd_bwd, backend="aot_eager", fullgraph=True)  # fullgraph: a break is an error
    g = torch.randn(5, n, generator=torch.Generator().manual_seed(3)).to(_device())
    for got, want in zip(compiled(x, g), fwd_bwd(x, g), strict=True):
        assert torch.equal(got, want)  # the same kernel with the same inputs, traced or not
    y = compiled(x, g)[0]
    assert_error_ratio(
        y,
        x @ dense.t(),
        x.double() @ dense.double().t(),
        max_ratio=2.0,
        atol=1e-5,
        what="compiled fused NF4 matmul",
    )


def test_cpu_workspace_reuse_gives_fresh_results_and_is_never_kept_by_autograd():
    # reuse_workspace=True: under no_grad two weights of different shapes and dtypes, one after the other
    # (the second overwrites the scratch the first used), give exactly the plain path's results; with grad
    # mode on the scratch is not used, so a graph that keeps W sees no later overwrite.
    from shared_kernels import nf4_matmul

    nf4_matmul.release_workspaces()
    weights = [_weight(97, 128, True, seed=2), _weight(40, 64, False, seed=3)]
    g = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.bfloat16):
        for transpose_w in (True, False):
            for packed, absmax, kw, dense in weights:
                n, k = dense.shape
                x = torch.randn(5, k if transpose_w else n, generator=g).to(dtype)
                args = (x, packed, absmax, (n, k), 64)
                with torch.no_grad():
                    got = matmul_nf4(*args, transpose_w=transpose_w, reuse_workspace=True, **kw)
                want = matmul_nf4(*args, transpose_w=transpose_w, backend="torch", **kw)
                assert torch.equal(got, want)
    buffers = nf4_matmul._workspaces.buffers
    assert sorted(str(d) for d in buffers) == ["torch.bfloat16", "torch.float32"]
    assert all(b.numel() == 97 * 128 for b in buffers.values())  # grown to the largest weight, kept
    packed, absmax, kw, dense = weights[1]
    x = torch.randn(3, 64, requires_grad=True)
    y = matmul_nf4(x, packed, absmax, (40, 64), 64, reuse_workspace=True, **kw)
    with torch.no_grad():  # overwrite the scratch: a W kept by y's graph must not be it
        matmul_nf4(torch.randn(3, 128), *weights[0][:2], (97, 128), 64, reuse_workspace=True, **weights[0][2])
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 40) @ dense)  # the scratch holds another W now
    nf4_matmul.release_workspaces()
    assert not hasattr(nf4_matmul._workspaces, "buffers")
