"""Blockwise 4-bit quantization, NF4 and FP4 (QLoRA, arXiv 2305.14314), bit-compatible with bitsandbytes 0.50
on CPU.

The two quant types differ only in their 16-entry code (`CODES`): NF4's is sorted (normal quantiles), FP4's
is bitsandbytes' sign-magnitude 2-bit-exponent / 1-bit-mantissa table in its own index order (two zeros,
indices 0 and 8). Quantizing searches the sorted code's midpoints and maps the position through the
argsort `order` of the code (identity for NF4), exactly as bitsandbytes does.

Quantize (bitsandbytes' CPU semantics, which users' checkpoints depend on):
- blocks are contiguous runs of the flattened tensor (`blocksize` elements, the last one may be partial);
  `absmax[b] = max |x|` over block b, in fp32;
- full blocks are scaled by multiplying with the fp32 reciprocal `1 / max(absmax, 1e-38)`, the partial last
  block by dividing by `max(absmax, 1e-38)` (bitsandbytes does exactly this; the two can differ by one ulp,
  which decides the code on a midpoint); the partial last block also STORES `max(absmax, 1e-38)`;
- the code is the nearest code value by the fp32 midpoints of the sorted code; a value exactly on a midpoint
  takes the LOWER one (FP4: 0.0 itself lands below the midpoint between its two zeros, so it gets index 0 and
  tiny positive values index 8);
- two codes per byte, element 2i in the HIGH nibble; an odd count is padded with the code of 0.0 (NF4 7,
  FP4 0).

Edge cases (also in nf4lora's README):
- an all-zero block stores absmax 0 (1e-38 when it is the partial last block) and the code of 0.0: it
  dequantizes to exact +0.0;
- non-finite input: `quantize_nf4(..., check_finite=True)` (the default) raises a ValueError. With
  `check_finite=False` the bitsandbytes-CPU result is reproduced: a NaN makes its block's absmax NaN, an inf
  makes it inf; NaN scaled values get the code of the last sorted value (NF4 15, FP4 3, both 1.0); every
  element of such a block dequantizes to NaN or +-inf.

Double quantization (bitsandbytes `compress_statistics=True`): `offset = mean(absmax)` (torch's fp32 mean),
`absmax - offset` is quantized blockwise (256 per block) with bitsandbytes' signed 8-bit dynamic map through
its CPU lookup table (the nearest code up to a 65536-point grid, see `quantize_absmax_ref`). Reconstruction
`absmax = code2[q] * absmax2[j // 256] + offset` is fused into the NF4 dequantize kernel.

Dequantize: `CODES[quant_type][nibble] * absmax[block]` in fp32, rounded once (to nearest even) to the output
dtype.

Backends: "torch" is the reference below (the specification); "auto" runs Triton on CUDA tensors and, on CPU,
the native kernels of `shared_kernels.nf4_cpu` (compiled on first use, bit-equal to the reference, several
times faster than it and than bitsandbytes' native CPU kernel), falling back to the reference where they are
unavailable; "triton" forces the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1). The Triton quantize
kernel is NF4 only: FP4 quantizes with the torch reference on every device (a one-time cost per weight).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from shared_kernels import nf4_cpu
from shared_kernels.backend import resolve_backend, triton_available

# index 0b0000..0b1111, float32 (bitsandbytes `get_4bit_type("nf4")`).
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip
# (15,) fp32 midpoints between neighbouring codes: the decision boundaries.
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
# index 0b0000..0b1111, float32 (bitsandbytes `get_4bit_type("fp4")`): sign bit, 2 exponent bits, 1 mantissa
# bit, divided by the largest magnitude (6), with bitsandbytes' subnormal 0b0001 = 1/192. Index 8 (sign bit,
# zero magnitude) is +0.0 as in bitsandbytes' table, its torch path and the vectorised body of its native CPU
# kernel; that kernel's scalar tail (and its CUDA kernel) decode it as -0.0. The values compare equal.
FP4_CODE = torch.tensor(
    [
        0.0, 0.0052083334885537624, 0.6666666865348816, 1.0,
        0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
        0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
        -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
    ],
    dtype=torch.float32,
)  # fmt: skip
QUANT_TYPES = ("nf4", "fp4")
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def _quantize_tables(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(midpoints (15,) fp32 of the sorted code, order (16,) uint8: sorted position -> code index, the code
    index of 0.0 used as padding), as bitsandbytes' `_get_4bit_quantize_bounds` builds them."""
    order = torch.argsort(code, stable=True)  # FP4's two zeros keep their index order: 0 before 8
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    pad = int(order[torch.bucketize(torch.zeros(()), midpoints)])
    return midpoints, order.to(torch.uint8), pad


