"""Native CPU kernels for 4-bit (NF4, FP4) quantize/dequantize: the fast path `shared_kernels.nf4` takes for
CPU tensors with `backend="auto"`, through the custom ops `shared_kernels::nf4_quantize_cpu` and
`shared_kernels::nf4_dequantize_cpu` registered there (so `torch.compile` sees one opaque op, no graph
break). Bit for bit equal to the torch reference (`quantize_4bit_ref`, `dequantize_4bit_ref`) and so to
bitsandbytes' CPU backend; the reference stays the specification (`backend="torch"`).

Why C: the reference is memory-bound torch code that makes several passes (index, gather, scale, cast), and
`torch.compile` (inductor) emits a scalar, bounds-checked gather for the code lookup (measured 0.5x of
bitsandbytes' native kernel). Here, per block of `blocksize` elements:
- dequantize builds the 16 values `code[k] * scale` in fp32 (with double quantization the scale is first
  rebuilt as `code2[q] * absmax2[b // blocksize2] + offset`, two fp32 roundings, no FMA), rounds them once to
  the output dtype, then each byte is two table lookups. Multiplying the code by the scale and rounding happen
  exactly as in the reference, per element. The instruction set is picked at run time (`isa()`; the .so is
  built for any x86-64, no -march): AVX-512 F+BW (one `vpermps` / `vpermw` per 16 / 32 outputs, the table
  built by one vector multiply and rounded by one vector conversion: bf16 by integer round-to-nearest-even,
  since `vcvtneps2bf16` flushes subnormals; fp16 by `vcvtps2ph`, torch's own cast), else AVX2 (`vpermps` on
  two 8-entry halves), else scalar (other CPUs). Outputs from 2 MiB get streaming stores (AVX-512; no read
  of each output line before it is written: 3x less CPU time at 4096x4096 -> fp32 into `out=`), except fresh
  outputs of 32 MiB and more, new mappings whose page faults just brought each page into the cache.
  `select_isa` and `set_stream_bytes` force a path, so the tests check every one on one machine;
- quantize takes the block's max |x| (NaN propagates), scales by the fp32 reciprocal and counts the fp32
  midpoints of the sorted code strictly below each value (ties to the lower code, NaN -> 15), then maps that
  position through the code's sort order (identity for NF4, see `shared_kernels.nf4`). The partial last block
  (divided, not multiplied) is left to the reference by the caller.
Work is shared by `torch.get_num_threads()` pthreads claiming chunks of blocks from an atomic counter (a
static split made a descheduled thread hold up half the call on the loaded test machine). A fresh output
tensor is advised to use transparent huge pages (`madvise`, outputs of 2-64 MiB): with 4 KiB pages, faulting
in the output costs more than computing it.

The C source is `nf4_cpu.c` beside this file (package data), built on first use by
`shared_kernels.native_build` (`$CC`, `$SHARED_KERNELS_CACHE`; about 0.5-1 s once) and loaded with ctypes (the
GIL is released during calls). Without a compiler, or when compiling or loading fails, or with
`SHARED_KERNELS_NF4_CPU=0`, `available()` is False and callers use the torch reference (one RuntimeWarning per
process on failure). On other CPUs only the scalar paths are built (tested here by compiling with
-DNF4_CPU_GENERIC).
"""

from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING

import torch

from shared_kernels.native_build import CFLAGS, NativeLibrary

if TYPE_CHECKING:
    from shared_kernels.nf4 import DoubleQuantState

_OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Below this many elements the thread start-up costs more than it saves.
_MIN_ELEMENTS_PER_THREAD = 1 << 17
# Fresh outputs from one 2 MiB page up to 64 MiB get the huge-page advice. Above that, on the (VM) test
# machine, every other call stalled for 0.4-1.2 s in the kernel (fp32 11008x4096, 180 MB: 0.4x of
# bitsandbytes), while up to 64 MiB the advice was a steady 3x win (4096x4096 fp32: 40 ms vs 140 ms
# without, 210 ms bitsandbytes).
_HUGEPAGE_BYTES = 1 << 21
_HUGEPAGE_MAX_BYTES = 64 << 20
# Whether fresh outputs get the huge-page advice at all (the benchmark measures both ways; off with
# SHARED_KERNELS_NF4_HUGEPAGES=0).
hugepage_advice = os.environ.get("SHARED_KERNELS_NF4_HUGEPAGES", "1") != "0"


