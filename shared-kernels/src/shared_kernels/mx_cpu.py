"""Native CPU kernels for the MX cast: the path `shared_kernels.mx_cast.mx_cast` takes for CPU tensors with
`backend="auto"`, through the custom op `shared_kernels::mx_cast_native` registered there (so `torch.compile`
sees one opaque op, no graph break). Bit for bit `mx_cast_ref` (tested on adversarial inputs on every
instruction-set path); the reference stays the specification (`backend="torch"`).

Why C: eager torch pays a dispatch per op (~45 us of fixed cost for the several ops of a cast at 256x256)
and its scalar fp32 -> E4M3 conversion dominates at 1024x1024. Here one pass per block of `block_size`
elements (the blocked dim contiguous: rows), or per `block_size` rows of a column strip (blocks along a
leading dim: columns, read row by row so every load is contiguous):
- the amax as the max of |x|'s fp32 bits in integers (any NaN's bits are above +inf's, so NaN wins, as
  torch's amax propagates it);
- scale byte, 2^-E and the saturation limit per block from the amax bits (the integer rule of
  `mx_scale_exponent_ref`: RCEIL or FLOOR, the inf byte 0xFE, the NaN byte 0xFF, the finite limit of the
  top bytes), computed for 64 blocks at a time;
- the element code of x * 2^-E rounded to nearest even (integer steps as in the Triton kernel's `_encode`
  in the portable loops; the fp32 adder in the AVX-512 path), every code of a NaN block the code torch
  gives a positive NaN.
Three paths picked at run time with `__builtin_cpu_supports` (`isa` caps it: tests run every path the CPU
has): AVX-512 (F, BW, VL, DQ) written with intrinsics (block maxima of 16 blocks reduced together in
registers, their scales computed as one vector; an 11-op encode per 16 elements; rows of 32-element
blocks and fp32 column casts store 64 codes at a time; rows prefetch the next 512 elements), and AVX2 and
baseline copies of plain loops that gcc vectorizes. On other architectures only the portable loops are built
(checked by compiling with -DMX_CPU_PORTABLE).
Inputs are read as fp32 or bf16 (fp16 is widened to fp32 first: exact). Work is shared by
`torch.get_num_threads()` pthreads claiming chunks from an atomic counter (as the NF4 kernels do).

Built on first use by `shared_kernels.native_build` (`$CC`, `$SHARED_KERNELS_CACHE`); without a compiler,
when the build or load fails, or with `SHARED_KERNELS_MX_CPU=0`, `available()` is False and `mx_cast` uses
the torch backend (one RuntimeWarning per process on failure).

The ops: `mx_cpu_op.cpp` gives `shared_kernels::mx_cast_cxx` and `mx_cast_rows_cols_cxx` C++ kernels that
allocate the outputs and call the C entry point directly, so a call (eager or from a compiled graph) never
enters Python. It is built against torch's headers with `$CXX` (default `c++`, C++20) on first use (~6 s)
and handed the C kernel's address and the element formats (`load_op`). Without it (`SHARED_KERNELS_MX_CXX=0`,
no C++ compiler or torch headers: one RuntimeWarning) the Python kernels of `shared_kernels::mx_cast_native`
/ `mx_cast_rows_cols_native` call the C entry point through ctypes instead (same bytes, more per-call cost).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch

from shared_kernels.native_build import NativeLibrary, compile_and_load

ISA_BASE, ISA_AVX2, ISA_AVX512 = 0, 1, 2
MODE_ROWS, MODE_COLUMNS, MODE_BOTH = 0, 1, 2
# Below this many elements per thread the thread start-up costs more than it saves.
_MIN_ELEMENTS_PER_THREAD = 1 << 18


def _declare(lib: ctypes.CDLL) -> None:
    P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.mx_cast.argtypes = [P, I32, I64, I64, I64, I32, I32, I32, I32, I32, I32, I32, F32, F32]
    lib.mx_cast.argtypes += [ctypes.c_uint32, I32, P, P, P, P, I32, I32]
    lib.mx_cast.restype = None
    lib.mx_best_isa.argtypes = []
    lib.mx_best_isa.restype = I32


_native = NativeLibrary("mx_cpu.c", "SHARED_KERNELS_MX_CPU", "MX CPU kernels", _declare)


def available() -> bool:
    return _native.get() is not None


def best_isa() -> int:
    """The widest instruction set this CPU gives the kernels (ISA_BASE / ISA_AVX2 / ISA_AVX512)."""
    lib = _native.get()
    assert lib is not None, "call available() first"
    return int(lib.mx_best_isa())


@functools.cache
def _element_format(elem_dtype: torch.dtype, emax: int) -> tuple[int, int, float, int, int]:
    """(mantissa bits, exponent bias, magic, its fp32 bits, the NaN code) of the element type; the magic
    2^(24 - bias - mbits) has the element's subnormal step as its fp32 ulp."""
    mbits = 3 if elem_dtype == torch.float8_e4m3fn else 2
    elem_bias = emax - 1 if elem_dtype == torch.float8_e4m3fn else emax  # E4M3FN reuses the top exponent
    magic = 2.0 ** (24 - elem_bias - mbits)
    magic_bits = int(torch.tensor(magic, dtype=torch.float32).view(torch.int32))
    nan_code = int(torch.tensor(float("nan")).to(elem_dtype).view(torch.uint8))  # the reference's NaN fill
    return mbits, elem_bias, magic, magic_bits, nan_code


