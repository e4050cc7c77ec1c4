"""Symmetric absmax blockwise Int4: the integer 4-bit storage type QLoRA compares NF4 against (paper Table 2,
Figure 3), for `nf4lora-study`. Not a bitsandbytes format (bitsandbytes has none).

Per contiguous block of the flattened tensor (as NF4): `scale = absmax / 7`, `q = round(x / scale)` (round
half to even, as `torch.round`) in [-7, 7], stored as the nibble `q + 8` (1..15; 0 unused, so the grid is
symmetric and zero is exact), element 2i in the high nibble, an odd count padded with the code of 0.0. An
all-zero block stores absmax 0 and dequantizes to zeros. Dequantize: `(nibble - 8) * (absmax / 7)` in fp32,
cast once.
"""

from __future__ import annotations

import math

import torch

from shared_kernels.nf4 import check_blocksize, pack_nibbles, unpack_nibbles

INT4_LEVELS = 7  # largest magnitude of the symmetric grid -7..7


def quantize_int4(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """x: any shape, float -> (packed uint8 ((n + 1) // 2,), absmax fp32 (ceil(n / blocksize),))."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        raise ValueError(f"x must be a non-empty float tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    check_blocksize(blocksize)
    flat = x.reshape(-1).float()
    if not torch.isfinite(flat).all():
        raise ValueError("x must be finite (NaN or inf found)")
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scale = (absmax / INT4_LEVELS).clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)
    q = torch.round(blocks / scale).clamp(-INT4_LEVELS, INT4_LEVELS).to(torch.int64)
    codes = q.reshape(-1)[: n + n % 2] + 8  # an odd count keeps one padding value: 0.0, code 8
    return pack_nibbles(codes), absmax


def dequantize_int4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of `quantize_int4`: `(nibble - 8) * absmax[block] / 7` in fp32, cast once to `dtype`."""
    check_blocksize(blocksize)
    numel = math.prod(shape)
    n_blocks = -(-numel // blocksize)
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 1) // 2:
        raise ValueError(
            f"packed must be uint8 with (numel + 1) // 2 = {(numel + 1) // 2} bytes for shape "
            f"{tuple(shape)}, got {packed.dtype} with {packed.numel()}"
        )
    if absmax.numel() != n_blocks:
        raise ValueError(
            f"absmax must hold ceil(numel / blocksize) = {n_blocks} values, got {absmax.numel()}"
        )
    q = (unpack_nibbles(packed, numel) - 8).float()
    q = torch.nn.functional.pad(q, (0, n_blocks * blocksize - numel)).view(n_blocks, blocksize)
    out = q * (absmax.float() / INT4_LEVELS).unsqueeze(1)
    return out.reshape(-1)[:numel].to(dtype).view(shape)