QUANTIZE_TABLES = {name: _quantize_tables(code) for name, code in CODES.items()}
SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DQ_BLOCKSIZE = 256


class DoubleQuantState(NamedTuple):
    """The second level of double quantization, as every kernel takes it (the first level, the uint8 codes of
    the constants, travels as `absmax`): absmax = code2[q] * absmax2[j // blocksize2] + offset, in fp32."""

    absmax2: torch.Tensor  # fp32 (ceil(n_blocks / blocksize2),)
    offset: torch.Tensor  # fp32 0-dim: the mean of the constants
    code2: torch.Tensor  # fp32 (256,): the signed dynamic map
    blocksize2: int


_TINY = 1e-38  # bitsandbytes' floor on the divisor


def dynamic_map_signed() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`): (256,) fp32, sorted.

    Seven exponent levels 10^-6..10^0, each with linearly spaced fractions (means of a linspace(0.1, 1) grid,
    all in fp32), both signs, plus 0 and 1.
    """
    values: list[float] = []
    for i in range(7):
        items = 2**i + 1
        grid = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (grid[:-1] + grid[1:]) / 2.0
        scale = 10 ** (-6 + i)
        values += (scale * means).tolist() + (-scale * means).tolist()  # fp32 products, as bitsandbytes
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


DYNAMIC_CODE = dynamic_map_signed()


# ----------------------------------------------------------------------------------------------- validation


def check_quant_type(quant_type: str, name: str = "quant_type") -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{name} must be one of {QUANT_TYPES}, got {quant_type!r}")


def check_blocksize(blocksize: int, name: str = "blocksize") -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(
            f"{name} must be one of {SUPPORTED_BLOCKSIZES} (bitsandbytes' sizes), got {blocksize!r}"
        )


def _check_float_input(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


def _check_packed(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    blocksize: int,
    dtype: torch.dtype,
    name: str = "packed",
) -> int:
    check_blocksize(blocksize)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    numel = math.prod(shape)
    if numel <= 0:
        raise ValueError(f"shape must have at least one element, got {tuple(shape)}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"{name} must be uint8, got {packed.dtype}")
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(
            f"{name} must hold (numel + 1) // 2 = {(numel + 1) // 2} bytes for shape "
            f"{tuple(shape)}, got {packed.numel()}"
        )
    n_blocks = -(-numel // blocksize)
    if absmax.numel() != n_blocks:
        raise ValueError(
            f"absmax must hold ceil(numel / blocksize) = {n_blocks} values, got {absmax.numel()}"
        )
    if absmax.device != packed.device:
        raise ValueError(f"absmax is on {absmax.device} but {name} is on {packed.device}")
    return numel


# ----------------------------------------------------------------------------------------------- references


def _scaled_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (n,) -> (scaled (n,), absmax (n_blocks,)) with bitsandbytes' CPU arithmetic, see module doc."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (n_full, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=_TINY)).unsqueeze(1)).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().amax().clamp(min=_TINY)
        absmax = torch.cat([absmax, tail_absmax.unsqueeze(0)])
        scaled = torch.cat([scaled, flat[full:] / tail_absmax])
    return scaled, absmax


def pack_nibbles(codes: torch.Tensor, pad: int = 7) -> torch.Tensor:
    """(n,) integer codes in [0, 16) -> ((n + 1) // 2,) uint8, element 2i in the high nibble; an odd count is
    padded with `pad` (the code of 0.0: 7 for NF4, 0 for FP4)."""
    q = codes.to(torch.uint8)
    if q.numel() % 2:
        q = torch.cat([q, q.new_full((1,), pad)])
    return (q[0::2] << 4) | q[1::2]


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """((numel + 1) // 2,) uint8 -> (numel,) int64 codes."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:numel].long()


def quantize_4bit_ref(
    x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch 4-bit quantize (the specification). x: any shape, float -> (packed uint8 ((n+1)//2,),
    absmax fp32 (ceil(n / blocksize),))."""
    midpoints, order, pad = QUANTIZE_TABLES[quant_type]
    scaled, absmax = _scaled_blocks(x.reshape(-1).float(), blocksize)
    # Ties to the lower code: bucketize(right=False) puts a value equal to a midpoint below it. NaN -> 15.
    position = torch.bucketize(scaled.clamp(-1, 1), midpoints.to(x.device))
    return pack_nibbles(order.to(x.device)[position], pad), absmax


# (256, 2) fp32 per quant type: the two code values of every byte (high nibble first), so dequantizing is one
# gather.
_BYTE_PAIRS = {
    name: torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).contiguous()
    for name, code in CODES.items()
}


def dequantize_4bit_ref(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
    quant_type: str = "nf4",
) -> torch.Tensor:
    """Pure-torch 4-bit dequantize: `CODES[quant_type][q] * absmax[block]` in fp32, cast once to `dtype`.

    Looks the two values of each byte up in a 256-entry pair table (3x faster than unpacking nibbles)."""
    numel = math.prod(shape)
    n_blocks = absmax.numel()
    pairs = _BYTE_PAIRS[quant_type].to(packed.device)
    values = pairs.index_select(0, packed.reshape(-1).int()).view(-1)  # (2 * bytes,)
    if values.numel() != n_blocks * blocksize:  # partial last block or odd count: pad to whole blocks
        values = torch.nn.functional.pad(values[:numel], (0, n_blocks * blocksize - numel))
    out = values.view(n_blocks, blocksize) * absmax.float().unsqueeze(1)
    return out.view(-1)[:numel].to(dtype).view(shape)


def _dynamic_lut(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU 8-bit quantize table: (65536,) int64 code index for the grid
    `-1 + 2i / 65535` (fp32): the number of fp32 midpoints strictly below each grid value."""
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device=code.device)) / 65535.0
    return torch.searchsorted(midpoints, grid, right=False)


def quantize_absmax_ref(
    absmax: torch.Tensor, blocksize2: int = DQ_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of NF4 constants (bitsandbytes' CPU `quantize_blockwise` arithmetic).

    absmax fp32 (n_blocks,) -> (qabsmax uint8 (n_blocks,), absmax2 fp32 (ceil(n_blocks / blocksize2),),
    offset fp32 0-dim). Each centred value is scaled by the fp32 reciprocal of its block's absmax, mapped to
    the grid index `trunc(((clamp(v, -1, 1) + 1) * 0.5) * 65535 + 0.5)` and through `_dynamic_lut`: nearest
    code up to the 2/65535 grid, as bitsandbytes does. An all-zero block gets absmax2 0 and codes 0.
    """
    offset = absmax.mean()
    centred = (absmax - offset).float()
    n = centred.numel()
    pad = -n % blocksize2
    blocks = torch.nn.functional.pad(centred, (0, pad)).view(-1, blocksize2)  # zeros do not change the max
    absmax2 = blocks.abs().nan_to_num(nan=0.0).amax(dim=1)  # (n_blocks2,); NaN lanes count as 0
    inv = 1.0 / absmax2
    scaled = (blocks * inv.unsqueeze(1)).clamp(-1.0, 1.0)
    grid_index = (((scaled + 1.0) * 0.5) * 65535.0 + 0.5).nan_to_num(nan=0.0).to(torch.int64)
    q = _dynamic_lut(DYNAMIC_CODE.to(absmax.device))[grid_index]
    q = torch.where((absmax2 == 0).unsqueeze(1), 0, q).reshape(-1)[:n]
    return q.to(torch.uint8), absmax2, offset


def dequantize_absmax_ref(
    qabsmax: torch.Tensor,
    absmax2: torch.Tensor,
    offset: torch.Tensor,
    code2: torch.Tensor | None = None,
    blocksize2: int = DQ_BLOCKSIZE,
) -> torch.Tensor:
    """Undo `quantize_absmax_ref`: `code2[q] * absmax2[j // blocksize2] + offset` in fp32 -> (n_blocks,)."""
    code2 = DYNAMIC_CODE.to(qabsmax.device) if code2 is None else code2.float()
    scale = absmax2.float().repeat_interleave(blocksize2)[: qabsmax.numel()]
    return code2[qabsmax.long()] * scale + offset.float()


# ----------------------------------------------------------------------------------------------- Triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _nf4_index(s):
        # Count of fp32 midpoints strictly below s: ties go to the lower code. NaN compares false: fixed
        # below.
        q = (s > -0.8480963706970215).to(tl.int32)
        q += (s > -0.6106328964233398).to(tl.int32)
        q += (s > -0.4599952697753906).to(tl.int32)
        q += (s > -0.33967941999435425).to(tl.int32)
        q += (s > -0.23460739850997925).to(tl.int32)
        q += (s > -0.13791173696517944).to(tl.int32)
        q += (s > -0.045525018125772476).to(tl.int32)
        q += (s > 0.03979014977812767).to(tl.int32)
        q += (s > 0.120255246758461).to(tl.int32)
        q += (s > 0.2035212516784668).to(tl.int32)
        q += (s > 0.2920137643814087).to(tl.int32)
        q += (s > 0.3893125355243683).to(tl.int32)
        q += (s > 0.5016634464263916).to(tl.int32)
        q += (s > 0.6427869200706482).to(tl.int32)
        q += (s > 0.8614784479141235).to(tl.int32)
        return tl.where(s != s, 15, q)

    @triton.jit
    def _bf16_bits_rne(v):
        # fp32 -> bf16 bit pattern (int16), round to nearest even. Done with integer ops because Triton's
        # interpreter truncates on a bf16 cast; on a GPU this is the same rounding as `.to(tl.bfloat16)`.
        bits = v.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return tl.where(v != v, 0x7FC0, rounded).to(tl.int16)

    @triton.jit
    def _quantize_nf4_kernel(
        x_ptr, packed_ptr, absmax_ptr, n, n_full_blocks, HALF: tl.constexpr, GROUP: tl.constexpr
    ):
        # One program quantizes GROUP blocks; a block is a (HALF,) row of even and a (HALF,) row of odd
        # elements.
        pid = tl.program_id(0)
        blk = pid * GROUP + tl.arange(0, GROUP)  # (GROUP,)
        j = tl.arange(0, HALF)  # (HALF,)
        pair = blk[:, None].to(tl.int64) * HALF + j[None, :]  # (GROUP, HALF) byte index
        e_even = 2 * pair
        x0 = tl.load(x_ptr + e_even, mask=e_even < n, other=0.0).to(tl.float32)
        x1 = tl.load(x_ptr + e_even + 1, mask=e_even + 1 < n, other=0.0).to(tl.float32)
        absmax = tl.maximum(tl.max(tl.abs(x0), axis=1), tl.max(tl.abs(x1), axis=1))  # (GROUP,)
        has_nan = tl.max(((x0 != x0) | (x1 != x1)).to(tl.int32), axis=1) > 0
        absmax = tl.where(has_nan, float("nan"), absmax)
        denom = tl.where(absmax < 1e-38, 1e-38, absmax)
        partial = blk >= n_full_blocks
        # Full blocks multiply by the fp32 reciprocal, the partial last block divides (bitsandbytes' CPU
        # path).
        recip = tl.math.div_rn(tl.full([GROUP], 1.0, tl.float32), denom)
        s0_full = x0 * recip[:, None]
        s1_full = x1 * recip[:, None]
        s0_tail = tl.math.div_rn(x0, tl.broadcast_to(denom[:, None], (GROUP, HALF)))
        s1_tail = tl.math.div_rn(x1, tl.broadcast_to(denom[:, None], (GROUP, HALF)))
        s0 = tl.where(partial[:, None], s0_tail, s0_full)
        s1 = tl.where(partial[:, None], s1_tail, s1_full)
        q0 = _nf4_index(s0)
        q1 = tl.where(e_even + 1 < n, _nf4_index(s1), 7)  # odd count: pad with the code of 0.0
        byte = (q0 << 4) | q1
        tl.store(packed_ptr + pair, byte.to(tl.uint8), mask=e_even < n)
        n_blocks = tl.cdiv(n, 2 * HALF)
        tl.store(absmax_ptr + blk, tl.where(partial, denom, absmax), mask=blk < n_blocks)

    @triton.jit
    def _dequantize_nf4_kernel(
        packed_ptr,
        absmax_ptr,
        code_ptr,
        out_ptr,
        n_bytes,
        n,
        qabsmax_ptr,
        absmax2_ptr,
        code2_ptr,
        offset_ptr,
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        BF16_BITS: tl.constexpr,
        BYTES: tl.constexpr,
    ):
        # out_ptr is int16 when BF16_BITS (bf16 output written as rounded bit patterns).
        pid = tl.program_id(0)
        j = pid.to(tl.int64) * BYTES + tl.arange(0, BYTES)  # (BYTES,) byte index
        in_range = j < n_bytes
        byte = tl.load(packed_ptr + j, mask=in_range, other=0).to(tl.int32)
        blk = (2 * j) // BLOCKSIZE  # both nibbles of a byte share a block: BLOCKSIZE is even
        if DOUBLE_QUANT:
            q2 = tl.load(qabsmax_ptr + blk, mask=in_range, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q2) * tl.load(
                absmax2_ptr + blk // BLOCKSIZE2, mask=in_range, other=0.0
            )
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blk, mask=in_range, other=0.0)
        hi = tl.load(code_ptr + (byte >> 4)) * scale
        lo = tl.load(code_ptr + (byte & 0xF)) * scale
        if BF16_BITS:
            hi_out = _bf16_bits_rne(hi)
            lo_out = _bf16_bits_rne(lo)
        else:
            hi_out = hi.to(out_ptr.dtype.element_ty)
            lo_out = lo.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + 2 * j, hi_out, mask=in_range)
        tl.store(out_ptr + 2 * j + 1, lo_out, mask=in_range & (2 * j + 1 < n))


