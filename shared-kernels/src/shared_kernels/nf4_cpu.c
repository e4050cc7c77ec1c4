/* Native CPU kernels for blockwise 4-bit (NF4, FP4) quantize/dequantize, loaded by shared_kernels/nf4_cpu.py
   (which documents the algorithm and the build). Every product and sum rounds exactly as the torch reference
   in shared_kernels/nf4.py: compiled without -ffast-math and without FMA contraction. */
/* The AVX2 / AVX-512 paths need x86 (and can be left out to build and test the generic one there:
   -DNF4_CPU_GENERIC). */
#if (defined(__x86_64__) || defined(__i386__)) && !defined(NF4_CPU_GENERIC)
#define NF4_X86 1
#include <immintrin.h>
#endif
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

typedef struct {
    /* dequantize */
    const uint8_t* packed; const float* code; int64_t numel; int64_t blocksize;
    const float* absmax; const uint8_t* qabsmax; const float* absmax2; const float* code2; float offset;
    int64_t blocksize2; void* out; int out_kind; int isa; int stream;
    /* quantize */
    const void* x; int in_kind; const float* midpoints; const uint8_t* order; float* absmax_out;
    uint8_t* packed_out;
    /* blocks [0, n_blocks), claimed `chunk` at a time from the shared counter `next`; `done` counts the
       blocks finished (see run_parallel) */
    int64_t n_blocks, chunk;
    int64_t* next;
    int64_t* done;
} nf4_job;

/* Claim the next chunk of blocks: [*b0, *b1). Dynamic claiming, not a static split, so a thread that the OS
   deschedules (a loaded machine) holds up one chunk, not half the work. */
static inline int claim(const nf4_job* a, int64_t* b0, int64_t* b1) {
    *b0 = __atomic_fetch_add(a->next, a->chunk, __ATOMIC_RELAXED);
    if (*b0 >= a->n_blocks) return 0;
    *b1 = *b0 + a->chunk < a->n_blocks ? *b0 + a->chunk : a->n_blocks;
    return 1;
}

/* Blocks [b0, b1) are written (release: the caller that sees `done` complete sees the outputs). */
static inline void finished(const nf4_job* a, int64_t b0, int64_t b1) {
    __atomic_fetch_add(a->done, b1 - b0, __ATOMIC_RELEASE);
}

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* fp32 -> bf16 bits, round to nearest even, subnormals kept; NaN -> 0xFFFF, as torch's `.to(torch.bfloat16)`
   gives on x86 (its vectorised cast; c10's scalar rule gives 0x7FC0). */
static inline uint16_t to_bf16(float f) {
    uint32_t b = f2u(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return 0xffff;
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

#ifdef NF4_X86
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
#endif

/* The block's scale: absmax[b], or with double quantization code2[q] * absmax2[b / blocksize2] rounded, then
   + offset rounded (two fp32 roundings, no FMA), as the reference. */
static inline float block_scale(const nf4_job* a, int64_t b) {
    if (!a->qabsmax) return a->absmax[b];
    const float s = a->code2[a->qabsmax[b]] * a->absmax2[b / a->blocksize2];
    return s + a->offset;
}

/* Blocks [b0, b1) with 16-entry tables in memory: AVX2 lookups (avx2 != 0) or scalar ones. */
static void dequantize_range_table(const nf4_job* a, int64_t b0, int64_t b1, int avx2) {
    for (int64_t b = b0; b < b1; ++b) {
        const float scale = block_scale(a, b);
        const int64_t e0 = b * a->blocksize;
        const int64_t n = a->numel - e0 < a->blocksize ? a->numel - e0 : a->blocksize;
        const int64_t nb = n / 2;  /* whole bytes; an odd n ends with a lone high nibble */
        const uint8_t* p = a->packed + e0 / 2;
        float t[16];
        for (int k = 0; k < 16; ++k) t[k] = a->code[k] * scale;
        if (a->out_kind == 0) {
            float* o = (float*)a->out + e0;
#ifdef NF4_X86
            if (avx2) lookup_f32_avx2(p, nb, t, o); else
#endif
            for (int64_t j = 0; j < nb; ++j) { o[2 * j] = t[p[j] >> 4]; o[2 * j + 1] = t[p[j] & 15]; }
            if (n & 1) o[n - 1] = t[p[nb] >> 4];
        } else {
            uint16_t t16[16];
            for (int k = 0; k < 16; ++k) t16[k] = a->out_kind == 1 ? to_bf16(t[k]) : to_fp16(t[k]);
            uint16_t* o = (uint16_t*)a->out + e0;
#ifdef NF4_X86
            if (avx2) lookup_16bit_avx2(p, nb, t16, o); else
#endif
            for (int64_t j = 0; j < nb; ++j) { o[2 * j] = t16[p[j] >> 4]; o[2 * j + 1] = t16[p[j] & 15]; }
            if (n & 1) o[n - 1] = t16[p[nb] >> 4];
        }
    }
}

#ifdef NF4_X86
#define NF4_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

/* 16 fp32 -> bf16 bits in the low half of each 32-bit lane: to_bf16, vectorised (integer RNE, subnormals kept;
   not VCVTNEPS2BF16, which flushes subnormal inputs to zero). */
NF4_AVX512 static inline __m512i bf16_bits_avx512(__m512 t) {
    const __m512i b = _mm512_castps_si512(t);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, bias), 16);
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(t, t, _CMP_UNORD_Q), _mm512_set1_epi32(0xffff));
}

