"""MX cast: the Triton kernel (interpreter on CPU, or a GPU) and the native CPU kernels (every instruction
set this CPU has) equal the torch reference byte for byte, in both directions, on random and adversarial
inputs; dispatch, compile and the fallbacks."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from shared_kernels import mx_cpu
from shared_kernels.backend import triton_available, triton_interpreting
from shared_kernels.mx_cast import (
    _e4m3_codes_times_2pow_minus8,
    _native_cxx,
    _native_format,
    mx_cast,
    mx_cast_2d_triton,
    mx_cast_ref,
    mx_cast_rows_cols,
    mx_cast_torch,
    mx_dequantize,
    mx_dequantize_ref,
    mx_quantize_dequantize,
)
from shared_kernels.native_build import NativeLibrary
from shared_kernels.testing import assert_exact

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning"
)  # NaN blocks, interpreter
needs_triton = pytest.mark.skipif(
    not triton_available() or not (torch.cuda.is_available() or triton_interpreting()),
    reason="needs triton with a GPU or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def adversarial(m: int, n: int, seed: int) -> torch.Tensor:
    """Rows at magnitudes 2^+-30, with zeros, +-inf, NaN, a tiny (E = -127) block, fp32 max, amaxes at the
    1.75 mantissa boundary, and RNE ties of both element types."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g) * torch.exp2(torch.randint(-30, 30, (m, 1), generator=g).float())
    x[torch.rand(m, n, generator=g) < 0.03] = 0.0
    x[1, 3] = float("inf")
    x[2, 70 % n] = -float("inf")
    x[4, 5] = float("nan")
    x[5] = 0.0
    x[6] *= 2.0**-125
    x[7, :] = 2.0**-140  # subnormal amax
    x[8, 0] = torch.finfo(torch.float32).max
    boundary = (torch.tensor(1.75).view(torch.int32) + torch.arange(-2, 3, dtype=torch.int32)).view(
        torch.float32
    )
    x[9, :5] = boundary * 2.0**8
    x[10, :8] = torch.tensor([448.0, 1.0625, 1.1875, 2**-10, 3 * 2**-10, 432.0, -400.0, 1.375])
    x[11, :4] = torch.tensor([57344.0, 1.125, 1.375, 2**-17])
    return x


