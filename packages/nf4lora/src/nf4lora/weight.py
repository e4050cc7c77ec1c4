"""The 4-bit weight container: NF4 or FP4 codes + (optionally double-quantized) constants + shape and dtype.

Stored exactly as bitsandbytes stores a `Params4bit` with its `QuantState`, so the same bytes serve either
library (conversion in `nf4lora.interop`, no re-quantization).

Distributed training: the packed codes are a frozen `nn.Parameter` (bitsandbytes' FSDP-QLoRA idea), so FSDP2's
`fully_shard` shards them on dim 0 (each rank holds 1/N of the bytes, gathered around forward and backward)
while the small quantization state (absmax, second-level constants) stays in replicated buffers beside it.
`quant_storage` views the bytes as another dtype (bitsandbytes' option, needed where every parameter of a
wrapped unit must share one dtype, e.g. FSDP1); FSDP2 shards the default uint8 as it is. The container keeps
the storage dtype through `.to(dtype)` / `.half()`: they move it, never convert the bytes. DDP:
`quantize_model` and `prepare_model` list every tensor of the 4-bit weights in
`_ddp_params_and_buffers_to_ignore` (see `ddp_ignore_frozen_4bit`), so DDP never broadcasts these frozen
weights (buffers are re-sent at every forward otherwise); every rank quantizes the same checkpoint to the same
bytes.
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

STORAGE_DTYPES = (torch.uint8, torch.float32, torch.bfloat16, torch.float16)


def _to_storage(packed: torch.Tensor, n_bytes: int, quant_storage: torch.dtype) -> torch.Tensor:
    """uint8 (n_bytes,) or bytes already in `quant_storage` -> (ceil(n_bytes / itemsize),) `quant_storage`,
    zero-padded at the end to whole storage elements."""
    flat = packed.detach().reshape(-1)
    if flat.dtype == quant_storage != torch.uint8:
        units = -(-n_bytes // quant_storage.itemsize)
        if flat.numel() != units:
            raise ValueError(
                f"packed ({quant_storage}) must hold ceil({n_bytes} / {quant_storage.itemsize}) = "
                f"{units} elements, got {flat.numel()}"
            )
        return flat
    if flat.dtype != torch.uint8 or flat.numel() != n_bytes:
        raise ValueError(
            f"packed must be uint8 with {n_bytes} elements (or {quant_storage} storage), "
            f"got {flat.dtype} with {flat.numel()}"
        )
    pad = -n_bytes % quant_storage.itemsize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(quant_storage)


class NF4Weight(nn.Module):
    """A frozen 4-bit (NF4 or FP4) tensor as a module (so `.to()`, `state_dict()`, FSDP2 and `memory_report`
    see it).

    Parameter (frozen):
        packed: the ((numel + 1) // 2,) code bytes, element 2i in the high nibble, viewed as `quant_storage`
            (uint8 by default; a wider dtype holds ceil(bytes / itemsize) elements, zero-padded).
    Buffers:
        absmax: float32 (n_blocks,) constants, or uint8 (n_blocks,) codes when double-quantized.
        absmax2: float32 (ceil(n_blocks / 256),) second-level constants (double quantization only).
        offset: float32 0-dim mean of the constants (double quantization only).
        code2: float32 (256,) the second-level code (double quantization only; bitsandbytes keeps one per
            weight, so conversions keep it too).
    Attributes:
        shape: the original shape; dtype: the original dtype (the default dequantize dtype); blocksize;
        quant_type: "nf4" or "fp4".
    """

    packed: nn.Parameter
    absmax: torch.Tensor
    absmax2: torch.Tensor
    offset: torch.Tensor
    code2: torch.Tensor

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        shape: tuple[int, ...] | torch.Size,
        dtype: torch.dtype,
        blocksize: int = 64,
        *,
        absmax2: torch.Tensor | None = None,
        offset: torch.Tensor | None = None,
        code2: torch.Tensor | None = None,
        blocksize2: int = DQ_BLOCKSIZE,
        quant_type: str = "nf4",
        quant_storage: torch.dtype = torch.uint8,
    ) -> None:
        super().__init__()
        check_blocksize(blocksize)
        check_quant_type(quant_type)
        if quant_storage not in STORAGE_DTYPES:
            raise ValueError(f"quant_storage must be one of {STORAGE_DTYPES}, got {quant_storage}")
        self.quant_type = quant_type
        self.quant_storage = quant_storage
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = blocksize
        self.blocksize2 = blocksize2
        numel = math.prod(self.shape)
        self.n_bytes = (numel + 1) // 2
        storage = _to_storage(packed, self.n_bytes, quant_storage)
        if absmax.numel() != -(-numel // blocksize):
            raise ValueError(f"absmax must hold {-(-numel // blocksize)} values, got {absmax.numel()}")
        self.packed = nn.Parameter(storage, requires_grad=False)
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
    def from_float(
        cls,
        weight: torch.Tensor,
        blocksize: int = 64,
        double_quant: bool = True,
        backend: str = "auto",
        quant_type: str = "nf4",
        quant_storage: torch.dtype = torch.uint8,
    ) -> NF4Weight:
        """Quantize a float tensor (bitsandbytes `quantize_4bit(..., quant_type,
        compress_statistics=double_quant, quant_storage=quant_storage)`)."""
        w = weight.detach()
        packed, absmax = quantize_4bit(w, blocksize, quant_type, backend=backend)
        if not double_quant:
            return cls(
                packed,
                absmax,
                w.shape,
                w.dtype,
                blocksize,
                quant_type=quant_type,
                quant_storage=quant_storage,
            )
        qabsmax, absmax2, offset = double_quantize_absmax(absmax)
        return cls(
            packed,
            qabsmax,
            w.shape,
            w.dtype,
            blocksize,
            absmax2=absmax2,
            offset=offset,
            quant_type=quant_type,
            quant_storage=quant_storage,
        )

    def requantized(self, weight: torch.Tensor, backend: str = "auto") -> NF4Weight:
        """A new container quantizing `weight` (this one's shape) with this one's dtype, quant type, block
        size, double quantization and storage (what peft's merge does with a bitsandbytes weight)."""
        if tuple(weight.shape) != tuple(self.shape):
            raise ValueError(f"weight must have shape {tuple(self.shape)}, got {tuple(weight.shape)}")
        return NF4Weight.from_float(
            weight.to(self.dtype),
            self.blocksize,
            self.double_quant,
            backend=backend,
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
        )

    def packed_bytes(self) -> torch.Tensor:
        """The uint8 ((numel + 1) // 2,) codes, a view of `packed` (gathered first if FSDP2 has it
        sharded)."""
        packed: torch.Tensor = self.packed
        if hasattr(packed, "full_tensor"):  # a DTensor shard outside forward/backward
            packed = packed.full_tensor()
        if packed.dtype != self.quant_storage:
            # FSDP2 mixed precision gathers parameters cast to its param_dtype: uint8 codes 0..255 are exact
            # in bf16/fp16/fp32 and cast back exactly (a float quant_storage narrower than param_dtype would
            # not).
            packed = packed.to(self.quant_storage)
        return packed.reshape(-1).view(torch.uint8)[: self.n_bytes]

    def _apply(self, fn, recurse=True):
        # The codes and constants are a bit-exact encoding: `model.to(torch.bfloat16)`, `.half()` and the like
        # may move them but never convert them (bitsandbytes' Params4bit guards its data the same way).
        before = {**{n: p.data for n, p in self._parameters.items()}, **dict(self._buffers)}
        out = super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._parameters[name] if name in self._parameters else self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                moved = old.to(new.device)
                if name in self._parameters:
                    self._parameters[name] = nn.Parameter(moved, requires_grad=False)
                else:
                    self._buffers[name] = moved
        return out

    def _dq_kwargs(self) -> dict:
        if not self.double_quant:
            return {}
        return dict(absmax2=self.absmax2, offset=self.offset, code2=self.code2, blocksize2=self.blocksize2)

    def dequantize(self, dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
        """The dense weight (self.shape) in `dtype` (default: the original dtype)."""
        return dequantize_4bit(
            self.packed_bytes(),
            self.absmax,
            self.shape,
            self.blocksize,
            dtype or self.dtype,
            self.quant_type,
            backend=backend,
            **self._dq_kwargs(),
        )

    def matmul(
        self, x: torch.Tensor, transpose_w: bool = True, backend: str = "auto", reuse_workspace: bool = False
    ) -> torch.Tensor:
        """x @ W^T (transpose_w) or x @ W for a 2-D weight, in x's dtype, without storing W
        (`reuse_workspace`: see `shared_kernels.nf4_matmul.matmul_nf4`)."""
        return matmul_nf4(
            x,
            self.packed_bytes(),
            self.absmax,
            (self.shape[0], self.shape[1]),
            self.blocksize,
            transpose_w=transpose_w,
            quant_type=self.quant_type,
            backend=backend,
            reuse_workspace=reuse_workspace,
            **self._dq_kwargs(),
        )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of everything this weight stores: codes, constants, and with double quantization the
        second-level constants, the offset and the 256-entry code table."""
        return sum(t.numel() * t.element_size() for t in (*self.parameters(), *self.buffers()))

    @property
    def bits_per_param(self) -> float:
        """Storage bits per weight element: codes + per-block constants (+ second-level constants), i.e.
        4 + 32/blocksize, or 4 + 8/blocksize + 32/(blocksize * 256) with double quantization (4.126953125 at
        blocksize 64 when the element count is a multiple of 2 * 64 * 256). The per-tensor offset and the
        code tables are shared constants and not counted, as in the QLoRA paper."""
        bits = 8 * (self.n_bytes + self.absmax.numel() * self.absmax.element_size())
        if self.double_quant:
            bits += 32 * self.absmax2.numel()
        return bits / self.numel

    def extra_repr(self) -> str:
        storage = "" if self.quant_storage == torch.uint8 else f", quant_storage={self.quant_storage}"
        return (
            f"shape={tuple(self.shape)}, dtype={self.dtype}, quant_type={self.quant_type}, "
            f"blocksize={self.blocksize}, double_quant={self.double_quant}{storage}"
        )
