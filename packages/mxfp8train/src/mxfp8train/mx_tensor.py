"""`MXTensor` and `to_mx`: the public face of the MX block cast in `shared_kernels.mx_cast`.

The scale rules, the edge-case conventions (all-zero blocks, E = -127, inf and NaN) and where they differ
from torchao are documented in `shared_kernels.mx_cast`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared_kernels.mx_cast import mx_cast, mx_dequantize


@dataclass(frozen=True)
class MXTensor:
    """A tensor in MX format: float8 elements and one E8M0 scale byte per block along `dim`.

    Attributes:
        data: the element codes, same shape as the source tensor, dtype `elem_dtype`.
        scale: uint8 biased E8M0 exponents (2^(byte - 127); 0xFF is NaN); the source shape with `dim`
            replaced by its number of blocks, ceil(n / block_size).
        block_size: elements per block.
        dim: the blocked dimension (non-negative).
        scale_mode: "rceil" or "floor", the rule that produced `scale`.
    """

    data: torch.Tensor
    scale: torch.Tensor
    block_size: int
    dim: int
    scale_mode: str

    @property
    def elem_dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Elements times their block scale, computed in fp32 (exact) and cast to `dtype`."""
        return mx_dequantize(self.data, self.scale, self.block_size, self.dim, dtype)


def to_mx(
    x: torch.Tensor,
    elem_dtype: torch.dtype = torch.float8_e4m3fn,
    block_size: int = 32,
    scale_mode: str = "rceil",
    dim: int = -1,
    backend: str = "auto",
) -> MXTensor:
    """Quantize `x` to MX blocks of `block_size` consecutive elements along `dim`.

    Args:
        x: (..., n, ...) float32, bfloat16 or float16. A partial last block (n not a multiple of
            block_size) is scaled as if zero-padded.
        elem_dtype: torch.float8_e4m3fn (max 448) or torch.float8_e5m2 (max 57344).
        block_size: a power of two in [2, 1024]; 32 is the OCP block and the only one hardware GEMMs take.
        scale_mode: "rceil" (the paper's rule: the block amax lands in (max/2, max], nothing clips) or
            "floor" (the OCP rule: blocks whose amax mantissa exceeds 1.75 saturate).
        dim: the blocked dimension.
        backend: "auto" | "torch" | "triton" (see `shared_kernels.mx_cast.mx_cast`).
    Returns:
        an `MXTensor`; `.data` byte-equal to torchao 0.18's `to_mx` outside the documented edge cases.
    """
    data, scale = mx_cast(x, elem_dtype, block_size, scale_mode, dim, backend)
    return MXTensor(data, scale, block_size, dim % x.dim(), scale_mode)