/* The block's 16 values rounded to 16 bits, repeated in both halves of a 32-word table: VPERMW reads 5 index
   bits, so an index whose bit 4 is set (a byte's high nibble left above its low one) still finds entry i & 15.
   fp16 by VCVTPS2PH, round to nearest even: the instruction torch's own cast uses. */
NF4_AVX512 static inline __m512i table16_avx512(__m512 t, int out_kind) {
    const __m256i h = out_kind == 1 ? _mm512_cvtepi32_epi16(bf16_bits_avx512(t))
                                    : _mm512_cvtps_ph(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1);
}

/* Whole 8-byte steps of nbytes bytes -> fp32 (returns the bytes done): each byte zero-extended into a 64-bit
   lane whose low 32 bits get the high nibble (b >> 4) and whose high 32 bits the byte itself (VPERMPS reads its
   low 4 bits, the low nibble): 16 indices in output order, one VPERMPS on the 16-entry table. */
NF4_AVX512 static inline int64_t lookup_f32_avx512(const uint8_t* p, int64_t nbytes, __m512 t, float* o,
                                                   int stream) {
    int64_t j = 0;
    for (; j + 8 <= nbytes; j += 8) {
        const __m512i v = _mm512_cvtepu8_epi64(_mm_loadl_epi64((const __m128i*)(p + j)));
        const __m512i idx = _mm512_or_si512(_mm512_srli_epi64(v, 4), _mm512_slli_epi64(v, 32));
        if (stream) _mm512_stream_ps(o + 2 * j, _mm512_permutexvar_ps(idx, t));
        else _mm512_storeu_ps(o + 2 * j, _mm512_permutexvar_ps(idx, t));
    }
    return j;
}

/* Whole 16-byte steps -> 16-bit values (returns the bytes done): bytes into 32-bit lanes, (b >> 4) | b << 16
   puts the high nibble's index in the low word and the byte (low nibble + the high one above it) in the high
   word; one VPERMW per 32 outputs. */
NF4_AVX512 static inline int64_t lookup_16bit_avx512(const uint8_t* p, int64_t nbytes, __m512i t, uint16_t* o,
                                                     int stream) {
    int64_t j = 0;
    for (; j + 16 <= nbytes; j += 16) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + j)));
        const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(v, 4), _mm512_slli_epi32(v, 16));
        if (stream) _mm512_stream_si512((void*)(o + 2 * j), _mm512_permutexvar_epi16(idx, t));
        else _mm512_storeu_si512((void*)(o + 2 * j), _mm512_permutexvar_epi16(idx, t));
    }
    return j;
}

/* Blocks [b0, b1), AVX-512: the block's table is code * scale in one vector multiply (the same fp32 products as
   the reference), rounded in one vector conversion for 16-bit outputs. A partial last block ends in scalar
   lookups (bytes past the last whole step, a lone high nibble). */
