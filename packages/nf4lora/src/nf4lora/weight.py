"""The 4-bit weight container: NF4 or FP4 codes + (optionally double-quantized) constants + shape and dtype.

Stored exactly as bitsandbytes stores a `Params4bit` with its `QuantState`, so the same bytes serve either
library (conversion in `nf4lora.interop`, no re-quantization).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shared_kernels.nf4 import (
    DQ_BLOCKSIZE,
    DYNAMIC_CODE,
    check_blocksize,
    check_quant_type,
    dequantize_4bit,
    double_quantize_absmax,
    quantize_4bit,
)
from shared_kernels.nf4_matmul import matmul_nf4


class NF4Weight(nn.Module):
    """A frozen 4-bit (NF4 or FP4) tensor as module buffers (so `.to()`, `state_dict()` and `memory_report` see it).

    Buffers:
        packed: uint8 ((numel + 1) // 2,) codes, element 2i in the high nibble.
        absmax: float32 (n_blocks,) constants, or uint8 (n_blocks,) codes when double-quantized.
        absmax2: float32 (ceil(n_blocks / 256),) second-level constants (double quantization only).
        offset: float32 0-dim mean of the constants (double quantization only).
        code2: float32 (256,) the second-level code (double quantization only; bitsandbytes keeps one per
            weight, so conversions keep it too).
    Attributes:
        shape: the original shape; dtype: the original dtype (the default dequantize dtype); blocksize;
        quant_type: "nf4" or "fp4".
    """

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...] | torch.Size,
                 dtype: torch.dtype, blocksize: int = 64, *, absmax2: torch.Tensor | None = None,
                 offset: torch.Tensor | None = None, code2: torch.Tensor | None = None,
                 blocksize2: int = DQ_BLOCKSIZE, quant_type: str = "nf4") -> None:
        super().__init__()
        check_blocksize(blocksize)
        check_quant_type(quant_type)
        self.quant_type = quant_type
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = blocksize
        self.blocksize2 = blocksize2
        numel = math.prod(self.shape)
        if packed.dtype != torch.uint8 or packed.numel() != (numel + 1) // 2:
            raise ValueError(f"packed must be uint8 with {(numel + 1) // 2} elements for shape {tuple(shape)}, "
                             f"got {packed.dtype} with {packed.numel()}")
        if absmax.numel() != -(-numel // blocksize):
            raise ValueError(f"absmax must hold {-(-numel // blocksize)} values, got {absmax.numel()}")
        self.register_buffer("packed", packed.reshape(-1))
        self.register_buffer("absmax", absmax.reshape(-1))
        self.double_quant = absmax.dtype == torch.uint8
        if self.double_quant:
            if absmax2 is None or offset is None:
                raise ValueError("absmax is uint8 (double-quantized): absmax2 and offset are required")
            code2 = DYNAMIC_CODE.to(packed.device) if code2 is None else code2
            self.register_buffer("absmax2", absmax2.float().reshape(-1))
            self.register_buffer("offset", offset.float().reshape(()))
            self.register_buffer("code2", code2.float().reshape(-1))
        elif absmax.dtype != torch.float32:
            raise ValueError(f"absmax must be float32 or uint8 (double-quantized), got {absmax.dtype}")

    @classmethod
    def from_float(cls, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                   backend: str = "auto", quant_type: str = "nf4") -> NF4Weight:
        """Quantize a float tensor (bitsandbytes `quantize_4bit(..., quant_type,
        compress_statistics=double_quant)`)."""
        w = weight.detach()
        packed, absmax = quantize_4bit(w, blocksize, quant_type, backend=backend)
        if not double_quant:
            return cls(packed, absmax, w.shape, w.dtype, blocksize, quant_type=quant_type)
        qabsmax, absmax2, offset = double_quantize_absmax(absmax)
        return cls(packed, qabsmax, w.shape, w.dtype, blocksize, absmax2=absmax2, offset=offset,
                   quant_type=quant_type)

    def _dq_kwargs(self) -> dict:
        if not self.double_quant:
            return {}
        return dict(absmax2=self.absmax2, offset=self.offset, code2=self.code2, blocksize2=self.blocksize2)

    def dequantize(self, dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
        """The dense weight (self.shape) in `dtype` (default: the original dtype)."""
        return dequantize_4bit(self.packed, self.absmax, self.shape, self.blocksize, dtype or self.dtype,
                               self.quant_type, backend=backend, **self._dq_kwargs())

    def matmul(self, x: torch.Tensor, transpose_w: bool = True, backend: str = "auto") -> torch.Tensor:
        """x @ W^T (transpose_w) or x @ W for a 2-D weight, in x's dtype, without storing W."""
        return matmul_nf4(x, self.packed, self.absmax, (self.shape[0], self.shape[1]), self.blocksize,
                          transpose_w=transpose_w, quant_type=self.quant_type, backend=backend,
                          **self._dq_kwargs())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of everything this weight stores: codes, constants, and with double quantization the
        second-level constants, the offset and the 256-entry code table."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @property
    def bits_per_param(self) -> float:
        """Storage bits per weight element: codes + per-block constants (+ second-level constants), i.e.
        4 + 32/blocksize, or 4 + 8/blocksize + 32/(blocksize * 256) with double quantization (4.126953125 at
        blocksize 64 when the element count is a multiple of 2 * 64 * 256). The per-tensor offset and the
        code tables are shared constants and not counted, as in the QLoRA paper."""
        bits = 8 * (self.packed.numel() + self.absmax.numel() * self.absmax.element_size())
        if self.double_quant:
            bits += 32 * self.absmax2.numel()
        return bits / self.numel

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.shape)}, dtype={self.dtype}, quant_type={self.quant_type}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}")
