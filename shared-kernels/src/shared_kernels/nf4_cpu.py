"""Native CPU kernels for 4-bit (NF4, FP4) quantize/dequantize: the fast path `shared_kernels.nf4` takes for CPU tensors
with `backend="auto"`. Bit for bit equal to the torch reference (`quantize_4bit_ref`, `dequantize_4bit_ref`)
and so to bitsandbytes' CPU backend; the reference stays the specification (`backend="torch"`).

Why C: the reference is memory-bound torch code that makes several passes (index, gather, scale, cast), and
`torch.compile` (inductor) emits a scalar, bounds-checked gather for the code lookup (measured 0.5x of
bitsandbytes' native kernel). Here, per block of `blocksize` elements:
- dequantize builds the 16 values `code[k] * scale` in fp32 (with double quantization the scale is first
  rebuilt as `code2[q] * absmax2[b // blocksize2] + offset`, two fp32 roundings, no FMA), rounds them once to
  the output dtype, then each byte is two table lookups (AVX2: `vpermps` on the 16-entry table, 8 bytes per
  step). Multiplying the code by the scale and rounding happen exactly as in the reference, per element;
- quantize takes the block's max |x| (NaN propagates), scales by the fp32 reciprocal and counts the fp32
  midpoints of the sorted code strictly below each value (ties to the lower code, NaN -> 15), then maps that
  position through the code's sort order (identity for NF4, see `shared_kernels.nf4`). The partial last block (divided,
  not multiplied) is left to the reference by the caller.
Work is shared by `torch.get_num_threads()` pthreads claiming chunks of blocks from an atomic counter (a
static split made a descheduled thread hold up half the call on the loaded test machine). A fresh output tensor is advised to use
transparent huge pages (`madvise`, outputs of 2-64 MiB): with 4 KiB pages, faulting in the output costs more than computing it.

The library is compiled on first use with the system C compiler (`$CC`, default `cc`; about 0.5-1 s once)
into `$SHARED_KERNELS_CACHE` (default `~/.cache/shared_kernels`), keyed by a hash of source and flags, and
loaded with ctypes (the GIL is released during calls). Without a compiler, or when compiling or loading fails,
or with `SHARED_KERNELS_NF4_CPU=0`, `available()` is False and callers use the torch reference (one
RuntimeWarning per process on failure).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from shared_kernels.nf4 import DoubleQuantState

_SOURCE = r"""
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

typedef struct {
    /* dequantize */
    const uint8_t* packed; const float* code; int64_t numel; int64_t blocksize;
    const float* absmax; const uint8_t* qabsmax; const float* absmax2; const float* code2; float offset;
    int64_t blocksize2; void* out; int out_kind;
    /* quantize */
    const void* x; int in_kind; const float* midpoints; const uint8_t* order; float* absmax_out;
    uint8_t* packed_out;
    /* blocks [0, n_blocks), claimed `chunk` at a time from the shared counter `next` */
    int64_t n_blocks, chunk;
    int64_t* next;
} nf4_job;

/* Claim the next chunk of blocks: [*b0, *b1). Dynamic claiming, not a static split, so a thread that the OS
   deschedules (a loaded machine) holds up one chunk, not half the work. */