def _quantize_nf4_triton(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(-1)
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    group = max(1, min(16, 2048 // blocksize))
    grid = (triton.cdiv(n_blocks, group),)
    _quantize_nf4_kernel[grid](flat, packed, absmax, n, n // blocksize, HALF=blocksize // 2, GROUP=group)
    return packed, absmax


def _dequantize_nf4_triton(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    numel: int,
    blocksize: int,
    dtype: torch.dtype,
    dq: DoubleQuantState | None,
    quant_type: str,
) -> torch.Tensor:
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    out_arg = out.view(torch.int16) if dtype == torch.bfloat16 else out
    bf16_bits = dtype == torch.bfloat16
    n_bytes = packed.numel()
    code = CODES[quant_type].to(packed.device)
    bytes_per_prog = 1024
    grid = (triton.cdiv(n_bytes, bytes_per_prog),)
    if dq is None:
        _dequantize_nf4_kernel[grid](
            packed,
            absmax,
            code,
            out_arg,
            n_bytes,
            numel,
            packed,
            absmax,
            code,
            absmax,
            BLOCKSIZE=blocksize,
            BLOCKSIZE2=DQ_BLOCKSIZE,
            DOUBLE_QUANT=False,
            BF16_BITS=bf16_bits,
            BYTES=bytes_per_prog,
        )
    else:
        _dequantize_nf4_kernel[grid](
            packed,
            dq.absmax2,
            code,
            out_arg,
            n_bytes,
            numel,
            absmax,
            dq.absmax2,
            dq.code2.float().contiguous(),
            dq.offset.float().reshape(1),
            BLOCKSIZE=blocksize,
            BLOCKSIZE2=dq.blocksize2,
            DOUBLE_QUANT=True,
            BF16_BITS=bf16_bits,
            BYTES=bytes_per_prog,
        )
    return out


# The Triton launches as torch custom ops with fake implementations: torch.compile sees one opaque op (no
# graph break, no tracing into the launcher) and importing needs neither Triton nor a GPU.


@torch.library.custom_op("shared_kernels::nf4_dequantize", mutates_args=())
def _nf4_dequantize_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    numel: int,
    blocksize: int,
    dtype: torch.dtype,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize2: int,
    quant_type: str = "nf4",
) -> torch.Tensor:
    """(numel,) `dtype` from flat packed codes; absmax2/code2/offset given iff absmax holds uint8 DQ codes."""
    dq = None
    if absmax2 is not None and offset is not None and code2 is not None:
        dq = DoubleQuantState(absmax2.float().contiguous(), offset, code2, blocksize2)
    return _dequantize_nf4_triton(
        packed.contiguous(), absmax.contiguous(), numel, blocksize, dtype, dq, quant_type
    )


@_nf4_dequantize_op.register_fake
def _(packed, absmax, numel, blocksize, dtype, absmax2, code2, offset, blocksize2, quant_type="nf4"):
    return packed.new_empty(numel, dtype=dtype)


# The native CPU kernels (`shared_kernels.nf4_cpu`, ctypes) as custom ops too, for the same reasons.


@torch.compiler.assume_constant_result
def _native_cpu() -> bool:
    """Whether the native CPU kernels load (compiling them on first use); a constant to torch.compile."""
    return nf4_cpu.available()


def _check_finite_constants(absmax: torch.Tensor) -> None:
    # A block's absmax is finite exactly when all its values are: checking the constants is the same test as
    # checking x, at 1/blocksize of the cost.
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError(
            "x contains NaN or inf; pass check_finite=False to quantize it anyway (the "
            "non-finite values poison their blocks, as in bitsandbytes' CPU backend)"
        )


@torch.library.custom_op("shared_kernels::nf4_quantize_cpu", mutates_args=(), device_types="cpu")
def _nf4_quantize_cpu_op(
    x: torch.Tensor, blocksize: int, quant_type: str, check_finite: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed, absmax) of CPU `x`: whole blocks in the native kernel, the partial last block (divided, not
    multiplied) in the reference."""
    flat = x.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    if full == 0:
        packed, absmax = quantize_4bit_ref(flat, blocksize, quant_type)
    else:
        midpoints, order, _ = QUANTIZE_TABLES[quant_type]
        packed, absmax = nf4_cpu.quantize_nf4_full_blocks_cpu(flat[:full], blocksize, midpoints, order)
        if full < n:
            tail_packed, tail_absmax = quantize_4bit_ref(flat[full:], blocksize, quant_type)
            packed, absmax = torch.cat([packed, tail_packed]), torch.cat([absmax, tail_absmax])
    if check_finite:
        _check_finite_constants(absmax)
    return packed, absmax


@_nf4_quantize_cpu_op.register_fake
def _(x, blocksize, quant_type, check_finite):
    n = x.numel()
    return x.new_empty((n + 1) // 2, dtype=torch.uint8), x.new_empty(-(-n // blocksize), dtype=torch.float32)


@torch.library.custom_op("shared_kernels::nf4_dequantize_cpu", mutates_args=(), device_types="cpu")
def _nf4_dequantize_cpu_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    numel: int,
    blocksize: int,
    dtype: torch.dtype,
    quant_type: str,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize2: int,
) -> torch.Tensor:
    """(numel,) `dtype` from flat packed codes; absmax2/code2/offset given iff absmax holds uint8 DQ codes."""
    dq = None
    if absmax2 is not None and code2 is not None and offset is not None:
        dq = DoubleQuantState(absmax2, offset, code2, blocksize2)
    return nf4_cpu.dequantize_nf4_cpu(packed, absmax, numel, blocksize, dtype, CODES[quant_type], dq)


@_nf4_dequantize_cpu_op.register_fake
def _(packed, absmax, numel, blocksize, dtype, quant_type, absmax2, code2, offset, blocksize2):
    return packed.new_empty(numel, dtype=dtype)


@torch.library.custom_op("shared_kernels::nf4_dequantize_cpu_into", mutates_args=("out",), device_types="cpu")
def _nf4_dequantize_cpu_into_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize2: int,
    out: torch.Tensor,
) -> None:
    """`nf4_dequantize_cpu` written into the contiguous `out` (its dtype and element count)."""
    dq = None
    if absmax2 is not None and code2 is not None and offset is not None:
        dq = DoubleQuantState(absmax2, offset, code2, blocksize2)
    code = CODES[quant_type]
    nf4_cpu.dequantize_nf4_cpu(packed, absmax, out.numel(), blocksize, out.dtype, code, dq, out=out.view(-1))


# ----------------------------------------------------------------------------------------------- public API


def quantize_4bit(
    x: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    *,
    check_finite: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantize, byte-for-byte equal to bitsandbytes' `quantize_4bit(x, blocksize,
    quant_type=quant_type, compress_statistics=False)` on CPU (its packed data flattened).

    Args:
        x: float32/bfloat16/float16 tensor of any shape and element count n >= 1.
        blocksize: elements per absmax block, one of 32, 64, ..., 4096.
        quant_type: "nf4" or "fp4".
        check_finite: raise a ValueError on NaN/inf input (one extra pass); with False a non-finite value
            poisons its block instead (see the module docstring).
        backend: "auto" (Triton on CUDA, the native kernels on CPU), "torch" (the reference) or "triton".
    Returns:
        packed: uint8 ((n + 1) // 2,), element 2i in the high nibble of byte i.
        absmax: float32 (ceil(n / blocksize),).
    """
    _check_float_input(x, "x")
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    resolved = resolve_backend(backend, x.device)
    if resolved == "triton" and quant_type == "nf4":
        packed, absmax = _quantize_nf4_triton(x.contiguous(), blocksize)
    elif backend == "auto" and x.device.type == "cpu" and _native_cpu():
        # The op checks finiteness itself, so a compiled graph needs no host sync here.
        return torch.ops.shared_kernels.nf4_quantize_cpu(x, blocksize, quant_type, check_finite)
    else:
        packed, absmax = quantize_4bit_ref(x, blocksize, quant_type)
    if check_finite:
        _check_finite_constants(absmax)
    return packed, absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
    quant_type: str = "nf4",
    *,
    absmax2: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    blocksize2: int = DQ_BLOCKSIZE,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """4-bit dequantize, equal to bitsandbytes' `dequantize_4bit` for the same bytes, constants and quant
    type.

    Args:
        packed: uint8 ((numel + 1) // 2,) (any shape with that many elements, e.g. bitsandbytes' (k, 1)).
        absmax: float32 (n_blocks,) constants, or, with double quantization, their uint8 (n_blocks,) codes.
        shape: the output shape.
        blocksize: NF4 block size used at quantization.
        dtype: output dtype (float32, bfloat16, float16).
        quant_type: "nf4" or "fp4", as at quantization.
        absmax2, offset, code2, blocksize2: the double-quantization state (required when `absmax` is uint8):
            fp32 (ceil(n_blocks / blocksize2),) scales, the fp32 0-dim mean, the (256,) code (default: the
            signed dynamic map) and the second-level block size.
        backend: "auto" (Triton on CUDA, the native kernels on CPU), "torch" (the reference) or "triton".
        out: optional contiguous (shape) tensor of `dtype` on packed's device to write into (and return).
            Reusing one skips the page faults of a fresh output, which on CPU cost more than the dequantize
            itself for large weights; the native CPU kernels write it directly, other paths copy into it.
    Returns:
        (shape) tensor of `dtype` (`out` when given).
    """
    shape = tuple(int(s) for s in shape)
    double_quant = absmax.dtype == torch.uint8
    numel = _check_packed(packed, absmax, shape, blocksize, dtype)
    check_quant_type(quant_type)
    if double_quant:
        code2 = _check_double_quant_state(absmax, absmax2, offset, code2, blocksize2, packed.device)
    elif absmax.dtype != torch.float32:
        raise ValueError(f"absmax must be float32 (or uint8 when double-quantized), got {absmax.dtype}")
    if out is not None:
        _check_out(out, shape, dtype, packed.device)
    dq = (absmax2, code2, offset) if double_quant else (None, None, None)
    if resolve_backend(backend, packed.device) == "triton":
        y = torch.ops.shared_kernels.nf4_dequantize(
            packed.reshape(-1), absmax, numel, blocksize, dtype, *dq, blocksize2, quant_type
        )
    elif backend == "auto" and packed.device.type == "cpu" and _native_cpu():
        if out is not None:
            torch.ops.shared_kernels.nf4_dequantize_cpu_into(
                packed.reshape(-1), absmax, blocksize, quant_type, *dq, blocksize2, out
            )
            return out
        y = torch.ops.shared_kernels.nf4_dequantize_cpu(
            packed.reshape(-1), absmax, numel, blocksize, dtype, quant_type, *dq, blocksize2
        )
    else:
        if double_quant:
            assert absmax2 is not None and offset is not None  # checked above
            absmax = dequantize_absmax_ref(absmax, absmax2, offset, code2, blocksize2)
        y = dequantize_4bit_ref(packed, absmax, shape, blocksize, dtype, quant_type)
    if out is None:
        return y.reshape(shape)
    return out.copy_(y.reshape(shape))


def _check_double_quant_state(
    absmax: torch.Tensor,
    absmax2: torch.Tensor | None,
    offset: torch.Tensor | None,
    code2: torch.Tensor | None,
    blocksize2: int,
    device: torch.device,
) -> torch.Tensor:
    """Validate the second level of a double-quantized `absmax`; returns `code2` (default: dynamic map)."""
    if absmax2 is None or offset is None:
        raise ValueError("absmax is uint8 (double-quantized): absmax2 and offset are required")
    if absmax2.numel() != -(-absmax.numel() // blocksize2):
        raise ValueError(
            f"absmax2 must hold ceil({absmax.numel()} / {blocksize2}) values, got {absmax2.numel()}"
        )
    code2 = DYNAMIC_CODE.to(device) if code2 is None else code2
    if code2.numel() != 256:
        raise ValueError(f"code2 must hold 256 values, got {code2.numel()}")
    return code2


def _check_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {dtype} tensor of shape {shape} on {device}, got "
            f"{'a non-contiguous ' if not out.is_contiguous() else ''}{out.dtype} {tuple(out.shape)} "
            f"on {out.device}"
        )


# The historical NF4 names: the same functions (quant_type defaults to "nf4").
quantize_nf4 = quantize_4bit
dequantize_nf4 = dequantize_4bit
quantize_nf4_ref = quantize_4bit_ref
dequantize_nf4_ref = dequantize_4bit_ref


def double_quantize_absmax(
    absmax: torch.Tensor, blocksize2: int = DQ_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization (bitsandbytes `compress_statistics=True`) of fp32 4-bit constants (n_blocks,) ->
    (qabsmax uint8 (n_blocks,), absmax2 fp32 (ceil(n_blocks / blocksize2),), offset fp32 0-dim).

    Runs in torch on every device: the constants are 1/blocksize of the weight.

    Contract: every constant must be finite and >= 0 (a block's max |x|), else a ValueError names the first
    bad block. An 8-bit code cannot hold NaN or inf, and the offset is the mean of all constants, so
    bitsandbytes turns every constant of the tensor to NaN from one NaN block; a tensor quantized with
    `check_finite=False` that has poisoned blocks can be kept with `double_quant=False` only.
    """
    if (
        not isinstance(absmax, torch.Tensor)
        or absmax.dtype != torch.float32
        or absmax.dim() != 1
        or absmax.numel() == 0
    ):
        raise ValueError(
            f"absmax must be a non-empty 1-D float32 tensor, got "
            f"{getattr(absmax, 'dtype', type(absmax).__name__)} {tuple(getattr(absmax, 'shape', ()))}"
        )
    if isinstance(blocksize2, bool) or not isinstance(blocksize2, int) or blocksize2 <= 0:
        raise ValueError(f"blocksize2 must be a positive int, got {blocksize2!r}")
    bad = ~(torch.isfinite(absmax) & (absmax >= 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"absmax must be finite and >= 0 for double quantization, got {absmax[i].item()} at "
            f"block {i} ({int(bad.sum())} bad); NaN/inf come from non-finite weights (quantize "
            "with check_finite=True to find them, or keep such a tensor without double quantization)"
        )
    return quantize_absmax_ref(absmax, blocksize2)
