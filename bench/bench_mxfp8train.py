"""mxfp8train benchmarks, like for like: MX casts against torchao's (eager vs eager, compiled vs compiled,
row casts vs row casts, column casts vs column casts; the Triton kernels on GPU against torchao's Triton
kernels), every cast against a plain memory copy of the same tensor (the bandwidth limit), and the step cost
of MXLinear against torchao's MXFP8Linear (both emulated on CPU).

Throughput rows are GB/s of bytes moved (higher is better): a cast reads the fp32 input (4 B per element)
and writes the codes (1 B) and the scales (1 B per 32); a memory copy (`x.clone()`) reads and writes 4 B per
element. "vs memory copy" rows put a cast's GB/s next to the copy's GB/s for the same input: their ratio is
the fraction of the copy bandwidth the cast reaches."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from bench.harness import BenchContext, benchmark

E4M3 = torch.float8_e4m3fn


def _torchao():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.prototype.mx_formats.config import ScaleCalculationMode
        from torchao.prototype.mx_formats.mx_tensor import to_mx

    return to_mx, ScaleCalculationMode.RCEIL


def _cast_bytes(x: torch.Tensor, directions: int = 1) -> float:
    """Bytes a cast of fp32 x moves, in GB: one read of x, codes and scales written per direction."""
    return (x.numel() * 4 + directions * (x.numel() + x.numel() // 32)) / 1e9


def _copy_row(
    ctx: BenchContext,
    case: str,
    cast_fn,
    copy_fn,
    x: torch.Tensor,
    ours_name: str,
    copy_name: str = "x.clone()",
    directions: int = 1,
) -> None:
    """The cast's GB/s next to a copy's GB/s (its own 8 B per element), timed interleaved."""
    reps = 3 if ctx.quick else 11
    t_cast, t_copy = ctx.time_interleaved([cast_fn, copy_fn], reps=reps, warmup=1 if ctx.quick else 2)
    ctx.record(
        f"{case} vs memory copy",
        _cast_bytes(x, directions) / t_cast,
        x.numel() * 8 / 1e9 / t_copy,
        "GB/s",
        ours_name=ours_name,
        anchor_name=copy_name,
        lower_is_better=False,
    )


def _clone(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


@benchmark("mxfp8-cast-cpu", package="mxfp8train", device="cpu")
def mxfp8_cast_cpu(ctx: BenchContext) -> None:
    """E4M3 RCEIL casts of fp32 on CPU, blocks of 32, like for like. Rows (blocks along the last dim):
    `mx_cast` (backend "auto": the native kernels of `shared_kernels.mx_cpu`) vs torchao 0.18 `to_mx`, both
    eager; compiled `mx_cast` (one opaque custom op) vs compiled `to_mx` (inductor). Columns (blocks along
    dim 0): `mx_cast(x, dim=0)` vs torchao's own column cast on CPU, `to_mx(x.t().contiguous())` (what
    torchao's `triton_to_mxfp8_dim1_reference` does). Every case also against a plain copy of x: eager
    casts against `x.clone()`, the compiled cast against a compiled `x.clone()`. The torch backend of
    `mx_cast` (the fallback without a C compiler) is timed against the native one, and the one-pass row +
    column cast (`mx_cast_rows_cols`) against torchao's two casts. Byte equality with torchao is checked
    first."""
    from shared_kernels.mx_cast import (
        mx_cast,
        mx_cast_ref,
        mx_cast_rows_cols,
        mx_dequantize_ref,
        mx_quantize_dequantize,
    )

    to_mx, rceil = _torchao()

    def ao(t):
        return to_mx(t, E4M3, 32, rceil)

    ours_compiled = torch.compile(mx_cast, dynamic=False)
    ao_compiled = torch.compile(ao, dynamic=False)
    copy_compiled = torch.compile(_clone, dynamic=False)
    shapes = [(256, 256), (1024, 1024)] if ctx.quick else [(256, 256), (1024, 1024), (4096, 4096)]
    for shape in shapes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        name = f"{shape[0]}x{shape[1]}"
        # same bytes as torchao except in its log2-rounding boundary blocks (README): count them
        differ = (mx_cast(x)[0].view(torch.uint8) != ao(x)[1].view(torch.uint8)).sum().item()
        differ += (
            (mx_cast(x, dim=0)[0].view(torch.uint8) != ao(x.t().contiguous())[1].t().view(torch.uint8))
            .sum()
            .item()
        )
        assert differ <= x.numel() // 10_000, f"{differ} codes differ from torchao"
        gb = _cast_bytes(x)
        ctx.compare(
            f"{name} rows eager",
            lambda x=x: mx_cast(x),
            lambda x=x: ao(x),
            ours_name="mx_cast (native)",
            anchor_name="torchao to_mx eager",
            work=gb,
            unit="GB/s",
            note=f"{differ} of {2 * x.numel()} codes (rows + columns) differ from torchao's",
        )
        ours_compiled(x), ao_compiled(x), copy_compiled(x)  # compile outside the timing
        ctx.compare(
            f"{name} rows compiled",
            lambda x=x: ours_compiled(x),
            lambda x=x: ao_compiled(x),
            ours_name="compiled mx_cast (native op)",
            anchor_name="compiled torchao to_mx",
            work=gb,
            unit="GB/s",
        )
        ctx.compare(
            f"{name} columns eager",
            lambda x=x: mx_cast(x, dim=0),
            lambda x=x: ao(x.t().contiguous()),
            ours_name="mx_cast dim=0 (native)",
            anchor_name="torchao to_mx(x.t().contiguous())",
            work=gb,
            unit="GB/s",
        )
        ctx.compare(
            f"{name} rows+columns one pass eager",
            lambda x=x: mx_cast_rows_cols(x),
            lambda x=x: (ao(x), ao(x.t().contiguous())),
            ours_name="mx_cast_rows_cols (native)",
            anchor_name="torchao to_mx rows + to_mx(x.t().contiguous())",
            work=_cast_bytes(x, 2),
            unit="GB/s",
        )
        ctx.compare(
            f"{name} rows eager, native vs torch backend",
            lambda x=x: mx_cast(x),
            lambda x=x: mx_cast(x, backend="torch"),
            ours_name="mx_cast (native)",
            anchor_name="mx_cast backend='torch'",
            work=gb,
            unit="GB/s",
        )
        for case, fn, fn_name, copy_fn, copy_name in [
            ("rows eager", lambda x=x: mx_cast(x), "mx_cast (native)", lambda x=x: x.clone(), "x.clone()"),
            (
                "rows compiled",
                lambda x=x: ours_compiled(x),
                "compiled mx_cast",
                lambda x=x: copy_compiled(x),
                "compiled x.clone()",
            ),
            (
                "columns eager",
                lambda x=x: mx_cast(x, dim=0),
                "mx_cast dim=0",
                lambda x=x: x.clone(),
                "x.clone()",
            ),
        ]:
            _copy_row(ctx, f"{name} {case}", fn, copy_fn, x, fn_name, copy_name)
        # what an emulated GEMM needs: the fp32 round trip (MXLinear's path without stats)
        ctx.compare(
            f"{name} round trip",
            lambda x=x: mx_quantize_dequantize(x),
            lambda x=x: mx_dequantize_ref(*mx_cast_ref(x)),
            ours_name="mx_quantize_dequantize",
            anchor_name="mx_cast_ref + mx_dequantize_ref",
            work=x.numel() * 8 / 1e9,
            unit="GB/s",
            note="bytes: fp32 in + fp32 out",
        )


def _step(layer: nn.Module, x: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    layer(x).float().square().mean().backward()


@benchmark("mxfp8-linear-step-cpu", package="mxfp8train", device="cpu")
def mxfp8_linear_step_cpu(ctx: BenchContext) -> None:
    """Forward + backward of one linear layer (tokens x in -> out), fp32 master weights and input: MXLinear
    (paper recipe: three emulated MX GEMMs, RCEIL, all E4M3) vs torchao 0.18 `MXFP8Linear` with
    `KernelPreference.EMULATED` (the same recipe, emulated), and vs an fp32 nn.Linear (the cost of
    emulation)."""
    from torchao.prototype.moe_training.mxfp8_linear import MXFP8Linear
    from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

    from mxfp8train import MXLinear

    shapes = [(1024, 192, 768)] if ctx.quick else [(1024, 192, 768), (4096, 1024, 1024)]
    for m, k, n in shapes:
        torch.manual_seed(0)
        base = nn.Linear(k, n)
        mx = MXLinear.from_linear(base)
        ao = MXFP8Linear(k, n, kernel_preference=KernelPreference.EMULATED)
        ao.load_state_dict(base.state_dict())
        x = torch.randn(m, k, requires_grad=True)
        ctx.compare(
            f"M={m} K={k} N={n} vs torchao",
            lambda mx=mx, x=x: _step(mx, x),
            lambda ao=ao, x=x: _step(ao, x),
            ours_name="MXLinear",
            anchor_name="torchao MXFP8Linear (emulated)",
        )
        ctx.compare(
            f"M={m} K={k} N={n} vs fp32",
            lambda mx=mx, x=x: _step(mx, x),
            lambda base=base, x=x: _step(base, x),
            ours_name="MXLinear",
            anchor_name="nn.Linear fp32",
        )


@benchmark("mxfp8-cast-cuda", package="mxfp8train", device="cuda")
def mxfp8_cast_cuda(ctx: BenchContext) -> None:
    """Triton MX casts on GPU (E4M3 RCEIL, fp32 in) against torchao's Triton kernels: rows vs
    `triton_to_mxfp8_dim0`, columns vs `triton_to_mxfp8_dim1`, rows + columns from one read vs the two
    torchao kernels; every case also against `x.clone()`."""
    from shared_kernels.mx_cast import mx_cast_2d_triton

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.prototype.mx_formats.kernels import triton_to_mxfp8_dim0, triton_to_mxfp8_dim1

    shapes = [(4096, 4096)] if ctx.quick else [(4096, 4096), (16384, 8192)]
    for m, n in shapes:
        x = torch.randn(m, n, device="cuda")
        name = f"{m}x{n}"
        cases = [
            (
                "rows",
                lambda x=x: mx_cast_2d_triton(x, E4M3, 32, "rceil", True, False),
                lambda x=x: triton_to_mxfp8_dim0(x, 32, "rceil"),
                "torchao triton_to_mxfp8_dim0",
                1,
            ),
            (
                "columns",
                lambda x=x: mx_cast_2d_triton(x, E4M3, 32, "rceil", False, True),
                lambda x=x: triton_to_mxfp8_dim1(x, 32, "rceil"),
                "torchao triton_to_mxfp8_dim1",
                1,
            ),
            (
                "rows+columns one read",
                lambda x=x: mx_cast_2d_triton(x, E4M3, 32, "rceil", True, True),
                lambda x=x: (triton_to_mxfp8_dim0(x, 32, "rceil"), triton_to_mxfp8_dim1(x, 32, "rceil")),
                "torchao dim0 + dim1 kernels",
                2,
            ),
        ]
        for case, ours, anchor, anchor_name, directions in cases:
            ctx.compare(
                f"{name} {case}",
                ours,
                anchor,
                ours_name="triton",
                anchor_name=anchor_name,
                work=_cast_bytes(x, directions),
                unit="GB/s",
            )
            _copy_row(ctx, f"{name} {case}", ours, lambda x=x: x.clone(), x, "triton", directions=directions)