static inline int claim(const nf4_job* a, int64_t* b0, int64_t* b1) {
    *b0 = __atomic_fetch_add(a->next, a->chunk, __ATOMIC_RELAXED);
    if (*b0 >= a->n_blocks) return 0;
    *b1 = *b0 + a->chunk < a->n_blocks ? *b0 + a->chunk : a->n_blocks;
    return 1;
}

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* fp32 -> bf16 bits, round to nearest even (c10::BFloat16's scalar rule; NaN -> 0x7FC0). */
static inline uint16_t to_bf16(float f) {
    uint32_t b = f2u(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

/* fp32 -> fp16 bits, round to nearest even, subnormals and overflow included (c10's
   fp16_ieee_from_fp32_value: the rounding is done by the fp32 adder, default rounding mode). */
static inline uint16_t to_fp16(float f) {
    const float scale_to_inf = u2f(0x77800000u), scale_to_zero = u2f(0x08800000u);
    float base = ((f < 0 ? -f : f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = f2u(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xff000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = u2f((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f2u(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007c00u) + (bits & 0x00000fffu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
}

__attribute__((target("avx2")))
static void lookup_f32_avx2(const uint8_t* p, int64_t nbytes, const float* t, float* o) {
    const __m256 tlo = _mm256_loadu_ps(t), thi = _mm256_loadu_ps(t + 8);
    const __m256i m15 = _mm256_set1_epi32(15);
    int64_t j = 0;
    for (; j + 8 <= nbytes; j += 8) {  /* 8 bytes -> 16 floats */
        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + j)));
        __m256i ih = _mm256_srli_epi32(b, 4), il = _mm256_and_si256(b, m15);
        /* permutevar uses the low 3 index bits; bit 3 (moved to the sign bit) picks the table half */
        __m256 vh = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, ih), _mm256_permutevar8x32_ps(thi, ih),
                                     _mm256_castsi256_ps(_mm256_slli_epi32(ih, 28)));
        __m256 vl = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, il), _mm256_permutevar8x32_ps(thi, il),
                                     _mm256_castsi256_ps(_mm256_slli_epi32(il, 28)));
        __m256 u0 = _mm256_unpacklo_ps(vh, vl), u1 = _mm256_unpackhi_ps(vh, vl);
        _mm256_storeu_ps(o + 2 * j, _mm256_permute2f128_ps(u0, u1, 0x20));
        _mm256_storeu_ps(o + 2 * j + 8, _mm256_permute2f128_ps(u0, u1, 0x31));
    }
    for (; j < nbytes; ++j) { o[2 * j] = t[p[j] >> 4]; o[2 * j + 1] = t[p[j] & 15]; }
}

__attribute__((target("avx2")))
static void lookup_16bit_avx2(const uint8_t* p, int64_t nbytes, const uint16_t* t16, uint16_t* o) {
    int32_t t32[16];
    for (int k = 0; k < 16; ++k) t32[k] = t16[k];
    const __m256 tlo = _mm256_loadu_ps((const float*)t32), thi = _mm256_loadu_ps((const float*)(t32 + 8));
    const __m256i m15 = _mm256_set1_epi32(15);
    int64_t j = 0;
    for (; j + 8 <= nbytes; j += 8) {  /* 8 bytes -> 8 uint32 = 16 halves, element 2i in the low half */
        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + j)));
        __m256i ih = _mm256_srli_epi32(b, 4), il = _mm256_and_si256(b, m15);
        __m256i vh = _mm256_castps_si256(_mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, ih),
            _mm256_permutevar8x32_ps(thi, ih), _mm256_castsi256_ps(_mm256_slli_epi32(ih, 28))));
        __m256i vl = _mm256_castps_si256(_mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, il),
            _mm256_permutevar8x32_ps(thi, il), _mm256_castsi256_ps(_mm256_slli_epi32(il, 28))));
        _mm256_storeu_si256((__m256i*)(o + 2 * j), _mm256_or_si256(vh, _mm256_slli_epi32(vl, 16)));
    }
    for (; j < nbytes; ++j) { o[2 * j] = t16[p[j] >> 4]; o[2 * j + 1] = t16[p[j] & 15]; }
}