@needs_triton
@pytest.mark.parametrize("elem", [E4M3, E5M2])
@pytest.mark.parametrize("mode", ["rceil", "floor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_both_directions_equal_reference(elem, mode, dtype):
    x = adversarial(97, 1025, seed=0)
    if dtype != torch.float32:
        x = x.clamp(-6e4, 6e4) if dtype == torch.float16 else x
    x = x.to(dtype).to(DEVICE)
    rd, rs, cd, cs = mx_cast_2d_triton(x, elem, 32, mode, rows=True, cols=True)
    ref_rd, ref_rs = mx_cast_ref(x.cpu(), elem, 32, mode, dim=-1)
    ref_cd, ref_cs = mx_cast_ref(x.cpu(), elem, 32, mode, dim=0)
    assert_exact(rd.cpu(), ref_rd, "row data")
    assert_exact(rs.cpu(), ref_rs, "row scale")
    assert_exact(cd.cpu(), ref_cd, "column data")
    assert_exact(cs.cpu(), ref_cs, "column scale")


@needs_triton
@pytest.mark.parametrize("block_size", [16, 64])
def test_triton_other_block_sizes_and_single_direction(block_size):
    x = adversarial(130, 200, seed=1).to(DEVICE)
    for dim in (-1, 0):
        data, scale = mx_cast(x, E4M3, block_size, "rceil", dim, backend="triton")
        ref_data, ref_scale = mx_cast_ref(x.cpu(), E4M3, block_size, "rceil", dim)
        assert_exact(data.cpu(), ref_data, f"data dim {dim}")
        assert_exact(scale.cpu(), ref_scale, f"scale dim {dim}")


@needs_triton
def test_triton_dispatch_keeps_leading_dims():
    x = adversarial(3 * 5, 96, seed=2).view(3, 5, 96).to(DEVICE)
    for dim in (-1, 0):
        if dim == 0:
            x = adversarial(64, 15, seed=3).view(64, 3, 5).to(DEVICE)
        data, scale = mx_cast(x, E5M2, 32, "floor", dim, backend="triton")
        ref_data, ref_scale = mx_cast_ref(x.cpu(), E5M2, 32, "floor", dim)
        assert_exact(data.cpu(), ref_data, f"data dim {dim}")
        assert_exact(scale.cpu(), ref_scale, f"scale dim {dim}")


@needs_triton
def test_triton_op_traces_under_compile():
    x = adversarial(64, 96, seed=4).to(DEVICE)

    def both(t):
        return mx_cast_2d_triton(t, E4M3, 32, "rceil", rows=True, cols=True)

    compiled = torch.compile(both, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(x), both(x), strict=True):
        assert_exact(got, want, "compiled")


def test_reference_dequantize_rejects_mismatched_scales():
    data, scale = mx_cast_ref(torch.randn(4, 64))
    with pytest.raises(ValueError, match="scale must have shape"):
        mx_dequantize(data, scale[:, :1])
    with pytest.raises(TypeError, match="scale must be uint8"):
        mx_dequantize(data, scale.float())
    with pytest.raises(TypeError, match="data must be"):
        mx_dequantize(data.float(), scale)
    with pytest.raises(ValueError, match="backend"):
        mx_cast(torch.randn(4, 64), backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_on_gpu_large_shapes_equal_reference():
    x = adversarial(4099, 2080, seed=5).cuda()
    for elem in (E4M3, E5M2):
        for mode in ("rceil", "floor"):
            rd, rs, cd, cs = mx_cast_2d_triton(x, elem, 32, mode, rows=True, cols=True)
            ref_rd, ref_rs = mx_cast_ref(x, elem, 32, mode, dim=-1)
            ref_cd, ref_cs = mx_cast_ref(x, elem, 32, mode, dim=0)
            assert_exact(rd, ref_rd, "row data")
            assert_exact(rs, ref_rs, "row scale")
            assert_exact(cd, ref_cd, "column data")
            assert_exact(cs, ref_cs, "column scale")


def test_e4m3_decode_through_fp16_bits_is_exact_for_every_code():
    codes = torch.arange(256, dtype=torch.uint8).view(E4M3)
    finite = ~torch.isnan(codes.to(torch.float32))
    assert_exact(
        _e4m3_codes_times_2pow_minus8(codes)[finite], codes.to(torch.float32)[finite] * 2.0**-8, "decode"
    )


@pytest.mark.parametrize("elem", [E4M3, E5M2])
@pytest.mark.parametrize("mode", ["rceil", "floor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_dequantize_equals_cast_then_dequantize(elem, mode, dtype):
    """The fused round trip is bit for bit the reference cast then dequantize: on adversarial input (its inf
    and fp32-max blocks take the general decode) and on the same input without them (the fp16-bit decode)."""
    x = adversarial(97, 1025, seed=4)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    finite_scales = torch.where(x.abs() > 2.0**100, 1.0, x)  # NaN stays (comparison is False)
    for inp in (x, finite_scales):
        inp = inp.to(dtype)
        for dim in (0, -1):
            ref = mx_dequantize_ref(*mx_cast_ref(inp, elem, 32, mode, dim), 32, dim)
            assert_exact(mx_quantize_dequantize(inp, elem, 32, mode, dim), ref, f"dim {dim}")
    y = torch.randn(3, 70, 5, generator=torch.Generator().manual_seed(5)) * 1e-3  # middle dim, block 16
    assert_exact(
        mx_quantize_dequantize(y, elem, 16, mode, 1),
        mx_dequantize_ref(*mx_cast_ref(y, elem, 16, mode, 1), 16, 1),
    )


@pytest.mark.parametrize("elem", [E4M3, E5M2])
@pytest.mark.parametrize("mode", ["rceil", "floor"])
@pytest.mark.parametrize("backend", ["torch", "auto", pytest.param("triton", marks=needs_triton)])
def test_rows_cols_cast_equals_the_two_separate_casts(elem, mode, backend):
    """The row + column cast MXLinear uses (one read on Triton) is bit for bit the two reference casts, on
    odd shapes with partial blocks both ways and adversarial values."""
    for m, n, seed in [(97, 1025, 5), (33, 70, 6), (1, 40, 7)]:
        x = adversarial(max(m, 12), n, seed)[:m]
        dev = DEVICE if backend == "triton" else "cpu"
        got = mx_cast_rows_cols(x.to(dev), elem, 32, mode, backend=backend)
        want = (*mx_cast_ref(x, elem, 32, mode, dim=-1), *mx_cast_ref(x, elem, 32, mode, dim=0))
        for g, w, name in zip(
            got, want, ("row data", "row scale", "column data", "column scale"), strict=True
        ):
            assert_exact(g.cpu().view(torch.uint8), w.view(torch.uint8), f"{name} {m}x{n}")


def test_rows_cols_cast_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        mx_cast_rows_cols(torch.randn(2, 3, 32))


@pytest.mark.parametrize("elem", [E4M3, E5M2])
@pytest.mark.parametrize("mode", ["rceil", "floor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_torch_cast_equals_reference(elem, mode, dtype, monkeypatch):
    """mx_cast_torch (chunked, integer scale) gives the reference's bytes: on adversarial inputs without
    inf / NaN / an amax near fp32's max (the fast path itself: RNE ties, subnormal elements, E = -127 and
    all-zero blocks, FLOOR saturation), on the full adversarial set (which falls back to the reference),
    over many chunks and a partial last chunk, dims 0 / -1 / middle, partial blocks."""
    import shared_kernels.mx_cast as mx_cast_mod

    monkeypatch.setattr(mx_cast_mod, "_FAST_CHUNK_BLOCKS", 7)  # many chunks, the last one partial
    full = adversarial(96, 160, seed=8)
    finite = full.clone()
    finite[1:5] = torch.randn(4, 160)  # the rows holding inf / NaN
    finite[8, 0] = 2.5e38  # fp32 max -> a large amax below the top scale byte (mantissa 1.47)
    finite[40:] = torch.randn(56, 160) * torch.exp2(torch.randint(-20, 20, (56, 1)).float())
    finite[12, :32] = torch.randn(32) * 2.0**-20  # subnormal elements beside a normal block max
    finite[12, 0] = 1.0
    for x in (finite, full):
        if dtype == torch.float16:
            x = x.clamp(-6e4, 6e4)
        x = x.to(dtype)
        for t, dim in [(x, -1), (x, 0), (x.view(96, 5, 32), 1), (x[:, :150], -1), (x[:, :150].t(), -1)]:
            got = mx_cast_torch(t, elem, 32, mode, dim)
            want = mx_cast_ref(t, elem, 32, mode, dim)
            tag = f"dim {dim} {tuple(t.shape)}"
            assert_exact(got[0].view(torch.uint8), want[0].view(torch.uint8), f"data {tag}")
            assert_exact(got[1], want[1], f"scale {tag}")
    big = torch.randn(300, 1024) * 5  # 9600 blocks: more than one default chunk
    monkeypatch.undo()
    for got, want in zip(
        mx_cast_torch(big, elem, 32, mode, -1), mx_cast_ref(big, elem, 32, mode), strict=True
    ):
        assert_exact(got.view(torch.uint8), want.view(torch.uint8), "default chunks")


# ------------------------------------------------------------------------------------ native CPU kernels

needs_native = pytest.mark.skipif(
    not mx_cpu.available(), reason="no C compiler: native MX CPU kernels absent"
)


def _native_isas() -> list[int]:
    return list(range(mx_cpu.best_isa() + 1)) if mx_cpu.available() else []


def _assert_native_equals_reference(x, elem, block_size, mode, dim, isa, tag):
    fmt = _native_format(elem, block_size, mode)
    data, scale = mx_cpu.mx_cast_cpu(x, fmt, dim % x.dim(), isa)
    ref_data, ref_scale = mx_cast_ref(x, elem, block_size, mode, dim)
    assert_exact(data, ref_data.view(torch.uint8), f"data {tag}")
    assert_exact(scale, ref_scale, f"scale {tag}")


@needs_native
@pytest.mark.parametrize("elem", [E4M3, E5M2])
@pytest.mark.parametrize("mode", ["rceil", "floor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_cpu_cast_equals_reference_on_every_isa(elem, mode, dtype):
    """Every instruction-set path (scalar, AVX2, AVX-512 where present) gives the reference's bytes on the
    adversarial rows (RNE ties of both element types, subnormal elements, E = -127, all-zero, inf, NaN and
    fp32-max blocks, amaxes at the 1.75 mantissa boundary where RCEIL and FLOOR differ) and on random
    magnitudes: rows, columns, a middle dim, partial blocks both ways, block sizes 16, 32 and 64."""
    x = adversarial(97, 330, seed=9)
    x[60:] = torch.randn(37, 330) * torch.exp2(torch.randint(-40, 40, (37, 1)).float())
    x[61, :64] = torch.randn(64) * 2.0**-20  # subnormal elements beside a normal block max
    x[61, 0] = 1.0
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    x = x.to(dtype)
    cases = [(x, 32, -1), (x, 32, 0), (x[:, :320], 16, -1), (x[:96], 64, 0), (x[:96].view(6, 16, 330), 32, 1)]
    # whole rows of blocks at block sizes 32, 16 (21 blocks per row) and 64
    cases += [(x[:, :320], 32, -1), (x[:, :336], 16, -1), (x[:, :320], 64, -1)]
    for isa in _native_isas():
        for t, bs, dim in cases:
            _assert_native_equals_reference(
                t, elem, bs, mode, dim, isa, f"isa {isa} {tuple(t.shape)} dim {dim}"
            )
        for t, bs in [
            (x, 32),
            (x[:90, :100], 16),
        ]:  # the one-pass row + column cast, partial blocks both ways
            got = mx_cpu.mx_cast_rows_cols_cpu(t, _native_format(elem, bs, mode), isa)
            want = (*mx_cast_ref(t, elem, bs, mode, -1), *mx_cast_ref(t, elem, bs, mode, 0))
            for g, w, name in zip(got, want, ("row data", "row scale", "col data", "col scale"), strict=True):
                assert_exact(g, w.view(torch.uint8), f"rows+cols {name} isa {isa} {tuple(t.shape)}")


def _step_boundaries(elem: torch.dtype) -> torch.Tensor:
    """Rows of 32 (whole blocks, 16+ blocks in a row) holding the element type's max first (so E = k for the
    row's scale 2^k under both rules) and then every positive finite value of the type, every midpoint
    between neighbours (RNE ties) and the fp32 neighbours of each midpoint, both signs, rows scaled by 2^k
    for k in [-20, 20]: every rounding boundary, subnormal, normal and at the top, at many scales."""
    values = torch.arange(256, dtype=torch.uint8).view(elem).float()
    values = values[values.isfinite() & (values >= 0)].sort().values
    mids = (values[1:] + values[:-1]) / 2
    ulp = torch.tensor(1, dtype=torch.int32)
    near = torch.cat([(mids.view(torch.int32) + d * ulp).view(torch.float32) for d in (-1, 1)])
    body = torch.cat([values, mids, near])
    body = torch.cat([body, -body])
    body = torch.cat([body, body[: -body.numel() % 31]])  # whole blocks of 31 after the max
    blocks = torch.cat([torch.full((body.numel() // 31, 1), values.max().item()), body.view(-1, 31)], dim=1)
    rows = blocks.view(1, -1).repeat(41, 1)
    return rows * torch.exp2(torch.arange(-20, 21, dtype=torch.float32)).unsqueeze(1)


@needs_native
@pytest.mark.parametrize("elem", [E4M3, E5M2])
def test_native_cpu_cast_at_every_rounding_boundary(elem):
    """Every code boundary of the element type (ties to even, the fp32 values either side, subnormal codes,
    the step into the normal range, the max) through every ISA path, the C++ op and the reference."""
    x = _step_boundaries(elem)
    for mode in ("rceil", "floor"):
        for isa in _native_isas():
            _assert_native_equals_reference(x, elem, 32, mode, -1, isa, f"boundaries isa {isa} {mode}")
            _assert_native_equals_reference(x.bfloat16(), elem, 32, mode, -1, isa, f"bf16 isa {isa} {mode}")


@needs_native
def test_native_cpu_cast_threads_and_dispatch(monkeypatch):
    """Inputs large enough to be split over threads give the reference's bytes; `mx_cast` and
    `mx_cast_rows_cols` with backend="auto" take the native kernels on CPU (and "torch" does not)."""
    torch.manual_seed(0)
    x = torch.randn(1030, 640) * 7
    x[5, 7] = float("nan")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    for dim in (-1, 0):
        _assert_native_equals_reference(x, E4M3, 32, "rceil", dim, mx_cpu.ISA_AVX512, f"threads dim {dim}")
    got = mx_cpu.mx_cast_rows_cols_cpu(x, _native_format(E4M3, 32, "rceil"))
    want = (*mx_cast_ref(x, dim=-1), *mx_cast_ref(x, dim=0))
    for g, w in zip(got, want, strict=True):
        assert_exact(g, w.view(torch.uint8), "rows+cols threads")
    monkeypatch.setattr(mx_cpu, "_op_state", {"ok": False})  # the ctypes path, as without a C++ compiler
    calls = []
    for name in ("mx_cast_cpu", "mx_cast_rows_cols_cpu"):
        real = getattr(mx_cpu, name)
        monkeypatch.setattr(
            mx_cpu, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k)
        )
    data, scale = mx_cast(x[:64], dim=0)
    assert data.dtype == E4M3 and calls == ["mx_cast_cpu"]
    ref_data, ref_scale = mx_cast_ref(x[:64], dim=0)  # the codes allocated as E4M3 by the kernel's caller
    assert_exact(data.view(torch.uint8), ref_data.view(torch.uint8), "dispatch data")
    assert_exact(scale, ref_scale, "dispatch scale")
    mx_cast_rows_cols(x[:64], backend="auto")
    assert calls == ["mx_cast_cpu", "mx_cast_rows_cols_cpu"]
    mx_cast(x[:64], backend="torch")
    mx_cast_rows_cols(x[:64], backend="torch")
    assert len(calls) == 2


@needs_native
def test_native_cpu_op_compiles_without_graph_break():
    x = adversarial(64, 96, seed=10)

    def cast(t):
        data, scale = mx_cast(t, E4M3, 32, "floor", dim=0)
        return data.view(torch.uint8), scale

    compiled = torch.compile(cast, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(x), mx_cast_ref(x, E4M3, 32, "floor", dim=0), strict=True):
        assert_exact(got, want.view(torch.uint8), "compiled")
    both = torch.compile(
        lambda t: mx_cast_rows_cols(t, E5M2, 32, "rceil"), backend="aot_eager", fullgraph=True
    )
    want = (*mx_cast_ref(x, E5M2, 32, "rceil", -1), *mx_cast_ref(x, E5M2, 32, "rceil", 0))
    for got, w in zip(both(x), want, strict=True):
        assert_exact(got.view(torch.uint8), w.view(torch.uint8), "compiled rows+cols")


needs_cxx_op = pytest.mark.skipif(not _native_cxx(), reason="no C++ compiler: the MX C++ ops are absent")


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@needs_cxx_op
@pytest.mark.parametrize("elem", [E4M3, E5M2])
@pytest.mark.parametrize("mode", ["rceil", "floor"])
def test_cxx_op_equals_reference(elem, mode):
    """The C++ kernels of `mx_cast_cxx` / `mx_cast_rows_cols_cxx` give the reference's bytes: adversarial
    rows, fp32 / bf16 / fp16 input, rows, columns, a middle dim, partial blocks, block sizes 16 and 64, a
    non-contiguous input, an empty one, and a large input split over threads."""
    x = adversarial(97, 330, seed=12)
    x[60:] = torch.randn(37, 330) * torch.exp2(torch.randint(-40, 40, (37, 1)).float())
    op, both = torch.ops.shared_kernels.mx_cast_cxx, torch.ops.shared_kernels.mx_cast_rows_cols_cxx
    cases = [(x, 32, 1), (x, 32, 0), (x[:, :320], 16, 1), (x[:96], 64, 0), (x[:96].view(6, 16, 330), 32, 1)]
    cases += [(x.clamp(-6e4, 6e4).half(), 32, 1), (x.bfloat16(), 32, 0), (x.t(), 32, 1), (x[:0], 32, 0)]
    for t, bs, dim in cases:
        got, want = op(t, elem, bs, mode, dim), mx_cast_ref(t, elem, bs, mode, dim)
        assert got[0].dtype == elem and got[1].shape == want[1].shape
        assert_exact(got[0].view(torch.uint8), want[0].view(torch.uint8), f"data {tuple(t.shape)} dim {dim}")
        assert_exact(got[1], want[1], f"scale {tuple(t.shape)} dim {dim}")
        out = (torch.full(t.shape, 0.5).to(elem), torch.full(want[1].shape, 7, dtype=torch.uint8))
        torch.ops.shared_kernels.mx_cast_cxx_out(t, elem, bs, mode, dim, *out)
        assert_exact(
            out[0].view(torch.uint8), want[0].view(torch.uint8), f"out data {tuple(t.shape)} dim {dim}"
        )
        assert_exact(out[1], want[1], f"out scale {tuple(t.shape)} dim {dim}")
    for t, bs in [(x, 32), (x[:90, :100].bfloat16(), 16)]:
        want = (*mx_cast_ref(t, elem, bs, mode, -1), *mx_cast_ref(t, elem, bs, mode, 0))
        for g, w in zip(both(t, elem, bs, mode), want, strict=True):
            assert_exact(g.view(torch.uint8), w.view(torch.uint8), f"rows+cols {tuple(t.shape)}")
        out = tuple(torch.full(w.shape, 3, dtype=torch.uint8).view(w.dtype) for w in want)
        torch.ops.shared_kernels.mx_cast_rows_cols_cxx_out(t, elem, bs, mode, *out)
        for g, w in zip(out, want, strict=True):
            assert_exact(g.view(torch.uint8), w.view(torch.uint8), f"rows+cols out {tuple(t.shape)}")
    big = torch.randn(1030, 640) * 7
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        got = op(big, elem, 32, mode, 0)
    finally:
        torch.set_num_threads(threads)
    want = mx_cast_ref(big, elem, 32, mode, 0)
    assert_exact(got[0].view(torch.uint8), want[0].view(torch.uint8), "threads data")
    assert_exact(got[1], want[1], "threads scale")


@needs_cxx_op
def test_cxx_op_is_what_mx_cast_calls_eager_and_compiled():
    """With the C++ op built, eager `mx_cast` / `mx_cast_rows_cols` on CPU dispatch exactly that op, and a
    `fullgraph=True` compile of a function calling them is one graph whose only ops are the C++ ops (the
    out-variants); eager, compiled and the reference agree byte for byte on odd shapes."""
    x = adversarial(75, 97, seed=13)
    with _OpLog() as log:
        mx_cast(x, dim=0)
        mx_cast_rows_cols(x)
    assert log.ops == ["shared_kernels.mx_cast_cxx.default", "shared_kernels.mx_cast_rows_cols_cxx.default"]
    graphs = []

    def backend(gm, inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm

    def casts(t):
        return (*mx_cast(t, E5M2, 32, "floor", dim=0), *mx_cast(t, dim=-1), *mx_cast_rows_cols(t, E4M3, 16))

    compiled = torch.compile(casts, backend=backend, fullgraph=True)(x)
    assert len(graphs) == 1
    assert [g for g in graphs[0] if g.startswith("shared_kernels")] == [
        "shared_kernels.mx_cast_cxx_out.default",
        "shared_kernels.mx_cast_cxx_out.default",
        "shared_kernels.mx_cast_rows_cols_cxx_out.default",
    ]
    want = (*mx_cast_ref(x, E5M2, 32, "floor", 0), *mx_cast_ref(x, dim=-1))
    want += (*mx_cast_ref(x, E4M3, 16, dim=-1), *mx_cast_ref(x, E4M3, 16, dim=0))
    for got, eager, w in zip(compiled, casts(x), want, strict=True):
        assert_exact(got.view(torch.uint8), w.view(torch.uint8), "compiled")
        assert_exact(eager.view(torch.uint8), w.view(torch.uint8), "eager")


@needs_cxx_op
def test_cxx_out_op_rejects_wrong_outputs():
    """The out-variants check their outputs (shape, dtype, contiguity) before writing: a clear error each."""
    x = torch.randn(40, 64)
    op = torch.ops.shared_kernels.mx_cast_cxx_out
    data, scale = torch.empty(40, 64, dtype=E4M3), torch.empty(40, 2, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="scale must be a contiguous CPU tensor"):
        op(x, E4M3, 32, "rceil", 1, data, torch.empty(40, 3, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="data must be a contiguous CPU tensor"):
        op(x, E4M3, 32, "rceil", 1, torch.empty(40, 64, dtype=E5M2), scale)
    with pytest.raises(RuntimeError, match="data must be a contiguous CPU tensor"):
        op(x, E4M3, 32, "rceil", 1, torch.empty(64, 40, dtype=E4M3).t(), scale)
    both = (data, scale, torch.empty(40, 64, dtype=E4M3), torch.empty(1, 64, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="col_scale must be a contiguous CPU tensor"):
        torch.ops.shared_kernels.mx_cast_rows_cols_cxx_out(x, E4M3, 32, "rceil", *both)


@needs_cxx_op
@pytest.mark.slow
def test_inductor_allocates_the_cast_outputs():
    """Under inductor a compiled `mx_cast` / `mx_cast_rows_cols` allocates the outputs in the generated
    wrapper and calls the out-variant once, with no metadata checks after the call; bytes equal the
    reference."""
    from torch._inductor.utils import run_and_get_code

    x = adversarial(33, 96, seed=14)
    got, (code,) = run_and_get_code(torch.compile(mx_cast, dynamic=False, fullgraph=True), x)
    assert code.count("mx_cast_cxx_out.default(") == 1 and "assert_tensor_metadata(" not in code
    want = mx_cast_ref(x)
    assert_exact(got[0].view(torch.uint8), want[0].view(torch.uint8), "inductor data")
    assert_exact(got[1], want[1], "inductor scale")
    got, (code,) = run_and_get_code(torch.compile(mx_cast_rows_cols, dynamic=False, fullgraph=True), x)
    assert code.count("mx_cast_rows_cols_cxx_out.default(") == 1 and "assert_tensor_metadata(" not in code
    for g, w in zip(got, (*want, *mx_cast_ref(x, dim=0)), strict=True):
        assert_exact(g.view(torch.uint8), w.view(torch.uint8), "inductor rows+cols")


def test_cxx_op_unavailable_falls_back_to_the_ctypes_op(tmp_path, monkeypatch):
    """Without a C++ compiler: one RuntimeWarning, and the casts (eager, and compiled through the Python op
    `mx_cast_native`) still give the reference's bytes."""
    if not mx_cpu.available():
        pytest.skip("no C compiler: native MX CPU kernels absent")
    monkeypatch.setattr(mx_cpu, "_op_state", {})
    monkeypatch.setenv("SHARED_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-mx")
    with pytest.warns(RuntimeWarning, match="MX CPU C\\+\\+ op unavailable"):
        assert not _native_cxx()
    x = adversarial(40, 96, seed=14)
    compiled = torch.compile(lambda t: mx_cast(t, dim=0), backend="aot_eager", fullgraph=True)
    for got in (mx_cast(x, dim=0), compiled(x)):
        for g, w in zip(got, mx_cast_ref(x, dim=0), strict=True):
            assert_exact(g.view(torch.uint8), w.view(torch.uint8), "fallback")
    monkeypatch.setattr(mx_cpu, "_op_state", {})
    monkeypatch.setenv("SHARED_KERNELS_MX_CXX", "0")
    assert not _native_cxx()  # disabled: no build attempt, no warning


def test_native_cpu_falls_back_to_torch_when_it_cannot_compile(tmp_path, monkeypatch):
    monkeypatch.setattr(
        mx_cpu,
        "_native",
        NativeLibrary("mx_cpu.c", "SHARED_KERNELS_MX_CPU", "MX CPU kernels", mx_cpu._declare),
    )
    monkeypatch.setenv("SHARED_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-mx")
    x = adversarial(12, 64, seed=11)
    with pytest.warns(RuntimeWarning, match="MX CPU kernels unavailable"):
        assert not mx_cpu.available()
    for got, want in zip(mx_cast(x), mx_cast_ref(x), strict=True):  # the torch backend
        assert_exact(got.view(torch.uint8), want.view(torch.uint8), "fallback")
    monkeypatch.setattr(
        mx_cpu,
        "_native",
        NativeLibrary("mx_cpu.c", "SHARED_KERNELS_MX_CPU", "MX CPU kernels", mx_cpu._declare),
    )
    monkeypatch.setenv("SHARED_KERNELS_MX_CPU", "0")
    assert not mx_cpu.available()  # disabled: no compile attempt, no warning
