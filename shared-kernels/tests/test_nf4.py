"""NF4 quantize / dequantize / double quantization: the torch reference against bitsandbytes (byte for byte)
and the Triton kernels (under TRITON_INTERPRET=1 on CPU, or on a GPU) against the reference."""

from __future__ import annotations

import math

import pytest
import torch

from shared_kernels.nf4 import (
    DYNAMIC_CODE,
    FLOAT_DTYPES,
    NF4_CODE,
    NF4_MIDPOINTS,
    QUANTIZE_TABLES,
    SUPPORTED_BLOCKSIZES,
    dequantize_4bit,
    dequantize_absmax_ref,
    dequantize_nf4,
    double_quantize_absmax,
    quantize_4bit,
    quantize_nf4,
)
from shared_kernels.testing import assert_exact, assert_sqnr


def _bnb():
    return pytest.importorskip("bitsandbytes.functional")


def _bnb_dequantize(q, state):
    # bitsandbytes wraps its generic (odd last dim) path in torch.compile; eager gives the same bits, quicker.
    with torch._dynamo.config.patch(disable=True):
        return _bnb().dequantize_4bit(q, state)


def _sample(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 2.5
    x[:: max(1, n // 7)] *= 8  # some outliers so blocks have very different absmax
    return x.to(dtype)


def test_code_values_are_normal_quantiles():
    # offset = 1 - (1/30 + 1/32)/2; 8 positive and 7 negative quantiles of an fp32 linspace, taken in fp64,
    # plus 0; rounded to fp32 and divided by the max in fp32 (bitsandbytes' create_normal_map).
    offset = 1 - (1 / 30 + 1 / 32) / 2
    assert offset == pytest.approx(0.9677083, abs=1e-7)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    pos = normal.icdf(torch.linspace(0.9677083, 0.5, 9)[:-1].double())
    neg = -normal.icdf(torch.linspace(0.9677083, 0.5, 8)[:-1].double())
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    assert_exact(values / values.max(), NF4_CODE, "NF4 code from quantiles")


def test_dynamic_map_matches_bitsandbytes():
    assert_exact(DYNAMIC_CODE, _bnb().create_dynamic_map(signed=True), "dynamic map")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", SUPPORTED_BLOCKSIZES)
def test_quantize_bytes_equal_bitsandbytes(dtype, blocksize):
    F = _bnb()
    for n in (1, 97, 1025, 3 * blocksize + 33):
        x = _sample(n, dtype, seed=n + blocksize)
        packed, absmax = quantize_nf4(x, blocksize, backend="torch")
        q, state = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
        assert_exact(packed, q.reshape(-1), f"packed n={n}")
        assert_exact(absmax, state.absmax, f"absmax n={n}")


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", (32, 64, 256, 4096))
def test_dequantize_equal_bitsandbytes(out_dtype, blocksize):
    F = _bnb()
    for shape in ((97,), (13, 78), (5, 1025)):  # odd and even last dims take different bnb paths
        x = _sample(math.prod(shape), torch.float32, seed=blocksize).reshape(shape)
        q, state = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
        state.dtype = out_dtype
        expected = _bnb_dequantize(q, state)
        got = dequantize_nf4(q.reshape(-1), state.absmax, shape, blocksize, out_dtype, backend="torch")
        assert_exact(got, expected, f"dequantize {shape}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", (32, 64, 4096))
def test_double_quant_equal_bitsandbytes(dtype, blocksize):
    F = _bnb()
    # 64 * 700 + 5 elements -> 701 blocks at 64: three second-level blocks, the last partial.
    for n in (97, 64 * 700 + 5, 1 << 16):
        x = _sample(n, dtype, seed=n)
        packed, absmax = quantize_nf4(x, blocksize, backend="torch")
        qabsmax, absmax2, offset = double_quantize_absmax(absmax)
        q, state = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
        assert_exact(packed, q.reshape(-1), "packed")
        assert_exact(qabsmax, state.absmax, "qabsmax")
        assert_exact(absmax2, state.state2.absmax, "absmax2")
        assert_exact(offset, state.offset, "offset")
        got = dequantize_nf4(
            packed, qabsmax, (n,), blocksize, dtype, absmax2=absmax2, offset=offset, backend="torch"
        )
        assert_exact(got, _bnb_dequantize(q, state).reshape(n), "dequantize with double quantization")


def test_double_quant_8bit_codes_equal_bitsandbytes_on_many_values():
    # The 8-bit map is applied through bitsandbytes' 65536-point lookup grid, not exact nearest: 1M values
    # exercise values close to every midpoint.
    F = _bnb()
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(1)).abs() + 0.01
    q, absmax2, offset = double_quantize_absmax(x)
    expected_q, state = F.quantize_blockwise(x - x.mean(), blocksize=256)
    assert_exact(q, expected_q, "8-bit codes")
    assert_exact(absmax2, state.absmax, "absmax2")


def test_tie_on_midpoint_takes_lower_code():
    # absmax 1.0 makes the scaled value the input itself; each midpoint must map to the code below it.
    for blocksize, n in ((64, 64), (64, 64 + 16)):  # a full block (reciprocal) and a partial one (division)
        x = torch.zeros(n)
        start = n - 16
        x[start] = 1.0
        x[start + 1 : start + 16] = NF4_MIDPOINTS
        if start:
            x[0] = 1.0
        packed, _ = quantize_nf4(x, blocksize, backend="torch")
        codes = torch.stack([packed >> 4, packed & 0xF], 1).reshape(-1)[start : start + 16]
        assert codes[0] == 15
        assert codes[1:].tolist() == list(range(15)), codes.tolist()
        # just above a midpoint goes up
        x[start + 1 : start + 16] = torch.nextafter(NF4_MIDPOINTS, torch.tensor(2.0))
        packed, _ = quantize_nf4(x, blocksize, backend="torch")
        codes = torch.stack([packed >> 4, packed & 0xF], 1).reshape(-1)[start + 1 : start + 16]
        assert codes.tolist() == list(range(1, 16))


def test_nibble_order_and_odd_padding():
    # element 2i -> high nibble; codes 15, 0, 7, 8, 14 then padding with code 7 (the value 0.0)
    x = torch.tensor([1.0, -1.0, 0.0, NF4_CODE[8].item(), NF4_CODE[14].item()])
    packed, absmax = quantize_nf4(x, 64, backend="torch")
    assert packed.tolist() == [0xF0, 0x78, 0xE7]
    assert absmax.tolist() == [1.0]
    assert_exact(dequantize_nf4(packed, absmax, (5,), 64, backend="torch"), x, "round trip of code values")


def test_double_quant_reconstruction_error_is_small():
    x = _sample(64 * 1000 + 7, torch.float32)
    packed, absmax = quantize_nf4(x, 64, backend="torch")
    qabsmax, absmax2, offset = double_quantize_absmax(absmax)
    rebuilt = dequantize_absmax_ref(qabsmax, absmax2, offset)
    # 8-bit dynamic codes: relative error of the centred constants below ~2% of each block's absmax2.
    assert float((rebuilt - absmax).abs().max()) <= 0.02 * float(absmax2.max())
    assert_sqnr(absmax, rebuilt, 35.0, "double-quantized absmax")
    y = dequantize_nf4(packed, qabsmax, x.shape, 64, absmax2=absmax2, offset=offset, backend="torch")
    y_plain = dequantize_nf4(packed, absmax, x.shape, 64, backend="torch")
    assert_sqnr(x, y_plain, 18.0, "NF4")
    assert_sqnr(x, y, 18.0, "NF4 + DQ")


def test_all_zero_block():
    x = torch.randn(64 * 3 + 10)
    x[64:128] = 0.0  # a full all-zero block
    x[192:] = 0.0  # an all-zero partial last block
    packed, absmax = quantize_nf4(x, 64, backend="torch")
    assert absmax[1].item() == 0.0
    assert absmax[3].item() == pytest.approx(1e-38)  # bitsandbytes' floor, stored for the partial block
    y = dequantize_nf4(packed, absmax, x.shape, 64, backend="torch")
    assert_exact(y[64:128], torch.zeros(64), "all-zero block")
    assert_exact(y[192:], torch.zeros(10), "all-zero partial block")


def test_non_finite_raises_by_default_and_poisons_its_block_otherwise():
    x = torch.randn(256)
    x[70] = float("nan")
    x[200] = float("inf")
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        quantize_nf4(x)
    packed, absmax = quantize_nf4(x, 64, check_finite=False, backend="torch")
    assert math.isnan(absmax[1].item()) and math.isinf(absmax[3].item())
    y = dequantize_nf4(packed, absmax, x.shape, 64, backend="torch")
    assert not bool(torch.isfinite(y[64:128]).any())
    assert not bool(torch.isfinite(y[192:]).any())
    assert bool(torch.isfinite(y[:64]).all()) and bool(torch.isfinite(y[128:192]).all())
    F = _bnb()
    q, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    assert_exact(packed, q.reshape(-1), "non-finite input, packed (bitsandbytes CPU)")
    assert_exact(absmax, state.absmax, "non-finite input, absmax (bitsandbytes CPU)")


def test_bad_input_raises_value_error_naming_the_argument():
    with pytest.raises(ValueError, match="x must be float32"):
        quantize_nf4(torch.arange(10))
    with pytest.raises(ValueError, match="x must not be empty"):
        quantize_nf4(torch.zeros(0))
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quantize_nf4(torch.randn(10), blocksize=48)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quantize_nf4(torch.randn(10), blocksize=16)
    packed, absmax = quantize_nf4(torch.randn(100), 64)
    with pytest.raises(ValueError, match="packed must hold"):
        dequantize_nf4(packed, absmax, (101, 2), 64)
    with pytest.raises(ValueError, match="absmax must hold"):
        dequantize_nf4(packed, absmax, (100,), 32)
    with pytest.raises(ValueError, match="packed must be uint8"):
        dequantize_nf4(packed.float(), absmax, (100,), 64)
    with pytest.raises(ValueError, match="dtype must be"):
        dequantize_nf4(packed, absmax, (100,), 64, dtype=torch.int32)
    with pytest.raises(ValueError, match="absmax2 and offset are required"):
        dequantize_nf4(packed, absmax.to(torch.uint8), (100,), 64)
    with pytest.raises(ValueError, match="backend must be one of"):
        quantize_nf4(torch.randn(10), backend="cuda")


# ------------------------------------------------------------------------------------ native CPU kernels


def _native_ok() -> None:
    from shared_kernels import nf4_cpu

    if not nf4_cpu.available():
        pytest.skip("native NF4 CPU kernels unavailable (no C compiler, or SHARED_KERNELS_NF4_CPU=0)")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", SUPPORTED_BLOCKSIZES)
def test_native_cpu_quantize_and_dequantize_equal_bitsandbytes(dtype, blocksize):
    # backend="auto" on CPU is the native path; sizes cover odd counts, a partial last block and (1 << 19,
    # above the per-thread minimum) the multi-threaded split.
    _native_ok()
    F = _bnb()
    for n in (1, 97, 3 * blocksize + 33, 1 << 19):
        x = _sample(n, dtype, seed=n + blocksize)
        packed, absmax = quantize_nf4(x, blocksize)
        q, state = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
        assert_exact(packed, q.reshape(-1), f"packed n={n}")
        assert_exact(absmax, state.absmax, f"absmax n={n}")
        for out_dtype in FLOAT_DTYPES:
            state.dtype = out_dtype
            got = dequantize_nf4(packed, absmax, (n,), blocksize, out_dtype)
            assert_exact(got, _bnb_dequantize(q, state).reshape(n), f"dequantize n={n} -> {out_dtype}")


def _kernel_paths() -> list[tuple[str, int | None]]:
    """(instruction set, streaming-store threshold) of every dequantize path this CPU can run: each ISA with
    plain stores, and AVX-512 with streaming stores forced on every `out=` (threshold 0)."""
    from shared_kernels import nf4_cpu

    if not nf4_cpu.available():
        return []
    best = nf4_cpu.ISAS.index(nf4_cpu.select_isa(None))
    paths: list[tuple[str, int | None]] = [(name, None) for name in nf4_cpu.ISAS[: best + 1]]
    if best == nf4_cpu.ISAS.index("avx512"):
        paths.append(("avx512", 0))
    return paths


@pytest.fixture
def kernel_path(request):
    """Forces one dequantize instruction set (+ streaming threshold) for the test, then restores the best."""
    from shared_kernels import nf4_cpu

    _native_ok()
    name, stream = request.param
    assert nf4_cpu.select_isa(name) == name
    nf4_cpu.set_stream_bytes(stream)
    yield name
    nf4_cpu.select_isa(None)
    nf4_cpu.set_stream_bytes()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.mark.parametrize("kernel_path", _kernel_paths(), indirect=True, ids=lambda p: f"{p[0]}-stream{p[1]}")
@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
def test_every_dequantize_kernel_path_equals_reference_and_bitsandbytes(kernel_path, quant_type):
    # Scalar, AVX2 and AVX-512 (plain and streaming stores) on odd counts, partial last blocks, blocksizes
    # 32..4096, with and without double quantization, fresh and `out=` outputs: the bits of the torch
    # reference (NaN, subnormal and fp16-overflowing blocks included) and of bitsandbytes (finite blocks).
    F = _bnb()
    for blocksize, n in (
        (32, 1),
        (32, 3 * 32 + 17),
        (64, 64 * 37 + 33),
        (128, 128 * 5 + 1),
        (4096, 4096 + 35),
    ):
        x = _sample(n, torch.float32, seed=n + blocksize)
        packed, absmax = quantize_4bit(x, blocksize, quant_type)
        # The last blocks' scales: NaN, subnormal, above fp16's max, and two bf16 ties (code 1.0 * 1 + 2^-8
        # rounds down to even, * 1 + 3 * 2^-8 up); every block holds the code of +-1.0 (its max).
        specials = torch.tensor([float("nan"), 1.3e-40, 7e4, 1 + 2**-8, 1 + 3 * 2**-8])
        odd = absmax.clone()
        k = min(len(specials), odd.numel())
        odd[-k:] = specials[-k:]
        qabsmax, absmax2, offset = double_quantize_absmax(absmax)
        q, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
        for out_dtype in FLOAT_DTYPES:
            got = dequantize_4bit(packed, odd, (n,), blocksize, out_dtype, quant_type)
            want = dequantize_4bit(packed, odd, (n,), blocksize, out_dtype, quant_type, backend="torch")
            assert_exact(_bits(got), _bits(want), f"n={n} bs={blocksize} -> {out_dtype}, odd scales")
            got = dequantize_4bit(
                packed, odd, (n,), blocksize, out_dtype, quant_type, out=torch.empty_like(got)
            )
            assert_exact(_bits(got), _bits(want), f"n={n} bs={blocksize} -> {out_dtype}, odd scales, out=")
            got = dequantize_4bit(
                packed, qabsmax, (n,), blocksize, out_dtype, quant_type, absmax2=absmax2, offset=offset
            )
            state.dtype = out_dtype
            assert_exact(
                got, _bnb_dequantize(q, state).reshape(n), f"n={n} bs={blocksize} +DQ -> {out_dtype}"
            )


@pytest.mark.parametrize("kernel_path", _kernel_paths()[:3], indirect=True, ids=lambda p: p[0])
@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
def test_every_quantize_kernel_path_equals_reference_and_bitsandbytes(kernel_path, quant_type):
    # Scalar and AVX-512 quantize (AVX2 runs the scalar one) on fp32 / bf16 / fp16 inputs, blocksizes 32 to
    # 4096, partial last blocks; ties at every midpoint and just above, +-0 blocks, a NaN block and an inf
    # block against the reference; random data against bitsandbytes.
    F = _bnb()
    mids = QUANTIZE_TABLES[quant_type][0]
    special = torch.zeros(64 * 5)
    special[0], special[1:16], special[17:32] = 1.0, mids, torch.nextafter(mids, torch.tensor(2.0))
    special[64 + 3], special[128 + 5], special[192:256] = float("nan"), float("-inf"), -0.0
    special[256:271] = -mids
    for dtype in FLOAT_DTYPES:
        x = special.to(dtype)
        got = quantize_4bit(x, 64, quant_type, check_finite=False)
        want = quantize_4bit(x, 64, quant_type, check_finite=False, backend="torch")
        assert_exact(got[0], want[0], f"packed, ties and non-finite, {dtype}")
        assert_exact(_bits(got[1]), _bits(want[1]), f"absmax, ties and non-finite, {dtype}")
        for blocksize, n in ((32, 32 * 9 + 7), (64, 64 * 37 + 33), (4096, 4096 * 2 + 35)):
            x = _sample(n, dtype, seed=n + blocksize)
            packed, absmax = quantize_4bit(x, blocksize, quant_type)
            q, state = F.quantize_4bit(
                x, blocksize=blocksize, quant_type=quant_type, compress_statistics=False
            )
            assert_exact(packed, q.reshape(-1), f"packed n={n} bs={blocksize} {dtype}")
            assert_exact(absmax, state.absmax, f"absmax n={n} bs={blocksize} {dtype}")


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
def test_native_cpu_double_quant_dequantize_equals_bitsandbytes(out_dtype):
    _native_ok()
    F = _bnb()
    for blocksize, n in ((64, 64 * 700 + 5), (32, 1 << 19), (4096, 4096 * 3 + 2)):
        x = _sample(n, torch.float32, seed=n)
        packed, absmax = quantize_nf4(x, blocksize)
        qabsmax, absmax2, offset = double_quantize_absmax(absmax)
        q, state = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
        state.dtype = out_dtype
        got = dequantize_nf4(packed, qabsmax, (n,), blocksize, out_dtype, absmax2=absmax2, offset=offset)
        assert_exact(got, _bnb_dequantize(q, state).reshape(n), f"dequantize +DQ n={n}")


def test_native_cpu_ties_zero_blocks_and_non_finite_equal_reference():
    _native_ok()
    x = torch.zeros(64 * 5 + 16)
    x[0] = 1.0
    x[1:16] = NF4_MIDPOINTS  # ties, full block
    x[20:35] = torch.nextafter(NF4_MIDPOINTS, torch.tensor(2.0))  # just above
    x[64 * 2 + 3] = float("nan")
    x[64 * 3 + 3] = float("-inf")
    x[64 * 4 : 64 * 5] = -0.0  # block 1 stays +0.0, block 4 is -0.0
    x[320] = 1.0
    x[321:336] = NF4_MIDPOINTS  # ties, partial block
    for dtype in FLOAT_DTYPES:
        xd = x.to(dtype)
        p_nat, a_nat = quantize_nf4(xd, 64, check_finite=False)
        p_ref, a_ref = quantize_nf4(xd, 64, check_finite=False, backend="torch")
        assert_exact(p_nat, p_ref, f"packed {dtype}")
        assert_exact(a_nat, a_ref, f"absmax {dtype}")
        for out_dtype in FLOAT_DTYPES:
            y_nat = dequantize_nf4(p_ref, a_ref, x.shape, 64, out_dtype)
            y_ref = dequantize_nf4(p_ref, a_ref, x.shape, 64, out_dtype, backend="torch")
            finite = torch.isfinite(y_ref)
            assert_exact(y_nat[finite], y_ref[finite], f"finite values -> {out_dtype}")
            # NaN payloads differ between torch's own vectorised and scalar casts; NaN-ness and inf must not.
            assert torch.equal(torch.isnan(y_nat), torch.isnan(y_ref))
            assert torch.equal(y_nat[torch.isinf(y_ref)], y_ref[torch.isinf(y_ref)])


def test_native_cpu_16bit_rounding_of_extreme_scales_equals_reference():
    # absmax from 1e-12 to 1e6: fp16 subnormals, underflow to 0, overflow to inf, bf16 ties.
    _native_ok()
    g = torch.Generator().manual_seed(3)
    packed = torch.randint(0, 256, (32 * 400,), dtype=torch.uint8, generator=g)
    absmax = torch.logspace(-12, 6, 400) * (1 + torch.rand(400, generator=g))
    absmax[::7] = 65504.0  # fp16 max: codes * max stay representable or round up to inf
    for out_dtype in (torch.float16, torch.bfloat16, torch.float32):
        y_nat = dequantize_nf4(packed, absmax, (64 * 400,), 64, out_dtype)
        y_ref = dequantize_nf4(packed, absmax, (64 * 400,), 64, out_dtype, backend="torch")
        assert_exact(y_nat, y_ref, f"extreme scales -> {out_dtype}")


def test_native_cpu_falls_back_to_reference_when_it_cannot_compile(tmp_path, monkeypatch):
    from shared_kernels import nf4_cpu

    monkeypatch.setattr(nf4_cpu, "_native", nf4_cpu.native_library())
    monkeypatch.setenv("SHARED_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-nf4")
    x = _sample(1000, torch.float32)
    with pytest.warns(RuntimeWarning, match="NF4 CPU kernels unavailable"):
        packed, absmax = quantize_nf4(x, 64)
    assert not nf4_cpu.available()
    p_ref, a_ref = quantize_nf4(x, 64, backend="torch")
    assert_exact(packed, p_ref, "packed (fallback)")
    assert_exact(absmax, a_ref, "absmax (fallback)")
    assert_exact(
        dequantize_nf4(packed, absmax, x.shape, 64),
        dequantize_nf4(packed, absmax, x.shape, 64, backend="torch"),
        "dequantize",
    )
    monkeypatch.setenv("SHARED_KERNELS_NF4_CPU", "0")
    monkeypatch.setattr(nf4_cpu, "_native", nf4_cpu.native_library())
    assert not nf4_cpu.available()  # disabled: no compile attempt, no warning


def test_generic_build_without_x86_paths_equals_reference(monkeypatch):
    # nf4_cpu.c built with -DNF4_CPU_GENERIC leaves out every x86 path (what a non-x86 CPU compiles): the
    # scalar quantize and dequantize, built and run here, give the reference's bits on odd counts, partial
    # last blocks, NF4 and FP4, fp32 / bf16 / fp16 inputs and outputs, double quantization and `out=`.
    from shared_kernels import nf4_cpu
    from shared_kernels.native_build import CFLAGS

    _native_ok()
    monkeypatch.setattr(nf4_cpu, "_native", nf4_cpu.native_library([*CFLAGS, "-DNF4_CPU_GENERIC"]))
    assert nf4_cpu.available()
    assert nf4_cpu.select_isa("avx512") == "scalar"  # the x86 paths are not in this build
    for quant_type in ("nf4", "fp4"):
        for blocksize, n in ((32, 32 * 9 + 7), (64, 64 * 37 + 33), (256, 1), (4096, 4096 + 35)):
            for dtype in FLOAT_DTYPES:
                x = _sample(n, dtype, seed=n + blocksize)
                got = quantize_4bit(x, blocksize, quant_type)
                want = quantize_4bit(x, blocksize, quant_type, backend="torch")
                where = f"{quant_type} n={n} bs={blocksize} {dtype}"
                assert_exact(got[0], want[0], f"packed, {where}")
                assert_exact(_bits(got[1]), _bits(want[1]), f"absmax, {where}")
            packed, absmax = want
            qabsmax, absmax2, offset = double_quantize_absmax(absmax)
            for out_dtype in FLOAT_DTYPES:
                args = (packed, absmax, (n,), blocksize, out_dtype, quant_type)
                ref = dequantize_4bit(*args, backend="torch")
                assert_exact(_bits(dequantize_4bit(*args)), _bits(ref), f"dequantize {where} -> {out_dtype}")
                got = dequantize_4bit(*args, out=torch.full_like(ref, float("nan")))
                assert_exact(_bits(got), _bits(ref), f"dequantize out= {where} -> {out_dtype}")
                dq = dict(absmax2=absmax2, offset=offset)
                args = (packed, qabsmax, (n,), blocksize, out_dtype, quant_type)
                ref = dequantize_4bit(*args, backend="torch", **dq)
                assert_exact(_bits(dequantize_4bit(*args, **dq)), _bits(ref), f"+DQ {where} -> {out_dtype}")


@pytest.mark.parametrize("backend", ("auto", "torch"))
def test_dequantize_into_out_equals_a_fresh_output(backend):
    # `out=` (a reused buffer: no page faults) gives the fresh call's bits on the native path (written in
    # place) and the reference (copied), with and without double quantization; a wrong `out` is a ValueError.
    shape = (37, 129)
    x = _sample(math.prod(shape), torch.float32, seed=21).reshape(shape)
    packed, absmax = quantize_4bit(x, 64, "fp4")
    qabsmax, absmax2, offset = double_quantize_absmax(absmax)
    for a, kw in ((absmax, {}), (qabsmax, dict(absmax2=absmax2, offset=offset))):
        for dtype in FLOAT_DTYPES:
            want = dequantize_4bit(packed, a, shape, 64, dtype, "fp4", backend=backend, **kw)
            out = torch.full(shape, 7.0, dtype=dtype)
            got = dequantize_4bit(packed, a, shape, 64, dtype, "fp4", backend=backend, out=out, **kw)
            assert got is out
            assert_exact(out, want, f"out= {dtype} {kw.keys()}")
    for bad in (torch.empty(shape, dtype=torch.bfloat16), torch.empty(shape[::-1]).t(), torch.empty(10)):
        with pytest.raises(ValueError, match="out must be a contiguous torch.float32 tensor of shape"):
            dequantize_4bit(packed, absmax, shape, 64, torch.float32, "fp4", backend=backend, out=bad)


def _graph_capturing_backend(graphs: list):
    """A torch.compile backend that keeps each traced graph (to look for the ops) and runs it eagerly."""
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    return aot_autograd(fw_compiler=keep)


@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
def test_native_cpu_ops_compile_in_one_graph_and_equal_eager(quant_type):
    # The native kernels are custom ops: fullgraph=True fails on any graph break (a ctypes call would be one),
    # including the finiteness check; the compiled results are the eager bytes.
    _native_ok()
    shape = (97, 130)  # 12610 elements: 197 whole blocks of 64 and a partial one of 2
    x = _sample(math.prod(shape), torch.bfloat16, seed=11).reshape(shape)

    # Double quantization (a data-dependent input check, run once per weight) stays outside the graph.
    qabsmax, absmax2, offset = double_quantize_absmax(quantize_4bit(x, 64, quant_type)[1])

    def quantize_then_dequantize(x, qabsmax, absmax2, offset):
        packed, absmax = quantize_4bit(x, 64, quant_type)
        y = dequantize_4bit(packed, absmax, shape, 64, torch.float16, quant_type)
        y_dq = dequantize_4bit(
            packed, qabsmax, shape, 64, torch.bfloat16, quant_type, absmax2=absmax2, offset=offset
        )
        return packed, absmax, y, y_dq

    graphs: list = []
    compiled = torch.compile(
        quantize_then_dequantize, backend=_graph_capturing_backend(graphs), fullgraph=True
    )
    dq = (qabsmax, absmax2, offset)
    names = ("packed", "absmax", "y", "y_dq")
    for got, want, name in zip(compiled(x, *dq), quantize_then_dequantize(x, *dq), names, strict=True):
        assert_exact(got, want, f"compiled {name}")
    assert len(graphs) == 1
    assert (
        "nf4_quantize_cpu" in graphs[0]
        and graphs[0].count("torch.ops.shared_kernels.nf4_dequantize_cpu") == 2
    )
    bad = x.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        compiled(bad, *dq)


# ------------------------------------------------------------------------------------------ Triton kernels


def _triton_ok() -> None:
    from shared_kernels.backend import triton_available, triton_interpreting

    if not triton_available():
        pytest.skip("triton not installed")
    if not torch.cuda.is_available() and not triton_interpreting():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", (32, 64, 256, 4096))
def test_triton_quantize_equals_reference(dtype, blocksize):
    _triton_ok()
    for n in (1, 97, 1025, 2 * blocksize + 33):
        x = _sample(n, dtype, seed=n).to(_device())
        x[n // 2 :: 11] = 0.0
        p_tri, a_tri = quantize_nf4(x, blocksize, backend="triton")
        p_ref, a_ref = quantize_nf4(x, blocksize, backend="torch")
        assert_exact(p_tri, p_ref, f"packed n={n}")
        assert_exact(a_tri, a_ref, f"absmax n={n}")


def test_triton_quantize_ties_zero_blocks_and_non_finite_equal_reference():
    _triton_ok()
    x = torch.zeros(64 * 4 + 16)
    x[0] = 1.0
    x[1:16] = NF4_MIDPOINTS  # ties, full block (reciprocal path)
    x[256] = 1.0
    x[257:272] = NF4_MIDPOINTS[:15]  # ties, partial block (division path)
    x[64 * 2 + 3] = float("nan")
    x[64 * 3 + 3] = float("-inf")
    x = x.to(_device())  # block 1 stays all zero
    p_tri, a_tri = quantize_nf4(x, 64, check_finite=False, backend="triton")
    p_ref, a_ref = quantize_nf4(x, 64, check_finite=False, backend="torch")
    assert_exact(p_tri, p_ref, "packed")
    assert_exact(a_tri, a_ref, "absmax")


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("double_quant", (False, True))
def test_triton_dequantize_equals_reference(out_dtype, double_quant):
    _triton_ok()
    for blocksize, shape in ((64, (97,)), (32, (13, 77)), (256, (9, 1025)), (4096, (3, 4099))):
        x = _sample(math.prod(shape), torch.float32, seed=blocksize).reshape(shape).to(_device())
        packed, absmax = quantize_nf4(x, blocksize, backend="torch")
        kwargs = {}
        if double_quant:
            absmax, absmax2, offset = double_quantize_absmax(absmax)
            kwargs = dict(absmax2=absmax2, offset=offset)
        got = dequantize_nf4(packed, absmax, shape, blocksize, out_dtype, backend="triton", **kwargs)
        ref = dequantize_nf4(packed, absmax, shape, blocksize, out_dtype, backend="torch", **kwargs)
        assert_exact(got, ref, f"dequantize {shape} blocksize {blocksize}")


@pytest.mark.gpu
def test_gpu_auto_backend_matches_cpu_reference_on_large_tensor():
    x = torch.randn(4096, 4097, device="cuda", dtype=torch.bfloat16)
    packed, absmax = quantize_nf4(x, 64)
    p_ref, a_ref = quantize_nf4(x.cpu(), 64, backend="torch")
    assert_exact(packed.cpu(), p_ref, "packed (GPU kernel vs CPU reference)")
    assert_exact(absmax.cpu(), a_ref, "absmax (GPU kernel vs CPU reference)")
    qabsmax, absmax2, offset = double_quantize_absmax(absmax)
    y = dequantize_nf4(packed, qabsmax, x.shape, 64, torch.bfloat16, absmax2=absmax2, offset=offset)
    y_ref = dequantize_nf4(
        packed.cpu(),
        qabsmax.cpu(),
        x.shape,
        64,
        torch.bfloat16,
        absmax2=absmax2.cpu(),
        offset=offset.cpu(),
        backend="torch",
    )
    assert_exact(y.cpu(), y_ref, "dequantize (GPU kernel vs CPU reference)")


@pytest.mark.parametrize("double_quant", (False, True))
def test_triton_dequantize_is_a_custom_op_that_compiles_without_graph_breaks(double_quant):
    _triton_ok()
    shape = (13, 77)
    x = _sample(math.prod(shape), torch.float32, seed=5).reshape(shape).to(_device())
    packed, absmax = quantize_nf4(x, 64, backend="torch")
    kwargs = {}
    if double_quant:
        absmax, absmax2, offset = double_quantize_absmax(absmax)
        kwargs = dict(absmax2=absmax2, offset=offset)

    def dequant(p, a, kw):
        return dequantize_nf4(p, a, shape, 64, torch.bfloat16, backend="triton", **kw) * 2

    compiled = torch.compile(dequant, backend="aot_eager", fullgraph=True)  # fullgraph: a break is an error
    ref = dequantize_nf4(packed, absmax, shape, 64, torch.bfloat16, backend="torch", **kwargs) * 2
    assert_exact(compiled(packed, absmax, kwargs), ref, "compiled Triton dequantize")
    torch.library.opcheck(
        torch.ops.shared_kernels.nf4_dequantize.default,
        (
            packed,
            absmax,
            x.numel(),
            64,
            torch.float32,
            kwargs.get("absmax2"),
            DYNAMIC_CODE if double_quant else None,
            kwargs.get("offset"),
            256,
        ),
    )


# ----------------------------------------------------------------------------------------------------- FP4


def _bnb_equal(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    # bitsandbytes' native CPU kernel decodes FP4 code 8 as -0.0 in its scalar tail and +0.0 elsewhere (its
    # table holds +0.0, as ours): bits are compared after -0.0 -> +0.0 on its side only.
    assert_exact(got, expected.reshape(got.shape) + 0.0, what)


def test_fp4_code_and_tables_match_bitsandbytes():
    from shared_kernels.nf4 import FP4_CODE, QUANTIZE_TABLES

    code = _bnb().get_4bit_type("fp4", device="cpu")
    assert_exact(FP4_CODE, code, "FP4 code")
    midpoints, order, pad = QUANTIZE_TABLES["fp4"]
    assert order.tolist() == [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3]
    assert pad == 0 and QUANTIZE_TABLES["nf4"][2] == 7  # the index of 0.0 pads an odd count
    assert_exact(midpoints, (code.sort().values[:-1] + code.sort().values[1:]) / 2, "FP4 midpoints")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("backend", ("torch", "auto"))
def test_fp4_quantize_and_dequantize_equal_bitsandbytes(dtype, backend):
    # Odd shapes, partial last blocks, odd element counts, a 1-D input taking bitsandbytes' native kernel and
    # a 4096 block taking its torch fallback; zeros in every block.
    F = _bnb()
    for blocksize, shape in (
        (64, (1,)),
        (64, (97,)),
        (32, (13, 78)),
        (256, (5, 1025)),
        (128, (7, 2 * 128 + 34)),
        (64, (1 << 15,)),
        (4096, (3, 4099)),
    ):
        x = _sample(math.prod(shape), dtype, seed=blocksize).reshape(shape)
        x.view(-1)[::13] = 0.0
        packed, absmax = quantize_4bit(x, blocksize, "fp4", backend=backend)
        q, state = F.quantize_4bit(x, blocksize=blocksize, quant_type="fp4", compress_statistics=False)
        assert_exact(packed, q.reshape(-1), f"packed {shape}")
        assert_exact(absmax, state.absmax, f"absmax {shape}")
        for out_dtype in FLOAT_DTYPES:
            state.dtype = out_dtype
            got = dequantize_4bit(packed, absmax, shape, blocksize, out_dtype, "fp4", backend=backend)
            _bnb_equal(got, _bnb_dequantize(q, state), f"dequantize {shape} -> {out_dtype}")


@pytest.mark.parametrize("backend", ("torch", "auto"))
def test_fp4_ties_zeros_padding_and_nan_equal_bitsandbytes(backend):
    # Every midpoint of the sorted FP4 code (ties go to the lower value; 0.0 lies on the midpoint between
    # FP4's two zeros), just above each, +-0.0, a NaN, in a full block (reciprocal) and a partial one
    # (division) and an odd count (padding).
    from shared_kernels.nf4 import QUANTIZE_TABLES

    F = _bnb()
    midpoints = QUANTIZE_TABLES["fp4"][0]
    above = torch.nextafter(midpoints, torch.tensor(2.0))
    block = torch.cat([torch.tensor([1.0, -0.0, 0.0, 1e-30, -1e-30]), midpoints, above])  # 35 values
    x = torch.cat([block, torch.zeros(64 - 35), block, torch.tensor([float("nan")]), block])  # 64 + 71 = 135
    packed, absmax = quantize_4bit(x, 64, "fp4", check_finite=False, backend=backend)
    q, state = F.quantize_4bit(x, blocksize=64, quant_type="fp4", compress_statistics=False)
    assert_exact(packed, q.reshape(-1), "packed")
    assert_exact(absmax, state.absmax, "absmax")
    codes = torch.stack([packed >> 4, packed & 0xF], 1).reshape(-1)
    assert (
        codes[1].item() == 0 and codes[2].item() == 0 and codes[3].item() == 8
    )  # -0, +0 -> 0; tiny > 0 -> 8
    assert codes[-1].item() == 0  # padding of the odd count: the code of 0.0


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
def test_fp4_double_quant_equals_bitsandbytes(out_dtype):
    F = _bnb()
    for blocksize, n in ((64, 64 * 700 + 5), (4096, 4096 * 3 + 2)):
        x = _sample(n, torch.float32, seed=n)
        packed, absmax = quantize_4bit(x, blocksize, "fp4")
        qabsmax, absmax2, offset = double_quantize_absmax(absmax)
        q, state = F.quantize_4bit(x, blocksize=blocksize, quant_type="fp4", compress_statistics=True)
        assert_exact(packed, q.reshape(-1), "packed")
        assert_exact(qabsmax, state.absmax, "qabsmax")
        state.dtype = out_dtype
        for backend in ("torch", "auto"):
            got = dequantize_4bit(
                packed,
                qabsmax,
                (n,),
                blocksize,
                out_dtype,
                "fp4",
                absmax2=absmax2,
                offset=offset,
                backend=backend,
            )
            _bnb_equal(got, _bnb_dequantize(q, state), f"dequantize +DQ n={n} {backend}")


def test_fp4_matmul_and_triton_dequantize_equal_reference():
    from shared_kernels.nf4_matmul import matmul_nf4

    w = _sample(33 * 70, torch.float32, seed=9).reshape(33, 70)
    packed, absmax = quantize_4bit(w, 64, "fp4")
    dense = dequantize_4bit(packed, absmax, w.shape, 64, torch.float32, "fp4", backend="torch")
    x = torch.randn(5, 70)
    assert_exact(matmul_nf4(x, packed, absmax, (33, 70), 64, quant_type="fp4"), x @ dense.t(), "fp4 matmul")
    with pytest.raises(ValueError, match="quant_type must be one of"):
        quantize_4bit(w, 64, "int4")
    with pytest.raises(ValueError, match="quant_type must be one of"):
        dequantize_4bit(packed, absmax, w.shape, 64, torch.float32, "nf5")
    _triton_ok()
    wd = w.to(_device())
    p, a = quantize_4bit(wd, 64, "fp4", backend="triton")  # FP4 quantize: the reference on every device
    assert_exact(p.cpu(), packed, "fp4 packed on the Triton path")
    got = dequantize_4bit(p, a, w.shape, 64, torch.bfloat16, "fp4", backend="triton")
    assert_exact(got.cpu(), dense.to(torch.bfloat16), "fp4 Triton dequantize")
    y = matmul_nf4(x.to(_device()), p, a, (33, 70), 64, quant_type="fp4", backend="triton")
    torch.testing.assert_close(y.cpu(), x @ dense.t(), rtol=1e-5, atol=1e-5)


def test_native_cpu_threads_return_only_when_every_block_is_written(monkeypatch):
    # Helper threads are detached; a call returns when all blocks are done, not when its threads exit. Many
    # back-to-back two-thread calls, each into a buffer poisoned with NaN first, must each be complete (a
    # stress test: whether a helper claims work depends on the scheduler; without the wait it failed 1 run
    # in 4).
    from shared_kernels import nf4_cpu

    _native_ok()
    monkeypatch.setattr(nf4_cpu, "_MIN_ELEMENTS_PER_THREAD", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = _sample(64 * 40999, torch.float32, seed=5)
        packed, absmax = quantize_nf4(x, 64)
        want = dequantize_nf4(packed, absmax, x.shape, 64, backend="torch")
        out = torch.empty_like(want)
        for i in range(40):
            out.fill_(float("nan"))
            assert_exact(dequantize_nf4(packed, absmax, x.shape, 64, out=out), want, "two-thread dequantize")
            if i % 10 == 0:
                assert_exact(quantize_nf4(x, 64)[0], packed, "two-thread quantize")
    finally:
        torch.set_num_threads(threads)