static void* dequantize_blocks(void* arg) {
    const nf4_job* a = (const nf4_job*)arg;
    const int avx2 = __builtin_cpu_supports("avx2");
    int64_t b0, b1;
    while (claim(a, &b0, &b1)) for (int64_t b = b0; b < b1; ++b) {
        float scale;
        if (a->qabsmax) {
            scale = a->code2[a->qabsmax[b]] * a->absmax2[b / a->blocksize2];  /* rounded, then + offset */
            scale = scale + a->offset;
        } else {
            scale = a->absmax[b];
        }
        const int64_t e0 = b * a->blocksize;
        const int64_t n = a->numel - e0 < a->blocksize ? a->numel - e0 : a->blocksize;
        const int64_t nb = n / 2;  /* whole bytes; an odd n ends with a lone high nibble */
        const uint8_t* p = a->packed + e0 / 2;
        float t[16];
        for (int k = 0; k < 16; ++k) t[k] = a->code[k] * scale;
        if (a->out_kind == 0) {
            float* o = (float*)a->out + e0;
            if (avx2) lookup_f32_avx2(p, nb, t, o);
            else for (int64_t j = 0; j < nb; ++j) { o[2 * j] = t[p[j] >> 4]; o[2 * j + 1] = t[p[j] & 15]; }
            if (n & 1) o[n - 1] = t[p[nb] >> 4];
        } else {
            uint16_t t16[16];
            for (int k = 0; k < 16; ++k) t16[k] = a->out_kind == 1 ? to_bf16(t[k]) : to_fp16(t[k]);
            uint16_t* o = (uint16_t*)a->out + e0;
            if (avx2) lookup_16bit_avx2(p, nb, t16, o);
            else for (int64_t j = 0; j < nb; ++j) { o[2 * j] = t16[p[j] >> 4]; o[2 * j + 1] = t16[p[j] & 15]; }
            if (n & 1) o[n - 1] = t16[p[nb] >> 4];
        }
    }
    return 0;
}

static void* quantize_blocks(void* arg) {
    const nf4_job* a = (const nf4_job*)arg;
    const int64_t bs = a->blocksize;
    float m[15], buf[4096];
    uint8_t order[16];
    for (int k = 0; k < 15; ++k) m[k] = a->midpoints[k];
    for (int k = 0; k < 16; ++k) order[k] = a->order[k];
    int64_t b0, b1;
    while (claim(a, &b0, &b1)) for (int64_t b = b0; b < b1; ++b) {
        const int64_t e0 = b * bs;
        if (a->in_kind == 0) {
            memcpy(buf, (const float*)a->x + e0, bs * sizeof(float));
        } else {  /* bf16 -> fp32 is exact: the bits move up */
            const uint16_t* xb = (const uint16_t*)a->x + e0;
            for (int64_t i = 0; i < bs; ++i) buf[i] = u2f((uint32_t)xb[i] << 16);
        }
        float amax = 0.0f;
        int has_nan = 0;
        for (int64_t i = 0; i < bs; ++i) {
            const float v = u2f(f2u(buf[i]) & 0x7fffffffu);
            has_nan |= v != v;
            amax = v > amax ? v : amax;
        }
        if (has_nan) amax = u2f(0x7fc00000u);  /* torch's abs().amax() gives the default quiet NaN */
        a->absmax_out[b] = amax;
        const float d = amax < 1e-38f ? 1e-38f : amax;  /* clamp(min=1e-38): NaN stays NaN */
        const float recip = 1.0f / d;
        uint8_t* p = a->packed_out + e0 / 2;
        for (int64_t j = 0; j < bs / 2; ++j) {
            const float s0 = buf[2 * j] * recip, s1 = buf[2 * j + 1] * recip;
            int q0 = 0, q1 = 0;
            for (int k = 0; k < 15; ++k) { q0 += s0 > m[k]; q1 += s1 > m[k]; }
            if (s0 != s0) q0 = 15;
            if (s1 != s1) q1 = 15;
            p[j] = (uint8_t)((order[q0] << 4) | order[q1]);
        }
    }
    return 0;
}

