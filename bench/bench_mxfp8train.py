"""mxfp8train benchmarks: MX cast throughput against torchao's to_mx (CPU; the Triton kernel on GPU), and
the step cost of MXLinear (emulated MX GEMMs) against plain linears."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from bench.harness import BenchContext, benchmark


def _torchao_to_mx():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.prototype.mx_formats.config import ScaleCalculationMode
        from torchao.prototype.mx_formats.mx_tensor import to_mx

    return lambda x: to_mx(x, torch.float8_e4m3fn, 32, ScaleCalculationMode.RCEIL)


@benchmark("mxfp8-cast-cpu", package="mxfp8train", device="cpu")
def mxfp8_cast_cpu(ctx: BenchContext) -> None:
    """E4M3 RCEIL cast, blocks of 32 along the last dim: our torch path (eager, and torch.compile) vs
    torchao 0.18 `to_mx` (eager); throughput in GB/s of fp32 input read."""
    from shared_kernels.mx_cast import mx_cast_ref, mx_dequantize_ref, mx_quantize_dequantize

    ao = _torchao_to_mx()
    shapes = [(1024, 1024)] if ctx.quick else [(1024, 1024), (4096, 4096)]
    compiled = torch.compile(mx_cast_ref, dynamic=False)
    for shape in shapes:
        x = torch.randn(shape)
        data, scale = mx_cast_ref(x)
        ao_scale, ao_data = ao(x)
        assert torch.equal(data.view(torch.uint8), ao_data.view(torch.uint8))  # same bytes on this input
        nbytes = x.numel() * 4
        ctx.compare(f"{shape[0]}x{shape[1]} eager", lambda x=x: mx_cast_ref(x), lambda x=x: ao(x),
                    ours_name="mx_cast_ref", anchor_name="torchao to_mx", work=nbytes / 1e9, unit="GB")
        compiled(x)  # compile outside the timing
        ctx.compare(f"{shape[0]}x{shape[1]} compiled", lambda x=x: compiled(x), lambda x=x: ao(x),
                    ours_name="compiled mx_cast_ref", anchor_name="torchao to_mx", work=nbytes / 1e9, unit="GB")
        xt = x.t().contiguous()
        ctx.compare(f"{shape[0]}x{shape[1]} dim 0", lambda x=x: mx_cast_ref(x, dim=0),
                    lambda xt=xt: ao(xt.t().contiguous()), ours_name="mx_cast_ref dim=0",
                    anchor_name="torchao to_mx of the transpose", work=nbytes / 1e9, unit="GB")
        # what an emulated GEMM needs: the fp32 round trip (MXLinear's path without stats since 2026-11-28)
        ctx.compare(f"{shape[0]}x{shape[1]} round trip", lambda x=x: mx_quantize_dequantize(x),
                    lambda x=x: mx_dequantize_ref(*mx_cast_ref(x)), ours_name="mx_quantize_dequantize",
                    anchor_name="mx_cast_ref + mx_dequantize_ref", work=nbytes / 1e9, unit="GB")


def _step(layer: nn.Module, x: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    layer(x).float().square().mean().backward()


@benchmark("mxfp8-linear-step-cpu", package="mxfp8train", device="cpu")
def mxfp8_linear_step_cpu(ctx: BenchContext) -> None:
    """Forward + backward of one linear layer (tokens x in -> out): MXLinear (paper recipe, three emulated
    MX GEMMs) vs nn.Linear in fp32 and in bf16 (this CPU has no bf16 units: bf16 is the slow anchor)."""
    from mxfp8train import MXLinear

    shapes = [(1024, 192, 768)] if ctx.quick else [(1024, 192, 768), (4096, 1024, 1024)]
    for m, k, n in shapes:
        torch.manual_seed(0)
        base = nn.Linear(k, n)
        mx = MXLinear.from_linear(base)
        x = torch.randn(m, k, requires_grad=True)
        bf16 = nn.Linear(k, n).to(torch.bfloat16)
        xb = x.detach().to(torch.bfloat16).requires_grad_()
        ctx.compare(f"M={m} K={k} N={n} vs fp32", lambda mx=mx, x=x: _step(mx, x), lambda base=base, x=x: _step(base, x),
                    ours_name="MXLinear", anchor_name="nn.Linear fp32")
        ctx.compare(f"M={m} K={k} N={n} vs bf16", lambda mx=mx, x=x: _step(mx, x), lambda xb=xb, bf16=bf16: _step(bf16, xb),
                    ours_name="MXLinear", anchor_name="nn.Linear bf16")


@benchmark("mxfp8-cast-cuda", package="mxfp8train", device="cuda")
def mxfp8_cast_cuda(ctx: BenchContext) -> None:
    """Triton MX cast on GPU (E4M3 RCEIL, fp32 in): row blocks, column blocks, and both from one read, vs
    torchao to_mx (eager); GB/s of bytes moved (fp32 read + codes + scales written)."""
    from shared_kernels.mx_cast import mx_cast_2d_triton

    ao = _torchao_to_mx()
    shapes = [(4096, 4096)] if ctx.quick else [(4096, 4096), (16384, 8192)]
    for m, n in shapes:
        x = torch.randn(m, n, device="cuda")
        one_way = x.numel() * (4 + 1) + x.numel() // 32
        both_ways = x.numel() * (4 + 2) + 2 * (x.numel() // 32)
        ctx.compare(f"{m}x{n} rows", lambda x=x: mx_cast_2d_triton(x, torch.float8_e4m3fn, 32, "rceil", True, False),
                    lambda x=x: ao(x), ours_name="triton", anchor_name="torchao to_mx", work=one_way / 1e9, unit="GB")
        ctx.compare(f"{m}x{n} cols", lambda x=x: mx_cast_2d_triton(x, torch.float8_e4m3fn, 32, "rceil", False, True),
                    lambda x=x: ao(x), ours_name="triton", anchor_name="torchao to_mx (rows)", work=one_way / 1e9,
                    unit="GB")
        ctx.compare(f"{m}x{n} rows+cols one read",
                    lambda x=x: mx_cast_2d_triton(x, torch.float8_e4m3fn, 32, "rceil", True, True),
                    lambda x=x: (ao(x), ao(x.t().contiguous())), ours_name="triton",
                    anchor_name="torchao to_mx x2 + transpose", work=both_ways / 1e9, unit="GB")
