"""MX block quantization (OCP Microscaling v1.0): E8M0 block scales, FP8 (E4M3 / E5M2) elements.

A block is `block_size` consecutive elements along one dimension `dim`. Each block gets one shared scale
2^E stored as a biased E8M0 byte (E + 127; 0xFF is NaN), and each element is stored as x / 2^E rounded to
the element type with round-to-nearest-even, saturating at +-max (448 for E4M3, 57344 for E5M2).

Scale rules, written on the fp32 bits of the block amax a = 2^e * m (m in [1, 2)); the element maximum is
max = 1.75 * 2^emax (emax = 8 for E4M3, 15 for E5M2):

- FLOOR (OCP spec): E = floor(log2 a) - emax = e - emax. Blocks with m > 1.75 have a / 2^E > max: they clip.
- RCEIL (arXiv 2506.08027; TransformerEngine, cuBLAS): E = ceil(log2(a / max)) = e - emax + (m > 1.75),
  exactly, in integers: no log2, no division, and a / 2^E lies in (max / 2, max], so nothing clips.
  The amax is taken in the input dtype (exact) and its bits read in fp32, so bf16 input gets the same
  scale as its fp32 copy.

E is clamped to [-127, 127]. Conventions for the cases where implementations disagree (all tested):

- all-zero block: scale byte 0 (2^-127), elements 0.
- E = -127 (a tiny but non-zero amax): elements are x * 2^127 exactly, so dequantization returns them.
  torchao 0.18 instead multiplies by 1 (RCEIL) or 2^126 (FLOOR) while still storing byte 0, which flushes
  or halves such blocks.
- a block holding +-inf (and no NaN): scale byte 0xFE (2^127, the clamped floor/ceil of log2 inf), elements
  +-inf -> +-max and finite ones x * 2^-127; dequantizing gives +-inf back. torchao's RCEIL agrees; its
  FLOOR stores byte 247.
- a block holding NaN: scale byte 0xFF (NaN) and every element the positive NaN code 0x7F, so the whole
  block dequantizes to NaN. torchao's RCEIL agrees up to the sign bit of NaN elements; its FLOOR keeps the
  finite elements.
- RCEIL with an amax in fp32's top binade and mantissa above 1.75 (E = 128 - emax): an element rounded up
  to 2^(128 - E) would dequantize to 2^128 = inf. Elements of such finite blocks saturate at the largest
  code below it (240 for E4M3, 28672 for E5M2), so a finite input never dequantizes to inf. torchao keeps
  the rounded-up code (256), which dequantizes to inf.
- torchao's RCEIL takes ceil(log2(a / max)) in floating point; when a / max is within a few ulps above a
  power of two, log2 rounds down to the integer and that block clips. The integer rule above does not.

A blocked dimension whose size is not a multiple of `block_size` is allowed: the last, partial block is
scaled as if zero-padded to a full block (zeros never change an amax). `data` keeps the input's shape;
`scale` has ceil(n / block_size) blocks along `dim`. Hardware GEMMs need full blocks: `mx_gemm` pads.

Layout of this file: the torch reference (`mx_cast_ref`, `mx_dequantize_ref`), the Triton kernel (one read
of a 2-D tile gives row blocks and/or column blocks; element codes are produced with integer RNE so the
bytes never depend on a backend's float8 conversion), its launcher as a `torch.library` custom op, and the
public `mx_cast` / `mx_dequantize`.
"""

from __future__ import annotations

import functools
import math

import torch

from shared_kernels import mx_cpu
from shared_kernels.backend import resolve_backend

# element dtype -> (largest finite value, its binary exponent emax); both maxima have mantissa 1.75
ELEM_DTYPES: dict[torch.dtype, tuple[float, int]] = {
    torch.float8_e4m3fn: (448.0, 8),
    torch.float8_e5m2: (57344.0, 15),
}
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCALE_MODES = ("rceil", "floor")
E8M0_BIAS = 127
E8M0_NAN = 0xFF
E8M0_INF = 0xFE  # the byte a block containing +-inf gets (2^127)
_MANTISSA_1P75 = 0x600000  # fp32 mantissa field of 1.75