NF4_AVX512 static void dequantize_range_avx512(const nf4_job* a, int64_t b0, int64_t b1) {
    const __m512 code = _mm512_loadu_ps(a->code);
    for (int64_t b = b0; b < b1; ++b) {
        const __m512 t = _mm512_mul_ps(code, _mm512_set1_ps(block_scale(a, b)));
        const int64_t e0 = b * a->blocksize;
        const int64_t n = a->numel - e0 < a->blocksize ? a->numel - e0 : a->blocksize;
        const int64_t nb = n / 2;
        const uint8_t* p = a->packed + e0 / 2;
        if (a->out_kind == 0) {
            float* o = (float*)a->out + e0;
            int64_t j = lookup_f32_avx512(p, nb, t, o, a->stream);
            if (j == nb && !(n & 1)) continue;
            float tt[16];
            _mm512_storeu_ps(tt, t);
            for (; j < nb; ++j) { o[2 * j] = tt[p[j] >> 4]; o[2 * j + 1] = tt[p[j] & 15]; }
            if (n & 1) o[n - 1] = tt[p[nb] >> 4];
        } else {
            const __m512i t16 = table16_avx512(t, a->out_kind);
            uint16_t* o = (uint16_t*)a->out + e0;
            int64_t j = lookup_16bit_avx512(p, nb, t16, o, a->stream);
            if (j == nb && !(n & 1)) continue;
            uint16_t tt[32];
            _mm512_storeu_si512((void*)tt, t16);
            for (; j < nb; ++j) { o[2 * j] = tt[p[j] >> 4]; o[2 * j + 1] = tt[p[j] & 15]; }
            if (n & 1) o[n - 1] = tt[p[nb] >> 4];
        }
    }
}
#endif

/* The dequantize kernel's instruction set: NF4_SCALAR, NF4_AVX2 or NF4_AVX512F (F + BW), the best this CPU
   has unless nf4_select_isa asked for a lower one (the tests run every path on one machine). */
enum { NF4_SCALAR = 0, NF4_AVX2 = 1, NF4_AVX512F = 2 };
static int g_isa = -1;

static int best_isa(void) {
#ifdef NF4_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return NF4_AVX512F;
    if (__builtin_cpu_supports("avx2")) return NF4_AVX2;
#endif
    return NF4_SCALAR;
}

/* Use instruction set `want` (or the best available when want < 0 or above it); returns the one in use. */
int nf4_select_isa(int want) {
    const int best = best_isa();
    g_isa = want < 0 || want > best ? best : want;
    return g_isa;
}

int nf4_isa(void) { return g_isa < 0 ? nf4_select_isa(-1) : g_isa; }

/* Outputs from 2 MiB (a core's L2) that the caller marks `stream_ok` (memory not freshly mapped: see
   nf4_cpu.py) get streaming stores. CPU time per call at load 7-10, AVX-512, 1 thread: 4096x4096 -> fp32
   into a reused buffer 9.8 ms plain, 3.4 ms streaming (-> bf16 3.0 vs 2.2); 256x4096 -> fp32 (4 MiB) after
   a gc.collect() (cold caches, as in the bench and between layers) 1.02 vs 0.68 ms, -> bf16 0.66 vs 0.50,
   though 3-30% slower when called in a loop (the output in cache). Freshly mapped memory is different: each
   page fault zeroes the page into the cache just before the kernel writes it (QLoRA layer step 11008x4096
   fp32 with fresh W: 421 ms CPU plain, 516 streaming). */
static int64_t g_stream_bytes = 2 << 20;

/* Outputs of at least `nbytes` bytes marked stream_ok get streaming stores (AVX-512 path; -1: never). */
void nf4_set_stream_bytes(int64_t nbytes) { g_stream_bytes = nbytes; }

static void* dequantize_blocks(void* arg) {
    const nf4_job* a = (const nf4_job*)arg;
    int64_t b0, b1;
    while (claim(a, &b0, &b1)) {
#ifdef NF4_X86
        if (a->isa == NF4_AVX512F) {
            dequantize_range_avx512(a, b0, b1);
            if (a->stream) _mm_sfence();  /* streaming stores are weakly ordered: visible before `done` */
            finished(a, b0, b1);
            continue;
        }
#endif
        dequantize_range_table(a, b0, b1, a->isa == NF4_AVX2);
        finished(a, b0, b1);
    }
    return 0;
}