class MXFormat(NamedTuple):
    """What a cast produces: element type with its max and emax (`mx_cast.ELEM_DTYPES`), the lowest scale
    byte that needs the finite saturation (`mx_cast._top_scale_byte`), block size and scale rule."""

    elem_dtype: torch.dtype
    max_pos: float
    emax: int
    top_byte: int
    block_size: int
    scale_mode: str


@functools.cache
def _format_args(fmt: MXFormat) -> tuple[int, int, int, int, int, float, float, int, int]:
    """The C entry point's arguments after `mode` that depend only on the format, computed once per format:
    a call's fixed cost is mostly cache misses once a large cast has evicted the interpreter's state (see
    `mx_cast_cpu`), so each Python step saved on the call path counts."""
    mbits, elem_bias, magic, magic_bits, nan_code = _element_format(fmt.elem_dtype, fmt.emax)
    rceil = int(fmt.scale_mode == "rceil")
    return fmt.emax, mbits, elem_bias, rceil, fmt.top_byte, fmt.max_pos, magic, magic_bits, nan_code


def _prepare(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float16:
        x = x.float()  # exact; the kernels read fp32 and bf16
    return x if x.is_contiguous() else x.contiguous()  # is_contiguous: no dispatcher call


def _launch(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    shape: tuple[int, int, int, int],
    fmt: MXFormat,
    outs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    isa: int,
) -> None:
    """One call of the C entry point: shape = (batch, m, n, mode), outs = (data, scale, data2, scale2)."""
    batch, m, n, mode = shape
    per_thread = x.numel() // _MIN_ELEMENTS_PER_THREAD
    threads = 1 if per_thread < 2 else min(torch.get_num_threads(), per_thread)  # small: no thread query
    lib.mx_cast(
        x.data_ptr(),
        0 if x.dtype == torch.float32 else 1,
        batch,
        m,
        n,
        fmt.block_size,
        mode,
        *_format_args(fmt),
        *(None if t is None else t.data_ptr() for t in outs),
        threads,
        isa,
    )


def mx_cast_cpu(
    x: torch.Tensor, fmt: MXFormat, dim: int, isa: int = ISA_AVX512, codes_dtype: torch.dtype = torch.uint8
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mx_cast_ref(x, fmt.elem_dtype, fmt.block_size, fmt.scale_mode, dim)` as (codes, uint8 scales) on
    CPU, the codes' bytes allocated as `codes_dtype` (uint8, or the element type: no view afterwards);
    arguments already validated by `mx_cast` (dim non-negative). Called by the op
    `shared_kernels::mx_cast_native`.

    A call's fixed cost grows several times once a large cast has streamed through the caches (a 32x32 cast:
    ~14 us CPU warm, ~70 us right after a 4 MB copy): the interpreter's, the dispatcher's and ctypes' state
    is then fetched from memory again. So this path keeps its Python steps few (the format's C arguments
    cached, no `.contiguous()` / `.view()` dispatch when not needed)."""
    lib = _native.get()
    assert lib is not None, "call available() first"
    x = _prepare(x)
    inner = x.shape[dim + 1 :].numel()
    outer = x.shape[:dim].numel()
    n = x.shape[dim]
    scale_shape = (*x.shape[:dim], -(-n // fmt.block_size), *x.shape[dim + 1 :])
    data = torch.empty(x.shape, dtype=codes_dtype)
    scale = torch.empty(scale_shape, dtype=torch.uint8)
    if x.numel():
        # blocks along a dim with elements after it: columns of (outer, n, inner); else rows of (outer, n)
        shape = (outer, n, inner, MODE_COLUMNS) if inner > 1 else (1, outer, n, MODE_ROWS)
        _launch(lib, x, shape, fmt, (data, scale, None, None), isa)
    return data, scale


def mx_cast_rows_cols_cpu(
    x: torch.Tensor, fmt: MXFormat, isa: int = ISA_AVX512, codes_dtype: torch.dtype = torch.uint8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both casts of a 2-D x (M, N) from one pass over it (each block-row of `block_size` rows cast along
    its rows, then along its columns, while in cache): (row codes, row scales, column codes, column
    scales), the codes as `codes_dtype`, as `mx_cast_cpu(x, fmt, 1)` and `mx_cast_cpu(x, fmt, 0)`. Called
    by the op `shared_kernels::mx_cast_rows_cols_native`."""
    lib = _native.get()
    assert lib is not None, "call available() first"
    x = _prepare(x)
    m, n = x.shape
    bs = fmt.block_size
    outs = (
        torch.empty((m, n), dtype=codes_dtype),
        torch.empty((m, -(-n // bs)), dtype=torch.uint8),
        torch.empty((m, n), dtype=codes_dtype),
        torch.empty((-(-m // bs), n), dtype=torch.uint8),
    )
    if x.numel():
        _launch(lib, x, (1, m, n, MODE_BOTH), fmt, outs, isa)
    return outs


# ------------------------------------------------------------------------------------------ the C++ ops


def _cxx_flags() -> list[str]:
    """Flags for `mx_cpu_op.cpp`: torch's headers and ABI, linked against its libraries (already loaded)."""
    root = Path(torch.__file__).parent
    lib = str(root / "lib")
    return [
        "-O2",
        "-shared",
        "-fPIC",
        "-std=c++20",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-DSHARED_KERNELS_TORCH_VERSION={torch.__version__}",  # in the cache key: rebuilt for a new torch
        f"-I{root / 'include'}",
        f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-L{lib}",
        f"-Wl,-rpath,{lib}",
        "-Wl,--no-as-needed",
        "-lc10",
        "-ltorch_cpu",
    ]


_op_lock = threading.Lock()
_op_state: dict[str, bool] = {}


def load_op(formats: Iterable[MXFormat]) -> bool:
    """Whether the C++ kernels of `shared_kernels::mx_cast_cxx` / `mx_cast_rows_cols_cxx` are loaded (built
    on first use) and configured with the C kernel and `formats` (every element type and rule the ops may
    be called with; the block size is a call argument). The first answer is kept for the process."""
    if "ok" in _op_state:
        return _op_state["ok"]
    with _op_lock:
        if "ok" not in _op_state:
            _op_state["ok"] = _build_and_configure_op(formats)
    return _op_state["ok"]


def op_available() -> bool:
    """Whether `load_op` has loaded the C++ ops (False before it is called)."""
    return _op_state.get("ok", False)


def _build_and_configure_op(formats: Iterable[MXFormat]) -> bool:
    lib = _native.get()
    if lib is None or os.environ.get("SHARED_KERNELS_MX_CXX", "1") == "0":
        return False
    try:
        compile_and_load("mx_cpu_op.cpp", _cxx_flags(), os.environ.get("CXX", "c++"))  # registers the kernels
    except Exception as exc:
        warnings.warn(
            f"MX CPU C++ op unavailable ({exc}); the native casts are called through ctypes (more per call)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    address = ctypes.cast(lib.mx_cast, ctypes.c_void_p).value
    torch.ops.shared_kernels.mx_cast_cxx_configure(address, _MIN_ELEMENTS_PER_THREAD, ISA_AVX512)
    for fmt in formats:
        torch.ops.shared_kernels.mx_cast_cxx_set_format(fmt.elem_dtype, fmt.scale_mode, *_format_args(fmt))
    return True
