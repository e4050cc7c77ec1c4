"""MX GEMM: the emulated path is dequantize-then-matmul, the cuBLAS scale swizzle follows the documented
formula, bad operands are refused, and on Blackwell `torch._scaled_mm` agrees with the emulation."""

from __future__ import annotations

import pytest
import torch

from shared_kernels.mx_cast import mx_cast_ref, mx_dequantize
from shared_kernels.mx_gemm import hardware_mx_available, mx_gemm, mx_gemm_ref, swizzle_scales_32_4_4
from shared_kernels.testing import assert_error_ratio, assert_exact

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def operands(m: int, n: int, k: int, seed: int, a_elem=E4M3, b_elem=E4M3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-8, 8, (m, 1), generator=g).float())
    b = torch.randn(n, k, generator=g)
    return a, b, mx_cast_ref(a.to(device), a_elem), mx_cast_ref(b.to(device), b_elem)


def test_emulated_gemm_is_dequantize_then_matmul():
    a, b, (ad, as_), (bd, bs) = operands(97, 72, 1025, seed=0, b_elem=E5M2)
    out = mx_gemm(ad, as_, bd, bs, backend="emulated")
    deq_a, deq_b = mx_dequantize(ad, as_), mx_dequantize(bd, bs)
    assert_exact(out, deq_a @ deq_b.t(), "emulated gemm")
    # fp32 accumulation of exact products: within 2x the error of a plain fp32 matmul of the same operands
    assert_error_ratio(out, deq_a @ deq_b.t(), deq_a.double() @ deq_b.double().t(), what="accumulation")
    assert mx_gemm_ref(ad, as_, bd, bs, out_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_swizzle_matches_the_documented_tile_formula():
    rows, cols = 200, 7
    scale = torch.randint(0, 255, (rows, cols), dtype=torch.uint8)
    flat = swizzle_scales_32_4_4(scale)
    tiles_c = -(-cols // 4)
    assert flat.numel() == 256 * 4 * tiles_c  # padded to (256, 8): 4 tiles of 128 x 4
    for r in range(rows):
        for c in range(cols):
            tile = (r // 128) * tiles_c + c // 4
            rr, cc = r % 128, c % 4
            assert flat[tile * 512 + (rr % 32) * 16 + (rr // 32) * 4 + cc] == scale[r, c]


def test_bad_operands_are_refused():
    _, _, (ad, as_), (bd, bs) = operands(32, 32, 64, seed=1)
    with pytest.raises(ValueError, match="backend"):
        mx_gemm(ad, as_, bd, bs, backend="cublas")
    with pytest.raises(TypeError, match="a_data"):
        mx_gemm(ad.float(), as_, bd, bs)
    with pytest.raises(ValueError, match="share K"):
        mx_gemm(ad, as_, bd[:, :32], bs[:, :1])
    if not hardware_mx_available(ad.device):
        with pytest.raises(ValueError, match="compute capability"):
            mx_gemm(ad, as_, bd, bs, backend="scaled_mm")


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and hardware_mx_available(torch.device("cuda"))),
    reason="needs a GPU of compute capability >= 10.0",
)
def test_scaled_mm_matches_emulation_on_blackwell():
    for m, n, k in [(128, 256, 512), (97, 200, 1000)]:  # the second pads M, N and K
        _, _, (ad, as_), (bd, bs) = operands(m, n, k, seed=2, device="cuda")
        hw = mx_gemm(ad, as_, bd, bs, out_dtype=torch.float32, backend="scaled_mm")
        emu = mx_gemm(ad, as_, bd, bs, out_dtype=torch.float32, backend="emulated")
        ref = mx_dequantize(ad, as_).double() @ mx_dequantize(bd, bs).double().t()
        assert_error_ratio(hw, emu, ref, max_ratio=4.0, atol=1e-3, what="scaled_mm vs emulated")