def check_mx_args(
    x: torch.Tensor, elem_dtype: torch.dtype, block_size: int, scale_mode: str, dim: int
) -> int:
    """Validate the arguments of an MX cast; return `dim` made non-negative."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"x must have dtype float32, bfloat16 or float16, got {x.dtype}")
    if elem_dtype not in ELEM_DTYPES:
        raise ValueError(f"elem_dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {elem_dtype!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size < 2 or block_size > 1024 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [2, 1024], got {block_size}")
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a 0-d tensor")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"dim must be an int in [{-x.dim()}, {x.dim() - 1}] for x of shape {tuple(x.shape)}, got {dim!r}"
        )
    return dim % x.dim()


def mx_scale_exponent_ref(amax: torch.Tensor, elem_dtype: torch.dtype, scale_mode: str) -> torch.Tensor:
    """Biased E8M0 scale bytes from block amaxes, computed on the fp32 bits (see the module docstring).

    Args:
        amax: (...) non-negative block maxima (or NaN / inf), any float dtype; read as fp32 (exact).
    Returns:
        (...) uint8 scale bytes.
    """
    _, emax = ELEM_DTYPES[elem_dtype]
    bits = amax.to(torch.float32).view(torch.int32) & 0x7FFFFFFF
    exp_field = bits >> 23  # biased fp32 exponent; 0 for zero and subnormals (their E clamps to -127)
    mantissa = bits & 0x7FFFFF
    e = exp_field - (127 + emax)
    if scale_mode == "rceil":
        e = e + (mantissa > _MANTISSA_1P75).to(torch.int32)
    biased = (e.clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.int32)
    biased = torch.where(exp_field == 255, torch.where(mantissa != 0, E8M0_NAN, E8M0_INF), biased)
    return biased.to(torch.uint8)


def e8m0_to_fp32(scale: torch.Tensor, reciprocal: bool = False) -> torch.Tensor:
    """2^(byte - 127) as fp32 (or 2^(127 - byte) with `reciprocal`), exact; byte 0xFF -> NaN.

    2^-127 is an fp32 subnormal, written from its bits since (0 << 23) would read as 0.
    """
    b = scale.to(torch.int32)
    if reciprocal:
        b = torch.where(b == E8M0_NAN, b, 254 - b)
    pow2 = (b << 23).view(torch.float32)
    pow2 = torch.where(b == 0, torch.tensor(2.0**-127), pow2)
    return torch.where(b == E8M0_NAN, torch.tensor(float("nan")), pow2)


def block_view(x: torch.Tensor, dim: int, block_size: int) -> torch.Tensor:
    """View x with `dim` split into (n_blocks, block_size), zero-padding a partial last block."""
    n = x.shape[dim]
    pad = -n % block_size
    if pad:
        widths = [0, 0] * (x.dim() - 1 - dim) + [0, pad]
        x = torch.nn.functional.pad(x, widths)
    return x.unflatten(dim, (x.shape[dim] // block_size, block_size))


def _scale_last_dim_blocks(
    x: torch.Tensor, elem_dtype: torch.dtype, block_size: int, scale_mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block amaxes (..., n_blocks, 1), their scale bytes (same shape) and x / 2^E saturated to +-max
    (..., n_blocks, block_size) in fp32, for blocks along the last dim: what the cast and the round trip
    share."""
    max_pos, emax = ELEM_DTYPES[elem_dtype]
    xb = block_view(x, x.dim() - 1, block_size)  # (..., n_blocks, block_size)
    amax = xb.abs().amax(dim=-1, keepdim=True)  # NaN propagates
    scale = mx_scale_exponent_ref(amax, elem_dtype, scale_mode)
    scaled = xb.to(torch.float32) * e8m0_to_fp32(scale, reciprocal=True)  # exact: a power of two
    scaled = scaled.clamp_(-max_pos, max_pos)  # FLOOR saturation and +-inf; NaN passes through
    top = _top_scale_byte(emax)
    if torch.compiler.is_compiling() or bool(((scale >= top) & (scale < E8M0_INF)).any()):
        limit = torch.where(
            (scale >= top) & (scale < E8M0_INF), _finite_element_max(scale, elem_dtype), max_pos
        )
        scaled = torch.minimum(torch.maximum(scaled, -limit), limit)
    return amax, scale, scaled


def _top_scale_byte(emax: int) -> int:
    """The lowest scale byte 127 + E at which an element rounded up to 2^emax... 2^(emax + 1) can reach
    2^128 and dequantize to inf: E = 128 - emax (byte 247 for E4M3, 240 for E5M2). Only RCEIL reaches it
    from a finite amax (mantissa above 1.75 in fp32's top binade)."""
    return E8M0_BIAS + 128 - emax


def _finite_element_max(scale: torch.Tensor, elem_dtype: torch.dtype) -> torch.Tensor:
    """For scale bytes at or above `_top_scale_byte` (finite blocks): the largest element value whose
    product with 2^E stays finite, 2^(128 - E) x (1 - 2^-(mbits + 1)) (240 for E4M3 at E = 120)."""
    mbits = 3 if elem_dtype == torch.float8_e4m3fn else 2
    power = ((2 * E8M0_BIAS + 1 - scale.to(torch.int32)).clamp(1, E8M0_BIAS) + E8M0_BIAS) << 23  # 2^(128 - E)
    return power.view(torch.float32) * (1.0 - 2.0 ** -(mbits + 1))