/* Run fn over blocks [0, n_blocks) on n_threads threads (this one included), ~16K elements per claim. */
static void run_parallel(void* (*fn)(void*), nf4_job job, int64_t n_blocks, int n_threads) {
    int64_t next = 0;
    job.n_blocks = n_blocks;
    job.chunk = (16384 + job.blocksize - 1) / job.blocksize;
    job.next = &next;
    if (n_threads > 64) n_threads = 64;
    pthread_t threads[64];
    int started[64] = {0};
    for (int i = 1; i < n_threads; ++i) started[i] = pthread_create(&threads[i], 0, fn, &job) == 0;
    fn(&job);  /* if a thread failed to start, the others claim its share */
    for (int i = 1; i < n_threads; ++i)
        if (started[i]) pthread_join(threads[i], 0);
}

void nf4_dequantize(const uint8_t* packed, const float* code, int64_t numel, int64_t blocksize,
                    const float* absmax, const uint8_t* qabsmax, const float* absmax2, const float* code2,
                    float offset, int64_t blocksize2, void* out, int out_kind, int n_threads) {
    nf4_job job;
    memset(&job, 0, sizeof job);
    job.packed = packed; job.code = code; job.numel = numel; job.blocksize = blocksize; job.absmax = absmax;
    job.qabsmax = qabsmax; job.absmax2 = absmax2; job.code2 = code2; job.offset = offset;
    job.blocksize2 = blocksize2; job.out = out; job.out_kind = out_kind;
    run_parallel(dequantize_blocks, job, (numel + blocksize - 1) / blocksize, n_threads);
}

void nf4_quantize_full_blocks(const void* x, int in_kind, const float* midpoints, const uint8_t* order,
                              int64_t blocksize, int64_t n_blocks, uint8_t* packed, float* absmax, int n_threads) {
    nf4_job job;
    memset(&job, 0, sizeof job);
    job.x = x; job.in_kind = in_kind; job.midpoints = midpoints; job.order = order; job.blocksize = blocksize;
    job.packed_out = packed; job.absmax_out = absmax;
    run_parallel(quantize_blocks, job, n_blocks, n_threads);
}