def _declare(lib: ctypes.CDLL) -> None:
    P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.nf4_dequantize.argtypes = [P, P, I64, I64, P, P, P, P, ctypes.c_float, I64, P, I32, I32, I32]
    lib.nf4_dequantize.restype = None
    lib.nf4_quantize_full_blocks.argtypes = [P, I32, P, P, I64, I64, P, P, I32]
    lib.nf4_quantize_full_blocks.restype = None
    lib.nf4_advise_hugepages.argtypes = [P, I64]
    lib.nf4_advise_hugepages.restype = None
    lib.nf4_select_isa.argtypes = [I32]
    lib.nf4_select_isa.restype = I32
    lib.nf4_isa.argtypes = []
    lib.nf4_isa.restype = I32
    lib.nf4_set_stream_bytes.argtypes = [I64]
    lib.nf4_set_stream_bytes.restype = None


def native_library(cflags: list[str] = CFLAGS) -> NativeLibrary:
    """The kernels as a `NativeLibrary` built with `cflags` (tests add `-DNF4_CPU_GENERIC`: no x86 paths)."""
    return NativeLibrary("nf4_cpu.c", "SHARED_KERNELS_NF4_CPU", "NF4 CPU kernels", _declare, cflags)


_native = native_library()


def library() -> ctypes.CDLL | None:
    """The compiled kernels, compiling them on first use; None when disabled or unavailable."""
    return _native.get()


def available() -> bool:
    return library() is not None


# The dequantize kernel's instruction sets, in the C file's numbering.
ISAS = ("scalar", "avx2", "avx512")


def isa() -> str:
    """The instruction set the dequantize kernel uses: "avx512" (F + BW), "avx2" or "scalar"."""
    lib = library()
    assert lib is not None, "call available() first"
    return ISAS[lib.nf4_isa()]


def select_isa(name: str | None = None) -> str:
    """Make the dequantize kernel use `name` (one of `ISAS`), or the best this CPU has (None or a name above
    it); returns the one in use. For tests and benchmarks: every path bit-equal, checked on one machine."""
    if name is not None and name not in ISAS:
        raise ValueError(f"isa must be one of {ISAS} or None, got {name!r}")
    lib = library()
    assert lib is not None, "call available() first"
    return ISAS[lib.nf4_select_isa(-1 if name is None else ISAS.index(name))]


# Outputs from this many bytes get the AVX-512 kernel's streaming stores (the C file's default, and why):
# every `out=`, and fresh outputs below _FRESH_STREAM_MAX_BYTES. Larger fresh outputs are new mappings (glibc
# mmaps allocations from its threshold, which adapts up to 32 MiB), whose page faults zero each page into the
# cache just before the kernel writes it: plain stores are cheaper there. Measured, CPU ms per call, 1 thread,
# load ~9, fresh output plain -> streaming (bitsandbytes): 256x4096 -> fp32 1.20 -> 0.80 (0.92), -> bf16
# 0.85 -> 0.74 (0.72); 1024x4096 -> fp32 2.73 -> 1.66 (2.32), -> bf16 1.78 -> 1.17 (1.49); 4096x4096 -> fp32
# without the huge-page advice 50 ms streaming vs 13 plain with it.
STREAM_BYTES = 2 << 20
_FRESH_STREAM_MAX_BYTES = 32 << 20


def set_stream_bytes(nbytes: int | None = STREAM_BYTES) -> None:
    """AVX-512 dequantize outputs of at least `nbytes` bytes (every `out=`, fresh ones below 32 MiB) use
    streaming (non-temporal) stores; None: never. For tests (0: every aligned output) and benchmarks."""
    lib = library()
    assert lib is not None, "call available() first"
    lib.nf4_set_stream_bytes(-1 if nbytes is None else nbytes)