/* Block b: absmax and packed codes. */
static void quantize_block(const nf4_job* a, int64_t b, const float* m, const uint8_t* order, float* buf) {
    const int64_t bs = a->blocksize;
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

#ifdef NF4_X86
/* 16 input elements from e as fp32 (bf16 -> fp32 is exact: the bits move up). */
NF4_AVX512 static inline __m512 load16_avx512(const nf4_job* a, int64_t e) {
    if (a->in_kind == 0) return _mm512_loadu_ps((const float*)a->x + e);
    const __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)a->x + e));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Block b, AVX-512, 16 elements at a time (blocksize a multiple of 16): quantize_block's rule with the same
   fp32 products and comparisons. The 16 positions go through the sort order (VPERMD) and pairs of 32-bit
   lanes become bytes: in each 64-bit lane (even | odd << 32), (lane << 4) | (lane >> 32) has the byte in its
   low 8 bits, which VPMOVQB keeps. */
NF4_AVX512 static void quantize_block_avx512(const nf4_job* a, int64_t b, const __m512* m, __m512i order) {
    const int64_t bs = a->blocksize, e0 = b * bs;
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t i = 0; i < bs; i += 16) {
        const __m512 v = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(load16_avx512(a, e0 + i)),
                                                              abs_mask));
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        vmax = _mm512_max_ps(vmax, v);
    }
    const float amax = nan ? u2f(0x7fc00000u) : _mm512_reduce_max_ps(vmax);
    a->absmax_out[b] = amax;
    const float d = amax < 1e-38f ? 1e-38f : amax;
    const __m512 recip = _mm512_set1_ps(1.0f / d);
    const __m512i one = _mm512_set1_epi32(1);
    uint8_t* p = a->packed_out + e0 / 2;
    for (int64_t i = 0; i < bs; i += 16) {
        const __m512 sc = _mm512_mul_ps(load16_avx512(a, e0 + i), recip);
        __m512i q = _mm512_setzero_si512();
        for (int k = 0; k < 15; ++k) q = _mm512_mask_add_epi32(q, _mm512_cmp_ps_mask(sc, m[k], _CMP_GT_OQ), q, one);
        q = _mm512_mask_mov_epi32(q, _mm512_cmp_ps_mask(sc, sc, _CMP_UNORD_Q), _mm512_set1_epi32(15));
        q = _mm512_permutexvar_epi32(q, order);
        const __m512i pairs = _mm512_or_si512(_mm512_slli_epi64(q, 4), _mm512_srli_epi64(q, 32));
        _mm_storel_epi64((__m128i*)(p + i / 2), _mm512_cvtepi64_epi8(pairs));
    }
}

NF4_AVX512 static void quantize_range_avx512(const nf4_job* a, int64_t b0, int64_t b1) {
    __m512 m[15];
    for (int k = 0; k < 15; ++k) m[k] = _mm512_set1_ps(a->midpoints[k]);
    const __m512i order = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)a->order));
    for (int64_t b = b0; b < b1; ++b) quantize_block_avx512(a, b, m, order);
}
#endif

static void* quantize_blocks(void* arg) {
    const nf4_job* a = (const nf4_job*)arg;
    float m[15], buf[4096];
    uint8_t order[16];
    for (int k = 0; k < 15; ++k) m[k] = a->midpoints[k];
    for (int k = 0; k < 16; ++k) order[k] = a->order[k];
    int64_t b0, b1;
    while (claim(a, &b0, &b1)) {
#ifdef NF4_X86
        if (a->isa == NF4_AVX512F && a->blocksize % 16 == 0) quantize_range_avx512(a, b0, b1); else
#endif
        for (int64_t b = b0; b < b1; ++b) quantize_block(a, b, m, order, buf);
        finished(a, b0, b1);
    }
    return 0;
}

/* One call's job and counters, shared by its threads; the last thread to let go frees it. */
typedef struct {
    nf4_job job;
    void* (*fn)(void*);
    int64_t next, done;
    int refs;
} nf4_shared;