/* Ask for transparent huge pages on the page-aligned interior of a fresh buffer (no-op where THP is off). */
void nf4_advise_hugepages(void* p, int64_t nbytes) {
#ifdef MADV_HUGEPAGE
    uintptr_t a = ((uintptr_t)p + 4095) & ~(uintptr_t)4095, e = ((uintptr_t)p + nbytes) & ~(uintptr_t)4095;
    if (e > a) madvise((void*)a, e - a, MADV_HUGEPAGE);
#endif
}
"""

# No -ffast-math and no FMA contraction: every product and sum must round exactly as the torch reference.
_CFLAGS = ["-O3", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-fast-math"]
_OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Below this many elements the thread start-up costs more than it saves.
_MIN_ELEMENTS_PER_THREAD = 1 << 17
# Fresh outputs from one 2 MiB page up to 64 MiB get the huge-page advice. Above that, on the (VM) test machine,
# every other call stalled for 0.4-1.2 s in the kernel (fp32 11008x4096, 180 MB: 0.4x of bitsandbytes), while
# up to 64 MiB the advice was a steady 3x win (4096x4096 fp32: 40 ms vs 140 ms without, 210 ms bitsandbytes).
_HUGEPAGE_BYTES = 1 << 21
_HUGEPAGE_MAX_BYTES = 64 << 20

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed = False


def _compile(path: Path) -> None:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not found)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src = Path(tmp) / "nf4_cpu.c"
        src.write_text(_SOURCE)
        out = Path(tmp) / path.name
        proc = subprocess.run([cc, *_CFLAGS, str(src), "-o", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(out, path)  # atomic: concurrent processes (pytest-xdist) never load a partial file


def _load() -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([_SOURCE, cc, *_CFLAGS, os.uname().machine]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("SHARED_KERNELS_CACHE", Path.home() / ".cache" / "shared_kernels"))
    path = cache / f"nf4_cpu_{key}.so"
    if not path.exists():
        _compile(path)
    lib = ctypes.CDLL(str(path))
    P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.nf4_dequantize.argtypes = [P, P, I64, I64, P, P, P, P, ctypes.c_float, I64, P, I32, I32]
    lib.nf4_dequantize.restype = None
    lib.nf4_quantize_full_blocks.argtypes = [P, I32, P, P, I64, I64, P, P, I32]
    lib.nf4_quantize_full_blocks.restype = None
    lib.nf4_advise_hugepages.argtypes = [P, I64]
    lib.nf4_advise_hugepages.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels, compiling them on first use; None when disabled or unavailable."""
    global _lib, _failed
    if _lib is not None or _failed:
        return _lib
    if os.environ.get("SHARED_KERNELS_NF4_CPU", "1") == "0":
        return None
    with _lock:
        if _lib is None and not _failed:
            try:
                _lib = _load()
            except Exception as exc:  # noqa: BLE001 - any failure means: use the torch reference
                _failed = True
                warnings.warn(
                    f"NF4 CPU kernels unavailable ({exc}); using the torch reference (slower)",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _lib


def available() -> bool:
    return library() is not None


def _threads(numel: int) -> int:
    return max(1, min(torch.get_num_threads(), numel // _MIN_ELEMENTS_PER_THREAD))


def _empty(numel: int, dtype: torch.dtype, lib: ctypes.CDLL) -> torch.Tensor:
    out = torch.empty(numel, dtype=dtype)
    if _HUGEPAGE_BYTES <= numel * dtype.itemsize <= _HUGEPAGE_MAX_BYTES:
        lib.nf4_advise_hugepages(out.data_ptr(), numel * dtype.itemsize)
    return out


def dequantize_nf4_cpu(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    numel: int,
    blocksize: int,
    dtype: torch.dtype,
    code: torch.Tensor,
    dq: DoubleQuantState | None = None,
) -> torch.Tensor:
    """(numel,) `dtype` on CPU; arguments already validated by `dequantize_4bit`. `dq` is given when `absmax`
    holds uint8 double-quantized codes."""
    lib = library()
    assert lib is not None, "call available() first"
    packed = packed.reshape(-1).contiguous()
    code = code.float().contiguous()
    absmax = absmax.reshape(-1).contiguous()
    out = _empty(numel, dtype, lib)
    if dq is None:
        absmax_f, qabsmax, absmax2, code2, offset, blocksize2 = absmax.float(), None, None, None, 0.0, 1
    else:
        absmax_f, qabsmax, blocksize2 = None, absmax, dq.blocksize2
        absmax2, code2, offset = (
            dq.absmax2.float().contiguous(),
            dq.code2.float().contiguous(),
            float(dq.offset),
        )

    def ptr(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    lib.nf4_dequantize(
        ptr(packed),
        ptr(code),
        numel,
        blocksize,
        ptr(absmax_f),
        ptr(qabsmax),
        ptr(absmax2),
        ptr(code2),
        offset,
        blocksize2,
        ptr(out),
        _OUT_KIND[dtype],
        _threads(numel),
    )
    return out


def quantize_nf4_full_blocks_cpu(
    x: torch.Tensor, blocksize: int, midpoints: torch.Tensor, order: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole blocks of flat CPU `x` (numel a multiple of `blocksize`): (packed uint8 (numel // 2,),
    absmax fp32 (numel // blocksize,)), as `quantize_4bit_ref` with the sorted code's (15,) `midpoints` and
    its (16,) uint8 sort `order`."""
    lib = library()
    assert lib is not None, "call available() first"
    if x.dtype == torch.float16:
        x = x.float()  # fp16 -> fp32 is exact; the kernel reads fp32 and bf16
    x = x.contiguous()
    numel = x.numel()
    n_blocks = numel // blocksize
    packed = _empty(numel // 2, torch.uint8, lib)
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