def _threads(numel: int) -> int:
    return max(1, min(torch.get_num_threads(), numel // _MIN_ELEMENTS_PER_THREAD))


def fresh_output(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised (numel,) `dtype` CPU tensor as the kernels allocate their outputs: with the huge-page
    advice where `hugepage_advice` and its size call for it and the kernels are loaded (the benchmark's floor
    allocates through it)."""
    out = torch.empty(numel, dtype=dtype)
    lib = library()
    if (
        lib is not None
        and hugepage_advice
        and _HUGEPAGE_BYTES <= numel * dtype.itemsize <= _HUGEPAGE_MAX_BYTES
    ):
        lib.nf4_advise_hugepages(out.data_ptr(), numel * dtype.itemsize)
    return out


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def dequantize_nf4_cpu(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    numel: int,
    blocksize: int,
    dtype: torch.dtype,
    code: torch.Tensor,
    dq: DoubleQuantState | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(numel,) `dtype` on CPU; arguments already validated by `dequantize_4bit`. `dq` is given when `absmax`
    holds uint8 double-quantized codes; `out`, a contiguous (numel,) `dtype` tensor, is written instead of a
    fresh one. Called by the ops `shared_kernels::nf4_dequantize_cpu` and `nf4_dequantize_cpu_into`."""
    lib = library()
    assert lib is not None, "call available() first"
    packed = packed.reshape(-1).contiguous()
    code = code.float().contiguous()
    absmax = absmax.reshape(-1).contiguous()
    # Streaming stores only where the output is not freshly mapped: a given `out`, or a fresh one small
    # enough that glibc serves it from memory freed earlier (see _FRESH_STREAM_MAX_BYTES).
    # Exactly 32 MiB is mmapped too: 4096x4096 -> bf16 fresh, CPU ms, 1 thread, load 3.4, streaming -> plain:
    # 12.95 -> 9.15 with the huge-page advice, 27.2 -> 20.6 without (bitsandbytes 22.5 / 21.1).
    stream_ok = out is not None or numel * dtype.itemsize < _FRESH_STREAM_MAX_BYTES
    out = fresh_output(numel, dtype) if out is None else out
    if dq is None:
        absmax_f, qabsmax, absmax2, code2, offset, blocksize2 = absmax.float(), None, None, None, 0.0, 1
    else:
        absmax_f, qabsmax, blocksize2 = None, absmax, dq.blocksize2
        absmax2, code2, offset = (
            dq.absmax2.float().contiguous(),
            dq.code2.float().contiguous(),
            float(dq.offset),
        )

    lib.nf4_dequantize(
        _ptr(packed),
        _ptr(code),
        numel,
        blocksize,
        _ptr(absmax_f),
        _ptr(qabsmax),
        _ptr(absmax2),
        _ptr(code2),
        offset,
        blocksize2,
        _ptr(out),
        _OUT_KIND[dtype],
        int(stream_ok),
        _threads(numel),
    )
    return out


def quantize_nf4_full_blocks_cpu(
    x: torch.Tensor, blocksize: int, midpoints: torch.Tensor, order: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole blocks of flat CPU `x` (numel a multiple of `blocksize`): (packed uint8 (numel // 2,),
    absmax fp32 (numel // blocksize,)), as `quantize_4bit_ref` with the sorted code's (15,) `midpoints` and
    its (16,) uint8 sort `order`. Called by the `shared_kernels::nf4_quantize_cpu` op."""
    lib = library()
    assert lib is not None, "call available() first"
    if x.dtype == torch.float16:
        x = x.float()  # fp16 -> fp32 is exact; the kernel reads fp32 and bf16
    x = x.contiguous()
    numel = x.numel()
    n_blocks = numel // blocksize
    packed = fresh_output(numel // 2, torch.uint8)
    absmax = torch.empty(n_blocks, dtype=torch.float32)
    mids = midpoints.float().contiguous()
    order = order.to(torch.uint8).contiguous()
    lib.nf4_quantize_full_blocks(
        x.data_ptr(),
        0 if x.dtype == torch.float32 else 1,
        mids.data_ptr(),
        order.data_ptr(),
        blocksize,
        n_blocks,
        packed.data_ptr(),
        absmax.data_ptr(),
        _threads(numel),
    )
    return packed, absmax