static void release(nf4_shared* s) {
    if (__atomic_sub_fetch(&s->refs, 1, __ATOMIC_ACQ_REL) == 0) free(s);
}

static void* helper(void* arg) {
    nf4_shared* s = (nf4_shared*)arg;
    s->fn(&s->job);
    release(s);
    return 0;
}

/* Run fn over blocks [0, n_blocks) on n_threads threads (this one included), ~16K elements per claim. The
   helpers are detached and the caller waits for the blocks, not for the threads: a helper that the OS starts
   late (a loaded machine) finds nothing left to claim and costs the call nothing; the caller waits only for
   chunks a helper has claimed. */
static void run_parallel(void* (*fn)(void*), nf4_job job, int64_t n_blocks, int n_threads) {
    job.n_blocks = n_blocks;
    job.chunk = (16384 + job.blocksize - 1) / job.blocksize;
    if (n_threads > 64) n_threads = 64;
    nf4_shared* s = n_threads > 1 ? (nf4_shared*)malloc(sizeof *s) : 0;
    if (!s) {  /* one thread (or no memory for sharing): all on this one */
        int64_t next = 0, done = 0;
        job.next = &next; job.done = &done;
        fn(&job);
        return;
    }
    s->job = job; s->fn = fn; s->next = 0; s->done = 0; s->refs = 1;
    s->job.next = &s->next; s->job.done = &s->done;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int i = 1; i < n_threads; ++i) {
        pthread_t t;
        __atomic_add_fetch(&s->refs, 1, __ATOMIC_RELAXED);
        if (pthread_create(&t, &attr, helper, s) != 0) release(s);  /* the others claim its share */
    }
    pthread_attr_destroy(&attr);
    fn(&s->job);
    while (__atomic_load_n(&s->done, __ATOMIC_ACQUIRE) < n_blocks) sched_yield();
    release(s);
}

void nf4_dequantize(const uint8_t* packed, const float* code, int64_t numel, int64_t blocksize,
                    const float* absmax, const uint8_t* qabsmax, const float* absmax2, const float* code2,
                    float offset, int64_t blocksize2, void* out, int out_kind, int stream_ok, int n_threads) {
    nf4_job job;
    memset(&job, 0, sizeof job);
    job.packed = packed; job.code = code; job.numel = numel; job.blocksize = blocksize; job.absmax = absmax;
    job.qabsmax = qabsmax; job.absmax2 = absmax2; job.code2 = code2; job.offset = offset;
    job.blocksize2 = blocksize2; job.out = out; job.out_kind = out_kind;
    job.isa = nf4_isa();
    /* Streaming (non-temporal) stores from g_stream_bytes: no read of each output line before it is
       written; only where every block starts on 64 bytes. */
    const int64_t out_bytes = numel * (out_kind == 0 ? 4 : 2);
    job.stream = stream_ok && g_stream_bytes >= 0 && out_bytes >= g_stream_bytes && ((uintptr_t)out & 63) == 0
                 && (blocksize * (out_kind == 0 ? 4 : 2)) % 64 == 0;
    run_parallel(dequantize_blocks, job, (numel + blocksize - 1) / blocksize, n_threads);
}

void nf4_quantize_full_blocks(const void* x, int in_kind, const float* midpoints, const uint8_t* order,
                              int64_t blocksize, int64_t n_blocks, uint8_t* packed, float* absmax,
                              int n_threads) {
    nf4_job job;
    memset(&job, 0, sizeof job);
    job.x = x; job.in_kind = in_kind; job.midpoints = midpoints; job.order = order; job.blocksize = blocksize;
    job.packed_out = packed; job.absmax_out = absmax;
    job.isa = nf4_isa();
    run_parallel(quantize_blocks, job, n_blocks, n_threads);
}

/* Ask for transparent huge pages on the page-aligned interior of a fresh buffer (no-op where THP is off). */
void nf4_advise_hugepages(void* p, int64_t nbytes) {
#ifdef MADV_HUGEPAGE
    uintptr_t a = ((uintptr_t)p + 4095) & ~(uintptr_t)4095, e = ((uintptr_t)p + nbytes) & ~(uintptr_t)4095;
    if (e > a) madvise((void*)a, e - a, MADV_HUGEPAGE);
#endif
}
