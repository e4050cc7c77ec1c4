/* Native CPU kernels for blockwise 4-bit (NF4, FP4) quantize/dequantize, loaded by shared_kernels/nf4_cpu.py
   (which documents the algorithm and the build). Every product and sum rounds exactly as the torch reference
   in shared_kernels/nf4.py: compiled without -ffast-math and without FMA contraction. */
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
            else for (int64_t j = 0; j < nb; ++j) {
                o[2 * j] = t16[p[j] >> 4];
                o[2 * j + 1] = t16[p[j] & 15];
            }
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
                              int64_t blocksize, int64_t n_blocks, uint8_t* packed, float* absmax,
                              int n_threads) {
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
