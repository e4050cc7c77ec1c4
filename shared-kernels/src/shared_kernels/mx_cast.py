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
- torchao's RCEIL takes ceil(log2(a / max)) in floating point; when a / max is within a few ulps above a
  power of two, log2 rounds down to the integer and that block clips. The integer rule above does not.

A blocked dimension whose size is not a multiple of `block_size` is allowed: the last, partial block is
scaled as if zero-padded to a full block (zeros never change an amax). `data` keeps the input's shape;
`scale` has ceil(n / block_size) blocks along `dim`. Hardware GEMMs need full blocks: `mx_gemm` pads.
"""

from __future__ import annotations

import math

import torch

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
_NAN_CODE = 0x7F  # positive NaN in both E4M3FN and E5M2


def check_mx_args(x: torch.Tensor, elem_dtype: torch.dtype, block_size: int, scale_mode: str, dim: int) -> int:
    """Validate the arguments of an MX cast; return `dim` made non-negative."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"x must have dtype float32, bfloat16 or float16, got {x.dtype}")
    if elem_dtype not in ELEM_DTYPES:
        raise ValueError(
            f"elem_dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {elem_dtype!r}"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size < 2 or block_size > 1024 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [2, 1024], got {block_size}")
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a 0-d tensor")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim() - 1}] for x of shape {tuple(x.shape)}, got {dim!r}")
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
    max_pos, _ = ELEM_DTYPES[elem_dtype]
    n = x.shape[dim]
    xb = block_view(x, dim, block_size)  # (..., n_blocks, block_size, ...)
    mn, mx = torch.aminmax(xb, dim=dim + 1, keepdim=True)  # one pass; NaN propagates
    amax = torch.maximum(-mn, mx)
    amax = torch.where(torch.isnan(mn) | torch.isnan(mx), torch.tensor(float("nan"), dtype=amax.dtype), amax)
    scale = mx_scale_exponent_ref(amax, elem_dtype, scale_mode)  # (..., n_blocks, 1, ...)
    rcp = e8m0_to_fp32(scale, reciprocal=True)
    scaled = xb.to(torch.float32) * rcp  # exact: rcp is a power of two
    scaled = scaled.clamp_(-max_pos, max_pos)  # FLOOR saturation and +-inf; NaN passes through
    # every element of a NaN block becomes the positive NaN code 0x7F, whatever the sign of its own NaN
    scaled = torch.where(scale == E8M0_NAN, torch.tensor(float("nan")), scaled)
    data = scaled.to(elem_dtype).flatten(dim, dim + 1)
    if data.shape[dim] != n:
        data = data.narrow(dim, 0, n)
    return data.contiguous(), scale.squeeze(dim + 1)


def mx_dequantize_ref(
    data: torch.Tensor, scale: torch.Tensor, block_size: int = 32, dim: int = -1, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Elements times their block's 2^E, in fp32, then cast to `dtype`.

    Args:
        data: (..., n, ...) float8 element codes.
        scale: data.shape with `dim` -> ceil(n / block_size), uint8.
    Returns:
        data.shape in `dtype`.
    """
    dim = dim % data.dim()
    n = data.shape[dim]
    pow2 = e8m0_to_fp32(scale).unsqueeze(dim + 1)  # (..., n_blocks, 1, ...)
    values = block_view(data.to(torch.float32), dim, block_size) * pow2
    values = values.flatten(dim, dim + 1)
    if values.shape[dim] != n:
        values = values.narrow(dim, 0, n)
    return values.to(dtype)


def mx_cast(
    x: torch.Tensor,
    elem_dtype: torch.dtype = torch.float8_e4m3fn,
    block_size: int = 32,
    scale_mode: str = "rceil",
    dim: int = -1,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """MX cast of `x` along `dim`; returns (data, scale) exactly as `mx_cast_ref` does.

    backend: "auto" (Triton for CUDA tensors), "torch" (the reference) or "triton" (CUDA, or CPU under
    TRITON_INTERPRET=1; 2-D inputs and dim 0 / -1 only, any other case falls back to the reference).
    """
    dim = check_mx_args(x, elem_dtype, block_size, scale_mode, dim)
    if resolve_backend(backend, x.device) == "triton" and x.dim() >= 1 and dim in (0, x.dim() - 1):
        from shared_kernels.mx_cast_triton import mx_cast_triton

        return mx_cast_triton(x, elem_dtype, block_size, scale_mode, dim)
    return mx_cast_ref(x, elem_dtype, block_size, scale_mode, dim)


def mx_dequantize(
    data: torch.Tensor, scale: torch.Tensor, block_size: int = 32, dim: int = -1, dtype: torch.dtype = torch.float32
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
        raise ValueError(f"scale must have shape {tuple(expected)} for data {tuple(data.shape)}, got {tuple(scale.shape)}")
    return mx_dequantize_ref(data, scale, block_size, d, dtype)