def mx_cast_ref(
    x: torch.Tensor,
    elem_dtype: torch.dtype = torch.float8_e4m3fn,
    block_size: int = 32,
    scale_mode: str = "rceil",
    dim: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch MX cast: the specification every kernel is tested against.

    Args:
        x: (..., n, ...) float32 / bfloat16 / float16; blocks run along `dim`.
        elem_dtype: torch.float8_e4m3fn or torch.float8_e5m2.
        block_size: elements per shared scale (32 in the OCP spec and in hardware).
        scale_mode: "rceil" or "floor".
        dim: the blocked dimension.
    Returns:
        data: x.shape, elem_dtype, the element codes.
        scale: x.shape with `dim` -> ceil(n / block_size), uint8 biased E8M0 bytes.
    """
    dim = check_mx_args(x, elem_dtype, block_size, scale_mode, dim)
    if dim != x.dim() - 1:
        # CPU broadcasting along a middle dim is slow: cast the contiguous transpose (same bytes, tested)
        data, scale = mx_cast_ref(x.movedim(dim, -1).contiguous(), elem_dtype, block_size, scale_mode, -1)
        return data.movedim(-1, dim).contiguous(), scale.movedim(-1, dim).contiguous()
    n = x.shape[-1]
    amax, scale, scaled = _scale_last_dim_blocks(x, elem_dtype, block_size, scale_mode)
    # every element of a NaN block becomes the positive NaN code 0x7F, whatever the sign of its own NaN;
    # eager skips this pass when no block has a NaN (compiled code fuses it for free)
    if torch.compiler.is_compiling() or bool(torch.isnan(amax).any()):
        scaled = scaled.masked_fill_(scale == E8M0_NAN, float("nan"))
    data = scaled.to(elem_dtype).flatten(-2)
    if data.shape[-1] != n:
        data = data[..., :n].contiguous()
    return data, scale.squeeze(-1)


# blocks per chunk of the CPU fast path: 512 KiB of fp32, so a chunk and its buffer stay in L2 between passes
_FAST_CHUNK_BLOCKS = 4096
_RCEIL_ROUND_UP = 0x7FFFFF - _MANTISSA_1P75  # added to the amax bits: carries into the exponent iff m > 1.75
_EXP_FIELD = 0x7F800000  # fp32 exponent field


def _mx_cast_fast(
    x: torch.Tensor, elem_dtype: torch.dtype, block_size: int, scale_mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mx_cast_ref` along the last dim, bit for bit (tested), in fewer passes over memory.

    Blocks are cast in chunks that stay in cache: per chunk |x| (into a reused buffer), the block amax on
    its int32 bits, 2^-E = 2^emax / 2^e where 2^e is the amax with its mantissa cleared (RCEIL first adds
    0x1FFFFF to the bits, so the exponent carries exactly when the mantissa exceeds 1.75; a zero or tiny
    amax gives 2^emax / 0 = inf, clamped to 2^127 like E to -127), x * 2^-E (exact) and the fp8
    conversion, which is most of the time. Scale bytes come once at the end from the stored amax bits.
    A tensor holding inf or NaN, or an amax near fp32's max (elements need the finite saturation), is cast
    by the reference instead: checked once, after the loop. Needs x contiguous with the last dim a
    multiple of `block_size`.
    """
    max_pos, emax = ELEM_DTYPES[elem_dtype]
    blocks = x.view(-1, block_size)
    n_blocks = blocks.shape[0]
    data = torch.empty(blocks.shape, dtype=elem_dtype, device=x.device)
    amax_bits = torch.empty(n_blocks, 1, dtype=torch.int32, device=x.device)
    chunk = min(_FAST_CHUNK_BLOCKS, n_blocks)
    buf = torch.empty(chunk, block_size, dtype=torch.float32, device=x.device)
    as_fp32 = torch.empty_like(buf) if x.dtype != torch.float32 else None
    round_up = _RCEIL_ROUND_UP if scale_mode == "rceil" else 0
    two_pow_emax = torch.tensor(2.0**emax, device=x.device)
    for start in range(0, n_blocks, chunk):
        stop = min(start + chunk, n_blocks)
        xb = blocks[start:stop]  # (chunk, block_size)
        b = buf if stop - start == chunk else buf[: stop - start]
        if as_fp32 is not None:
            xb = as_fp32[: stop - start].copy_(xb)  # exact
        bits = torch.amax(
            torch.abs(xb, out=b).view(torch.int32), dim=-1, keepdim=True, out=amax_bits[start:stop]
        )
        pow2 = torch.bitwise_and(bits + round_up if round_up else bits, _EXP_FIELD).view(torch.float32)
        inv_scale = torch.div(two_pow_emax, pow2).clamp_(max=2.0**E8M0_BIAS)  # (chunk, 1) 2^-E, exact
        torch.mul(xb, inv_scale, out=b)
        if scale_mode == "floor":
            b.clamp_(-max_pos, max_pos)
        data[start:stop].copy_(b)
    top_bits = int(amax_bits.max())
    if top_bits >= _EXP_FIELD or ((top_bits + round_up) >> 23) - emax >= _top_scale_byte(emax):
        # inf or NaN, or an amax so close to fp32's max that elements need the finite saturation
        return mx_cast_ref(x, elem_dtype, block_size, scale_mode, -1)
    if round_up:
        amax_bits += round_up
    scale = amax_bits.bitwise_right_shift_(23).sub_(emax).clamp_(min=0).to(torch.uint8)  # E + 127
    return data.view(x.shape), scale.view(*x.shape[:-1], -1)


def mx_cast_torch(
    x: torch.Tensor, elem_dtype: torch.dtype, block_size: int, scale_mode: str, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch backend of `mx_cast`: bit for bit `mx_cast_ref`, ~2-3x faster in eager on CPU
    (`_mx_cast_fast`); partial blocks and code under torch.compile take `mx_cast_ref` itself."""
    dim = check_mx_args(x, elem_dtype, block_size, scale_mode, dim)
    if torch.compiler.is_compiling() or x.shape[dim] % block_size or x.numel() == 0:
        return mx_cast_ref(x, elem_dtype, block_size, scale_mode, dim)
    if dim != x.dim() - 1:
        data, scale = _mx_cast_fast(x.movedim(dim, -1).contiguous(), elem_dtype, block_size, scale_mode)
        return data.movedim(-1, dim).contiguous(), scale.movedim(-1, dim).contiguous()
    return _mx_cast_fast(x.contiguous(), elem_dtype, block_size, scale_mode)


_DECODE_TABLES: dict[torch.dtype, torch.Tensor] = {}


def _decode_table(elem_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """fp32 value of each of the 256 codes (a gather is faster than the CPU's fp8 -> fp32 cast)."""
    table = _DECODE_TABLES.get(elem_dtype)
    if table is None:
        table = _DECODE_TABLES[elem_dtype] = (
            torch.arange(256, dtype=torch.uint8).view(elem_dtype).to(torch.float32)
        )
    return table.to(device)


def mx_dequantize_ref(
    data: torch.Tensor,
    scale: torch.Tensor,
    block_size: int = 32,
    dim: int = -1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Elements times their block's 2^E, in fp32, then cast to `dtype`.

    Args:
        data: (..., n, ...) float8 element codes.
        scale: data.shape with `dim` -> ceil(n / block_size), uint8.
    Returns:
        data.shape in `dtype`.
    """
    dim = dim % data.dim()
    if dim != data.dim() - 1:
        values = mx_dequantize_ref(data.movedim(dim, -1), scale.movedim(dim, -1), block_size, -1, dtype)
        return values.movedim(-1, dim)
    n = data.shape[-1]
    pow2 = e8m0_to_fp32(scale).unsqueeze(-1)  # (..., n_blocks, 1)
    if data.device.type == "cpu":
        codes = data.contiguous().view(torch.uint8).long()
        values = _decode_table(data.dtype, data.device).take(codes)
    else:
        values = data.to(torch.float32)
    values = (block_view(values, dim, block_size) * pow2).flatten(-2)
    if values.shape[-1] != n:
        values = values[..., :n]
    return values.to(dtype)


def _e4m3_codes_times_2pow_minus8(codes: torch.Tensor) -> torch.Tensor:
    """fp32 value x 2^-8 of each E4M3 code, exact, without the CPU's slow fp8 -> fp32 conversion.

    Placing the 7 magnitude bits of an E4M3 code (exponent bias 7) in bits 7..13 of an fp16 (bias 15) gives
    the same value times 2^-8, subnormals included (both are m x 2^(1 - bias - 3) there); the sign moves
    from bit 7 to bit 15. As int16: sign-extending the code and shifting by 7 puts the sign in bits 14 and
    15, so bit 14 is cleared. fp16 -> fp32 is exact and vectorized. The NaN code decodes to a finite value:
    callers multiply by the block's NaN scale.
    """
    half_bits = (codes.view(torch.int8).to(torch.int16) << 7) & ~0x4000
    return half_bits.view(torch.float16).to(torch.float32)


def mx_quantize_dequantize(
    x: torch.Tensor,
    elem_dtype: torch.dtype = torch.float8_e4m3fn,
    block_size: int = 32,
    scale_mode: str = "rceil",
    dim: int = -1,
) -> torch.Tensor:
    """The MX round trip in fp32, bit for bit `mx_dequantize_ref(*mx_cast_ref(x, ...), dim=dim)` (tested),
    without materializing the codes' decode: the operands of an emulated MX GEMM.

    On CPU this is ~4x faster than the two calls: the element codes of E4M3 are decoded through fp16 bits
    (`_e4m3_codes_times_2pow_minus8`; the 2^8 is folded into the block scale) instead of a table gather of
    int64 indices, and a blocked dim other than the last is cast once as the contiguous transpose and
    returned as a view (no copy back).

    Args:
        x: (..., n, ...) float32 / bfloat16 / float16; blocks run along `dim`.
        elem_dtype, block_size, scale_mode: as in `mx_cast_ref`.
    Returns:
        x.shape, float32 (for dim != -1 a transposed view of a contiguous tensor).
    """
    dim = check_mx_args(x, elem_dtype, block_size, scale_mode, dim)
    if dim != x.dim() - 1:
        values = mx_quantize_dequantize(
            x.movedim(dim, -1).contiguous(), elem_dtype, block_size, scale_mode, -1
        )
        return values.movedim(-1, dim)
    n = x.shape[-1]
    _, scale, scaled = _scale_last_dim_blocks(x, elem_dtype, block_size, scale_mode)
    codes = scaled.to(elem_dtype)  # a NaN block's elements need no fill: its scale 2^E is NaN below
    pow2 = e8m0_to_fp32(scale)
    fast_decode = (
        x.device.type == "cpu"
        and elem_dtype == torch.float8_e4m3fn
        and not torch.compiler.is_compiling()
        and not bool((scale[..., 0] >= 247).any())  # 2^(E + 8) must stay finite; only |x| >~ 2^127 or inf
    )
    if fast_decode:
        values = _e4m3_codes_times_2pow_minus8(codes) * (pow2 * 256.0)  # one rounding, as v * 2^E
    else:
        values = codes.to(torch.float32) * pow2
    values = values.flatten(-2)
    return values[..., :n] if values.shape[-1] != n else values


# ------------------------------------------------------------------------------------------- Triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still works
    triton = None

if triton is not None:

    @triton.jit
    def _scale_bytes(amax, has_nan, EMAX: tl.constexpr, RCEIL: tl.constexpr):
        """Biased E8M0 bytes (int32) from fp32 block amaxes: the integer rule of `mx_scale_exponent_ref`."""
        bits = amax.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        exp_field = bits >> 23
        e = exp_field - (127 + EMAX)
        if RCEIL:
            e += ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
        biased = tl.minimum(tl.maximum(e, -127), 127) + 127
        biased = tl.where(exp_field == 255, 254, biased)
        return tl.where(has_nan, 255, biased)

    @triton.jit
    def _encode(
        x,
        scale_byte,
        MAX_POS: tl.constexpr,
        MBITS: tl.constexpr,
        ELEM_BIAS: tl.constexpr,
        MAGIC: tl.constexpr,
        MAGIC_BITS: tl.constexpr,
        TOP_BYTE: tl.constexpr,
    ):
        """Element codes (int32, 0..255) of x / 2^E, saturated, rounded to nearest even, in integers.

        Normal range: round the fp32 mantissa to MBITS bits (add 0111..1 plus the lowest kept bit, shift).
        Subnormal range (|v| < 2^(1 - bias)): adding 2^(MBITS + 23 - sub_exp) makes fp32 addition round to
        the subnormal step; the code is the difference of the bit patterns.
        """
        b2 = 254 - scale_byte  # biased exponent of 2^-E
        rcp = tl.where(b2 == 0, 0x400000, b2 << 23).to(tl.float32, bitcast=True)
        v = x * rcp
        # saturate at +-max, and in finite blocks near fp32's max below 2^(128 - E) (`_finite_element_max`)
        top = (scale_byte >= TOP_BYTE) & (scale_byte < 254)
        power = (tl.minimum(tl.maximum(255 - scale_byte, 1), 127) + 127) << 23
        limit = tl.where(top, power.to(tl.float32, bitcast=True) * (1.0 - 1.0 / (2 << MBITS)), MAX_POS)
        v = tl.minimum(tl.maximum(v, -limit), limit)
        bits = v.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        mag = bits & 0x7FFFFFFF
        keep = mag >> (23 - MBITS)
        normal = ((mag + ((1 << (22 - MBITS)) - 1) + (keep & 1)) >> (23 - MBITS)) - (
            (127 - ELEM_BIAS) << MBITS
        )
        # MAGIC = 2^(24 - ELEM_BIAS - MBITS): the fp32 ulp there is the subnormal step
        sub = (tl.abs(v) + MAGIC).to(tl.int32, bitcast=True) - MAGIC_BITS
        code = tl.where(mag < ((128 - ELEM_BIAS) << 23), sub, normal) | sign
        return tl.where(scale_byte == 255, 0x7F, code)

    @triton.jit
    def _mx_cast_kernel(
        x_ptr,
        row_data_ptr,
        row_scale_ptr,
        col_data_ptr,
        col_scale_ptr,
        M,
        N,
        BS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ROWS: tl.constexpr,
        COLS: tl.constexpr,
        MAX_POS: tl.constexpr,
        MBITS: tl.constexpr,
        EMAX: tl.constexpr,
        RCEIL: tl.constexpr,
        ELEM_BIAS: tl.constexpr,
        MAGIC: tl.constexpr,
        MAGIC_BITS: tl.constexpr,
        TOP_BYTE: tl.constexpr,
    ):
        """One (BLOCK_M, BLOCK_N) tile of x (M, N) read once; ROWS writes blocks along N, COLS along M."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        offs = offs_m[:, None] * N + offs_n[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_N)
        nan = (x != x).to(tl.int32)
        ax = tl.abs(x)
        if ROWS:
            amax = tl.max(tl.reshape(ax, (BLOCK_M, BLOCK_N // BS, BS)), axis=2)  # (BLOCK_M, BLOCK_N // BS)
            has_nan = tl.max(tl.reshape(nan, (BLOCK_M, BLOCK_N // BS, BS)), axis=2) > 0
            sb = _scale_bytes(amax, has_nan, EMAX, RCEIL)
            sb_full = tl.reshape(
                tl.broadcast_to(sb[:, :, None], (BLOCK_M, BLOCK_N // BS, BS)), (BLOCK_M, BLOCK_N)
            )
            codes = _encode(x, sb_full, MAX_POS, MBITS, ELEM_BIAS, MAGIC, MAGIC_BITS, TOP_BYTE)
            tl.store(row_data_ptr + offs, codes.to(tl.uint8), mask=mask)
            nb = tl.cdiv(N, BS)
            offs_b = pid_n * (BLOCK_N // BS) + tl.arange(0, BLOCK_N // BS)
            smask = (offs_m[:, None] < M) & (offs_b[None, :] < nb)
            tl.store(row_scale_ptr + offs_m[:, None] * nb + offs_b[None, :], sb.to(tl.uint8), mask=smask)
        if COLS:
            amax = tl.max(tl.reshape(ax, (BLOCK_M // BS, BS, BLOCK_N)), axis=1)  # (BLOCK_M // BS, BLOCK_N)
            has_nan = tl.max(tl.reshape(nan, (BLOCK_M // BS, BS, BLOCK_N)), axis=1) > 0
            sb = _scale_bytes(amax, has_nan, EMAX, RCEIL)
            sb_full = tl.reshape(
                tl.broadcast_to(sb[:, None, :], (BLOCK_M // BS, BS, BLOCK_N)), (BLOCK_M, BLOCK_N)
            )
            codes = _encode(x, sb_full, MAX_POS, MBITS, ELEM_BIAS, MAGIC, MAGIC_BITS, TOP_BYTE)
            tl.store(col_data_ptr + offs, codes.to(tl.uint8), mask=mask)
            offs_b = pid_m * (BLOCK_M // BS) + tl.arange(0, BLOCK_M // BS)
            smask = (offs_b[:, None] < tl.cdiv(M, BS)) & (offs_n[None, :] < N)
            tl.store(col_scale_ptr + offs_b[:, None] * N + offs_n[None, :], sb.to(tl.uint8), mask=smask)


@torch.library.custom_op("shared_kernels::mx_cast_2d", mutates_args=())
def _mx_cast_2d_op(
    x: torch.Tensor, elem_dtype: torch.dtype, block_size: int, scale_mode: str, rows: bool, cols: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton launch as a torch custom op (uint8 codes; empty tensors for a direction not asked), so
    torch.compile sees one opaque op with a fake implementation."""
    if triton is None:
        raise ValueError("backend='triton' requested but triton is not installed")
    x = x.contiguous()
    m, n = x.shape
    max_pos, emax = ELEM_DTYPES[elem_dtype]
    mbits = 3 if elem_dtype == torch.float8_e4m3fn else 2
    elem_bias = emax - 1 if elem_dtype == torch.float8_e4m3fn else emax  # E4M3FN reuses the top exponent
    magic = 2.0 ** (24 - elem_bias - mbits)
    magic_bits = int(torch.tensor(magic, dtype=torch.float32).view(torch.int32))
    interp = x.device.type != "cuda"  # the interpreter runs one numpy program per tile: big tiles are faster
    block_m = max(block_size, 128 if interp else 32) if cols else (64 if interp else 16)
    block_n = max(block_size, 256 if interp else 128)
    row_data, row_scale, col_data, col_scale = _mx_cast_2d_fake(
        x, elem_dtype, block_size, scale_mode, rows, cols
    )
    if x.numel():
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _mx_cast_kernel[grid](
            x,
            row_data,
            row_scale,
            col_data,
            col_scale,
            m,
            n,
            BS=block_size,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            ROWS=rows,
            COLS=cols,
            MAX_POS=max_pos,
            MBITS=mbits,
            EMAX=emax,
            RCEIL=scale_mode == "rceil",
            ELEM_BIAS=elem_bias,
            MAGIC=magic,
            MAGIC_BITS=magic_bits,
            TOP_BYTE=_top_scale_byte(emax),
        )
    return row_data, row_scale, col_data, col_scale


@_mx_cast_2d_op.register_fake
def _mx_cast_2d_fake(x, elem_dtype, block_size, scale_mode, rows, cols):
    m, n = x.shape

    def alloc(shape, wanted):
        return torch.empty(shape if wanted else (0,), dtype=torch.uint8, device=x.device)

    return (
        alloc((m, n), rows),
        alloc((m, -(-n // block_size)), rows),
        alloc((m, n), cols),
        alloc((-(-m // block_size), n), cols),
    )


def _mx_cast_2d_triton_all(
    x: torch.Tensor, elem_dtype: torch.dtype, block_size: int, scale_mode: str, rows: bool, cols: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The custom op's four outputs, codes viewed as `elem_dtype` (empty for a direction not asked)."""
    rd, rs, cd, cs = torch.ops.shared_kernels.mx_cast_2d(x, elem_dtype, block_size, scale_mode, rows, cols)
    return rd.view(elem_dtype), rs, cd.view(elem_dtype), cs


def mx_cast_2d_triton(
    x: torch.Tensor,
    elem_dtype: torch.dtype,
    block_size: int,
    scale_mode: str,
    rows: bool = True,
    cols: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Cast a 2-D x (M, N) to row blocks (along N) and/or column blocks (along M) from one read of x.

    Returns:
        (row_data (M, N), row_scale (M, ceil(N / bs)), col_data (M, N), col_scale (ceil(M / bs), N)),
        None for a direction not asked; data in `elem_dtype`, scales uint8.
    """
    rd, rs, cd, cs = _mx_cast_2d_triton_all(x, elem_dtype, block_size, scale_mode, rows, cols)
    return (rd if rows else None, rs if rows else None, cd if cols else None, cs if cols else None)


def mx_cast_triton(
    x: torch.Tensor, elem_dtype: torch.dtype, block_size: int, scale_mode: str, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton cast for blocks along the last dim (x viewed as (rows, n)) or dim 0 (x as (n, rest))."""
    shape = x.shape
    if dim == x.dim() - 1:
        data, scale, _, _ = _mx_cast_2d_triton_all(
            x.reshape(-1, shape[-1]), elem_dtype, block_size, scale_mode, True, False
        )
        return data.view(shape), scale.view(*shape[:-1], scale.shape[-1])
    _, _, data, scale = _mx_cast_2d_triton_all(
        x.reshape(shape[0], -1), elem_dtype, block_size, scale_mode, False, True
    )
    return data.view(shape), scale.view(scale.shape[0], *shape[1:])


# ------------------------------------------------------------------------------------ native CPU kernels


@torch.compiler.assume_constant_result
def _native_cpu() -> bool:
    """Whether the native CPU kernels load (compiling them on first use); a constant to torch.compile."""
    return mx_cpu.available()


@functools.cache
def _native_format(elem_dtype: torch.dtype, block_size: int, scale_mode: str) -> mx_cpu.MXFormat:
    max_pos, emax = ELEM_DTYPES[elem_dtype]
    return mx_cpu.MXFormat(elem_dtype, max_pos, emax, _top_scale_byte(emax), block_size, scale_mode)


# The native CPU casts as operators, so torch.compile sees one opaque op with a fake implementation (no graph
# break). Two kernels for each: C++ (`mx_cpu_op.cpp`, ops `*_cxx`: the dispatcher calls it without entering
# Python) when it builds, else Python calling the C entry point through ctypes (ops `*_native`). Defined
# through `torch.library.Library` rather than `custom_op`: under torch.compile a call of the custom_op version
# (which returned uint8 codes viewed as `elem_dtype` afterwards) cost ~70 us CPU at 256x256, this one ~57 us.
# The Python op's name is new with its output dtype: inductor's FX graph cache kept a graph of the uint8
# version (it keys on the op's name and schema, not on its fake implementation).
_LIB = torch.library.Library("shared_kernels", "FRAGMENT")
_CAST_SCHEMA = (
    "(Tensor x, ScalarType elem_dtype, int block_size, str scale_mode, int dim) -> (Tensor, Tensor)"
)
_ROWS_COLS_SCHEMA = (
    "(Tensor x, ScalarType elem_dtype, int block_size, str scale_mode) -> (Tensor, Tensor, Tensor, Tensor)"
)
for _suffix in ("native", "cxx"):  # the cxx ops' CPU kernels are registered by mx_cpu_op.cpp once loaded
    _LIB.define(f"mx_cast_{_suffix}{_CAST_SCHEMA}")
    _LIB.define(f"mx_cast_rows_cols_{_suffix}{_ROWS_COLS_SCHEMA}")
# The out-variants of the cxx ops, called from compiled graphs: inductor allocates the outputs in its wrapper
# (a C call each) and calls the op, where the functional op made it index the returned tuple and check every
# output's metadata from Python after the call.
_LIB.define(
    "mx_cast_cxx_out(Tensor x, ScalarType elem_dtype, int block_size, str scale_mode, int dim,"
    " Tensor(a!) data, Tensor(b!) scale) -> ()"
)
_LIB.define(
    "mx_cast_rows_cols_cxx_out(Tensor x, ScalarType elem_dtype, int block_size, str scale_mode,"
    " Tensor(a!) row_data, Tensor(b!) row_scale, Tensor(c!) col_data, Tensor(d!) col_scale) -> ()"
)


def _mx_cast_cpu_codes(
    x: torch.Tensor, elem_dtype: torch.dtype, block_size: int, scale_mode: str, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The native cast through ctypes: (codes as `elem_dtype`, uint8 scales); `dim` non-negative."""
    fmt = _native_format(elem_dtype, block_size, scale_mode)
    return mx_cpu.mx_cast_cpu(x, fmt, dim, codes_dtype=elem_dtype)


def _mx_cast_rows_cols_cpu_codes(
    x: torch.Tensor, elem_dtype: torch.dtype, block_size: int, scale_mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The native row + column cast of a 2-D x from one pass, through ctypes: codes as `elem_dtype`."""
    fmt = _native_format(elem_dtype, block_size, scale_mode)
    return mx_cpu.mx_cast_rows_cols_cpu(x, fmt, codes_dtype=elem_dtype)


_LIB.impl("mx_cast_native", _mx_cast_cpu_codes, "CPU")
_LIB.impl("mx_cast_rows_cols_native", _mx_cast_rows_cols_cpu_codes, "CPU")


def _mx_cast_cpu_empty(x, elem_dtype, block_size, scale_mode, dim):
    """Uninitialised (data, scale) of a cast of x along dim >= 0: the ops' fake, the out-variant's outputs."""
    scale_shape = list(x.shape)
    scale_shape[dim] = -(-x.shape[dim] // block_size)
    return x.new_empty(x.shape, dtype=elem_dtype), x.new_empty(scale_shape, dtype=torch.uint8)


def _mx_cast_rows_cols_cpu_empty(x, elem_dtype, block_size, scale_mode):
    """Uninitialised outputs of a row + column cast of 2-D x: the ops' fake, the out-variant's outputs."""
    m, n = x.shape
    return (
        x.new_empty((m, n), dtype=elem_dtype),
        x.new_empty((m, -(-n // block_size)), dtype=torch.uint8),
        x.new_empty((m, n), dtype=elem_dtype),
        x.new_empty((-(-m // block_size), n), dtype=torch.uint8),
    )


for _suffix in ("native", "cxx"):
    torch.library.register_fake(f"shared_kernels::mx_cast_{_suffix}", _mx_cast_cpu_empty)
    torch.library.register_fake(f"shared_kernels::mx_cast_rows_cols_{_suffix}", _mx_cast_rows_cols_cpu_empty)
for _name in ("mx_cast_cxx_out", "mx_cast_rows_cols_cxx_out"):
    torch.library.register_fake(f"shared_kernels::{_name}", lambda *args: None)


@torch.compiler.assume_constant_result
def _native_cxx() -> bool:
    """Whether the C++ kernels of the `*_cxx` ops load (building and configuring them on first use, for
    every element type and rule); a constant to torch.compile."""
    if mx_cpu.op_available():
        return True
    if not mx_cpu.available():
        return False
    return mx_cpu.load_op(_native_format(e, 32, mode) for e in ELEM_DTYPES for mode in ("rceil", "floor"))


def mx_cast_native_cpu(
    x: torch.Tensor, elem_dtype: torch.dtype, block_size: int, scale_mode: str, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The native CPU backend of `mx_cast` (`shared_kernels.mx_cpu`): bit for bit `mx_cast_ref`. The op
    `shared_kernels::mx_cast_cxx` (C++ kernel) when it builds, eager and compiled; without it eager calls
    go to the ctypes kernel directly and compiled ones through the op `shared_kernels::mx_cast_native`."""
    return _mx_cast_native_cpu(
        x, elem_dtype, block_size, scale_mode, check_mx_args(x, elem_dtype, block_size, scale_mode, dim)
    )


def _mx_cast_native_cpu(
    x: torch.Tensor, elem_dtype: torch.dtype, block_size: int, scale_mode: str, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mx_cast_native_cpu` with its arguments already checked (`dim` non-negative)."""
    if _native_cxx() and torch.compiler.is_compiling():
        data, scale = _mx_cast_cpu_empty(x, elem_dtype, block_size, scale_mode, dim)
        torch.ops.shared_kernels.mx_cast_cxx_out.default(
            x, elem_dtype, block_size, scale_mode, dim, data, scale
        )
        return data, scale
    if _native_cxx():
        return torch.ops.shared_kernels.mx_cast_cxx.default(x, elem_dtype, block_size, scale_mode, dim)
    if torch.compiler.is_compiling():
        return torch.ops.shared_kernels.mx_cast_native.default(x, elem_dtype, block_size, scale_mode, dim)
    return _mx_cast_cpu_codes(x, elem_dtype, block_size, scale_mode, dim)


def _mx_cast_rows_cols_native_cpu(
    x: torch.Tensor, elem_dtype: torch.dtype, block_size: int, scale_mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one-pass native row + column cast of a checked 2-D x, through the same choice of kernel."""
    if _native_cxx() and torch.compiler.is_compiling():
        out = _mx_cast_rows_cols_cpu_empty(x, elem_dtype, block_size, scale_mode)
        torch.ops.shared_kernels.mx_cast_rows_cols_cxx_out.default(
            x, elem_dtype, block_size, scale_mode, *out
        )
        return out
    if _native_cxx():
        return torch.ops.shared_kernels.mx_cast_rows_cols_cxx.default(x, elem_dtype, block_size, scale_mode)
    if torch.compiler.is_compiling():
        return torch.ops.shared_kernels.mx_cast_rows_cols_native.default(
            x, elem_dtype, block_size, scale_mode
        )
    return _mx_cast_rows_cols_cpu_codes(x, elem_dtype, block_size, scale_mode)


def _use_native_cpu(backend: str, x: torch.Tensor) -> bool:
    return backend == "auto" and x.device.type == "cpu" and _native_cpu()


def mx_cast(
    x: torch.Tensor,
    elem_dtype: torch.dtype = torch.float8_e4m3fn,
    block_size: int = 32,
    scale_mode: str = "rceil",
    dim: int = -1,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """MX cast of `x` along `dim`; returns (data, scale) exactly as `mx_cast_ref` does.

    backend: "auto" (Triton for CUDA tensors, the native kernels of `shared_kernels.mx_cpu` for CPU tensors
    when they build, else the torch backend), "torch" (`mx_cast_torch`, bit for bit the reference) or
    "triton" (CUDA, or CPU under TRITON_INTERPRET=1; blocks along dim 0 or the last dim, x viewed as 2-D;
    any other dim takes the torch backend).
    """
    dim = check_mx_args(x, elem_dtype, block_size, scale_mode, dim)
    if resolve_backend(backend, x.device) == "triton" and x.dim() >= 1 and dim in (0, x.dim() - 1):
        return mx_cast_triton(x, elem_dtype, block_size, scale_mode, dim)
    if _use_native_cpu(backend, x):
        return _mx_cast_native_cpu(x, elem_dtype, block_size, scale_mode, dim)
    return mx_cast_torch(x, elem_dtype, block_size, scale_mode, dim)


def mx_cast_rows_cols(
    x: torch.Tensor,
    elem_dtype: torch.dtype = torch.float8_e4m3fn,
    block_size: int = 32,
    scale_mode: str = "rceil",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both MX casts of a 2-D x (M, N): blocks along N (rows) and along M (columns), for a tensor that feeds
    two GEMMs with different reduction dims (MXLinear's X, W and dY).

    On the Triton backend one read of each tile gives both casts; on CPU the native kernels cast each
    block-row of `block_size` rows both ways while it is in cache (without them: the torch backend's two
    casts). Either way the result is bit for bit
    `mx_cast_ref(x, ..., dim=-1)` and `mx_cast_ref(x, ..., dim=0)` (tested).

    Returns:
        (row_data (M, N), row_scale (M, ceil(N / bs)), col_data (M, N), col_scale (ceil(M / bs), N)).
    """
    check_mx_args(x, elem_dtype, block_size, scale_mode, -1)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D for a row + column cast, got shape {tuple(x.shape)}")
    if resolve_backend(backend, x.device) == "triton":
        return _mx_cast_2d_triton_all(x, elem_dtype, block_size, scale_mode, rows=True, cols=True)
    if _use_native_cpu(backend, x):
        return _mx_cast_rows_cols_native_cpu(x, elem_dtype, block_size, scale_mode)
    row_data, row_scale = mx_cast_torch(x, elem_dtype, block_size, scale_mode, 1)
    col_data, col_scale = mx_cast_torch(x, elem_dtype, block_size, scale_mode, 0)
    return row_data, row_scale, col_data, col_scale


def mx_dequantize(
    data: torch.Tensor,
    scale: torch.Tensor,
    block_size: int = 32,
    dim: int = -1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize MX (data, scale) along `dim` to `dtype` (see `mx_dequantize_ref`)."""
    if data.dtype not in ELEM_DTYPES:
        raise TypeError(f"data must be float8_e4m3fn or float8_e5m2, got {data.dtype}")
    if scale.dtype != torch.uint8:
        raise TypeError(f"scale must be uint8 E8M0 bytes, got {scale.dtype}")
    d = dim % data.dim()
    expected = list(data.shape)
    expected[d] = math.ceil(expected[d] / block_size)
    if list(scale.shape) != expected:
        raise ValueError(
            f"scale must have shape {tuple(expected)} for data {tuple(data.shape)}, got {tuple(scale.shape)}"
        )
    return mx_dequantize_ref(data, scale, block_size, d, dtype)
