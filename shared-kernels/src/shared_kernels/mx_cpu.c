/* Native CPU MX casts (E8M0 block scales, E4M3 / E5M2 codes), loaded by shared_kernels/mx_cpu.py, which
   documents the algorithm and the build. Bit for bit `mx_cast_ref` in shared_kernels/mx_cast.py: the scale
   byte comes from the integer rule on the amax bits, x * 2^-E is one fp32 product (exact unless it lands
   in fp32's subnormals, where it rounds as torch's does), and the element code is rounded to nearest even:
   in integers in the portable loops (the same steps as the Triton kernel's `_encode`), by the fp32 adder in
   the AVX-512 path (`encode16_lanes`). Compiled without -ffast-math and without FMA contraction.

   Three paths chosen at run time, so the .so runs on any x86-64: AVX-512 written with intrinsics, and AVX2
   and baseline x86-64 copies of plain loops that the compiler vectorizes. */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

/* The vector paths need x86-64 (and can be left out to test the portable build: -DMX_CPU_PORTABLE). */
#if (defined(__x86_64__) || defined(__i386__)) && !defined(MX_CPU_PORTABLE)
#define MX_CPU_X86 1
#include <immintrin.h>
#else
#define MX_CPU_X86 0
#endif

enum { IN_F32 = 0, IN_BF16 = 1 };
enum { ISA_BASE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
#define GROUP 64  /* blocks (rows) or columns (columns) whose parameters are computed together */

typedef struct {
    int emax, mbits, elem_bias, rceil, top_byte;
    float max_pos, magic, top_factor;
    uint32_t magic_bits;
    uint8_t nan_code;
} mx_format;

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* |x| as fp32 bits: ordered like the values, and any NaN (0x7F800001..) above +inf. */
static inline uint32_t abs_bits(const void* x, int in_kind, int64_t i) {
    if (in_kind == IN_BF16) return ((uint32_t)((const uint16_t*)x)[i] << 16) & 0x7fffffffu;
    return f2u(((const float*)x)[i]) & 0x7fffffffu;
}

static inline float load_f32(const void* x, int in_kind, int64_t i) {
    if (in_kind == IN_BF16) return u2f((uint32_t)((const uint16_t*)x)[i] << 16);
    return ((const float*)x)[i];
}

/* Per block, from its amax bits: the biased E8M0 byte (`mx_scale_exponent_ref`), 2^-E (`e8m0_to_fp32(...,
   reciprocal=True)`: 2^-127 is the subnormal 0x400000) and the fp32 bits of the saturation limit
   (`_finite_element_max` for finite blocks at or above the top byte, else the element max). Integer selects
   only, so the loop vectorizes. */
static inline void block_params(const uint32_t* amax, int64_t count, const mx_format* f, uint8_t* scale,
                                float* rcp, uint32_t* limit) {
    const uint32_t max_bits = f2u(f->max_pos);
    for (int64_t k = 0; k < count; ++k) {
        const uint32_t a = amax[k], exp_field = a >> 23, mant = a & 0x7fffffu;
        int32_t e = (int32_t)exp_field - (127 + f->emax) + (f->rceil & (mant > 0x600000u));
        e = e < -127 ? -127 : (e > 127 ? 127 : e);
        const int32_t special = mant ? 255 : 254;
        const int32_t byte = exp_field == 255 ? special : e + 127;
        scale[k] = (uint8_t)byte;
        const int32_t b2 = 254 - byte;
        rcp[k] = u2f(b2 == 0 ? 0x400000u : (uint32_t)(b2 & 0xff) << 23);
        int32_t p = 255 - byte;
        p = p < 1 ? 1 : (p > 127 ? 127 : p);
        const uint32_t top = f2u(u2f((uint32_t)(p + 127) << 23) * f->top_factor);
        limit[k] = ((byte >= f->top_byte) & (byte < 254)) ? top : max_bits;
    }
}

/* The element code of x / 2^E: |x / 2^E| saturated at the limit (on the bits: non-negative floats order
   like their bits; a NaN block's codes are replaced by the caller), then rounded to nearest even in
   integers. Normal range: add 0111..1 plus the lowest kept bit and shift; subnormal range: adding `magic`
   makes the fp32 adder round to the subnormal step, and the code is the difference of the bit patterns. */
static inline uint8_t encode(float x, float rcp, uint32_t limit, const mx_format* f) {
    const uint32_t bits = f2u(x * rcp), sign = (bits >> 24) & 0x80u;
    uint32_t mag = bits & 0x7fffffffu;
    mag = mag > limit ? limit : mag;
    const int sh = 23 - f->mbits;
    const uint32_t normal =
        ((mag + (1u << (sh - 1)) - 1u + ((mag >> sh) & 1u)) >> sh) - ((uint32_t)(127 - f->elem_bias) << f->mbits);
    const uint32_t sub = f2u(u2f(mag) + f->magic) - f->magic_bits;
    const uint32_t code = mag < ((uint32_t)(128 - f->elem_bias) << 23) ? sub : normal;
    return (uint8_t)(code | sign);
}

/* Row casts: `count` consecutive blocks of `bs` elements starting at block `b0` of the flat x (the blocked
   dim is contiguous and a multiple of bs). */
static inline __attribute__((always_inline)) void rows_body(const void* restrict x, int in_kind, int64_t b0,
                                                            int64_t count, int bs, const mx_format* fmt,
                                                            uint8_t* restrict data, uint8_t* restrict scale) {
    const mx_format local = *fmt, *f = &local;  /* a local copy: the byte stores cannot alias it */
    uint32_t amax[GROUP];
    float rcp[GROUP];
    uint32_t limit[GROUP];
    for (int64_t g0 = 0; g0 < count; g0 += GROUP) {
        const int64_t n = count - g0 < GROUP ? count - g0 : GROUP;
        for (int64_t k = 0; k < n; ++k) {
            const int64_t base = (b0 + g0 + k) * bs;
            uint32_t m = 0;
            for (int i = 0; i < bs; ++i) {
                const uint32_t a = abs_bits(x, in_kind, base + i);
                m = a > m ? a : m;
            }
            amax[k] = m;
        }
        uint8_t* s = scale + b0 + g0;
        block_params(amax, n, f, s, rcp, limit);
        for (int64_t k = 0; k < n; ++k) {
            const int64_t base = (b0 + g0 + k) * bs;
            uint8_t* out = data + base;
            if (s[k] == 255) { memset(out, f->nan_code, bs); continue; }
            const float r = rcp[k];
            const uint32_t l = limit[k];
            for (int i = 0; i < bs; ++i) out[i] = encode(load_f32(x, in_kind, base + i), r, l, f);
        }
    }
}

/* The same for a row whose length n is not a multiple of bs: its blocks one by one, the last one partial
   (as if zero-padded: zeros never change an amax). */
static void partial_row(const void* x, int in_kind, int64_t row, int64_t n, int bs, const mx_format* f,
                        uint8_t* data, uint8_t* scale) {
    const int64_t nb = (n + bs - 1) / bs;
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t base = row * n + b * bs, len = n - b * bs < bs ? n - b * bs : bs;
        uint32_t m = 0;
        for (int64_t i = 0; i < len; ++i) {
            const uint32_t a = abs_bits(x, in_kind, base + i);
            m = a > m ? a : m;
        }
        float r;
        uint32_t l;
        uint8_t* s = scale + row * nb + b;
        block_params(&m, 1, f, s, &r, &l);
        for (int64_t i = 0; i < len; ++i)
            data[base + i] = *s == 255 ? f->nan_code : encode(load_f32(x, in_kind, base + i), r, l, f);
    }
}

/* Column casts of x viewed as (batch, m, n): blocks of bs consecutive rows, per column, for the columns
   from c_begin on. `unit` numbers the (batch, block-row) pairs; a partial last block-row is as if
   zero-padded. */
static inline __attribute__((always_inline)) void cols_body(const void* restrict x, int in_kind, int64_t unit,
                                                            int64_t m, int64_t n, int64_t c_begin, int bs,
                                                            const mx_format* fmt, uint8_t* restrict data,
                                                            uint8_t* restrict scale) {
    const mx_format local = *fmt, *f = &local;  /* a local copy: the byte stores cannot alias it */
    const int64_t nbr = (m + bs - 1) / bs, batch = unit / nbr, br = unit % nbr;
    const int64_t r0 = br * bs, r1 = r0 + bs < m ? r0 + bs : m;
    uint32_t amax[GROUP];
    uint8_t s[GROUP];
    float rcp[GROUP];
    uint32_t limit[GROUP];
    for (int64_t c0 = c_begin; c0 < n; c0 += GROUP) {
        const int64_t w = n - c0 < GROUP ? n - c0 : GROUP;
        for (int64_t j = 0; j < w; ++j) amax[j] = 0;
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t base = (batch * m + r) * n + c0;
            for (int64_t j = 0; j < w; ++j) {
                const uint32_t a = abs_bits(x, in_kind, base + j);
                amax[j] = a > amax[j] ? a : amax[j];
            }
        }
        block_params(amax, w, f, s, rcp, limit);
        memcpy(scale + (batch * nbr + br) * n + c0, s, w);
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t base = (batch * m + r) * n + c0;
            for (int64_t j = 0; j < w; ++j) {
                const uint8_t code = encode(load_f32(x, in_kind, base + j), rcp[j], limit[j], f);
                data[base + j] = s[j] == 255 ? f->nan_code : code;
            }
        }
    }
}

/* The generic bodies specialised for the input kind and the common block size 32 (constant trip counts
   vectorize best), compiled once per instruction set: the AVX2 and baseline paths. */
#define DEFINE_KERNELS(SUFFIX, TARGET)                                                                       \
    TARGET static void rows_##SUFFIX(const void* x, int in_kind, int64_t b0, int64_t count, int bs,          \
                                     const mx_format* f, uint8_t* data, uint8_t* scale) {                    \
        if (in_kind == IN_F32 && bs == 32) rows_body(x, IN_F32, b0, count, 32, f, data, scale);              \
        else if (in_kind == IN_BF16 && bs == 32) rows_body(x, IN_BF16, b0, count, 32, f, data, scale);       \
        else if (in_kind == IN_F32) rows_body(x, IN_F32, b0, count, bs, f, data, scale);                     \
        else rows_body(x, IN_BF16, b0, count, bs, f, data, scale);                                           \
    }                                                                                                        \
    TARGET static void cols_##SUFFIX(const void* x, int in_kind, int64_t unit, int64_t m, int64_t n, int bs, \
                                     const mx_format* f, uint8_t* data, uint8_t* scale) {                    \
        if (in_kind == IN_F32) cols_body(x, IN_F32, unit, m, n, 0, bs, f, data, scale);                      \
        else cols_body(x, IN_BF16, unit, m, n, 0, bs, f, data, scale);                                       \
    }

DEFINE_KERNELS(base, )
#if MX_CPU_X86
DEFINE_KERNELS(avx2, __attribute__((target("avx2"))))

/* The AVX-512 path, written with intrinsics (16 elements per vector): the same steps as `encode`. */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

typedef struct {
    __m512i abs_mask, exp_mask, sub_below, exp_shift, low7;
} encode_consts;

/* For `encode16_lanes` (sh = 23 - mbits): sub_below the fp32 bits of the element type's smallest normal;
   exp_shift adds sh to an fp32 exponent and puts delta = -((128 + sh - bias) << mbits) mod 128 in the low
   mantissa bits (even, and below 2^sh). */
AVX512 static inline encode_consts make_consts(const mx_format* f) {
    const int sh = 23 - f->mbits, delta = -((128 + sh - f->elem_bias) << f->mbits) & 127;
    encode_consts c = {_mm512_set1_epi32(0x7fffffff), _mm512_set1_epi32(0x7f800000),
                       _mm512_set1_epi32((128 - f->elem_bias) << 23), _mm512_set1_epi32((sh << 23) + delta),
                       _mm512_set1_epi32(0x7f)};
    return c;
}

AVX512 static inline __m512 load16(const void* x, int in_kind, int64_t i) {
    if (in_kind == IN_BF16)
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)x + i))), 16));
    return _mm512_loadu_ps((const float*)x + i);
}

AVX512 static inline __m512i abs16(const void* x, int in_kind, int64_t i, const encode_consts* c) {
    return _mm512_and_si512(_mm512_castps_si512(load16(x, in_kind, i)), c->abs_mask);
}

/* The 16 codes of x * rcp, one per 32-bit lane (values 0..255): `encode` in 10 vector ops, for a constant
   sh = 23 - mbits (immediate shifts; the callers are instantiated for E4M3 and E5M2):
   - |x * rcp| saturated at the limit by one vrangeps (minimum of absolute values, sign cleared; the limit is
     a non-negative float, and inf saturates to it);
   - rounding by the fp32 adder: c = 2^(e + sh) for the element's exponent e (clamped below at the element
     type's smallest normal exponent) has an ulp u equal to the element's step at e, so mag + c rounds mag to
     the nearest step, ties to even, and mag + c = c + m * u with m in [0, 2^(mbits+1)] (no carry into the
     exponent: mag < 2^(e+1) <= c);
   - the adder is given c' = c + delta * u instead (bits(c') = bits(c) + delta, the `exp_shift` constant):
     delta is even, so c' + mag rounds to c' + m * u with the same m, ties included (the parity of delta + m
     is m's), and bits(mag + c') = bits(c) + delta + m;
   - the code is (e + bias - 1) << mbits plus m (m = 2^mbits + the mantissa; subnormals: e + bias - 1 = 0);
     as (c' >> sh) = (e + 127 + sh) << mbits (delta < 2^sh) and delta = -((128 + sh - bias) << mbits) mod 128,
     code = bits(mag + c') + (c' >> sh) in its low 7 bits (bits(c) has no bits below 23);
   - sign and low 7 bits merged by one ternary-logic op: (A & 0x7F) | (B & ~0x7F) with B = bits >> 24. */
AVX512 static inline __m512i encode16_lanes(__m512 x, __m512 rcp, __m512 limit, const encode_consts* c,
                                               const int sh) {
    const __m512 prod = _mm512_mul_ps(x, rcp);
    const __m512 mag = _mm512_range_ps(prod, limit, 0x0A);  /* absolute minimum, sign bit cleared */
    const __m512i exp_bits = _mm512_and_si512(_mm512_castps_si512(mag), c->exp_mask);
    const __m512i cb = _mm512_add_epi32(_mm512_max_epu32(exp_bits, c->sub_below), c->exp_shift);
    const __m512i sum = _mm512_castps_si512(_mm512_add_ps(mag, _mm512_castsi512_ps(cb)));
    const __m512i code = _mm512_add_epi32(sum, _mm512_srli_epi32(cb, sh));
    return _mm512_ternarylogic_epi32(code, _mm512_srli_epi32(_mm512_castps_si512(prod), 24), c->low7, 0xE4);
}

AVX512 static inline __m128i encode16(__m512 x, __m512 rcp, __m512 limit, const encode_consts* c, const int sh) {
    return _mm512_cvtepi32_epi8(encode16_lanes(x, rcp, limit, c, sh));
}

/* Four vectors of codes (0..255 per lane) as 64 bytes in order: two vpackusdw and one vpackuswb (exact:
   nothing saturates) leave 128-bit lane i holding dwords a_i, b_i, c_i, d_i (each 4 codes); one vpermd
   puts a's four dwords first. Four shuffles for 64 codes instead of four two-uop vpmovdb. */
AVX512 static inline __m512i pack64(__m512i a, __m512i b, __m512i c, __m512i d) {
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512i bytes = _mm512_packus_epi16(_mm512_packus_epi32(a, b), _mm512_packus_epi32(c, d));
    return _mm512_permutexvar_epi32(order, bytes);
}

/* `block_params` for 16 blocks at once: scale bytes (returned), 2^-E and limit bits (stored). */
AVX512 static inline __m128i params16(__m512i a, const mx_format* f, float* rcp, uint32_t* limit) {
    const __m512i exp_field = _mm512_srli_epi32(a, 23), mant = _mm512_and_si512(a, _mm512_set1_epi32(0x7fffff));
    __m512i e = _mm512_sub_epi32(exp_field, _mm512_set1_epi32(127 + f->emax));
    if (f->rceil)
        e = _mm512_mask_add_epi32(e, _mm512_cmpgt_epu32_mask(mant, _mm512_set1_epi32(0x600000)), e,
                                  _mm512_set1_epi32(1));
    e = _mm512_max_epi32(_mm512_min_epi32(e, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
    __m512i byte = _mm512_add_epi32(e, _mm512_set1_epi32(127));
    const __mmask16 special = _mm512_cmpeq_epi32_mask(exp_field, _mm512_set1_epi32(255));
    byte = _mm512_mask_mov_epi32(byte, special, _mm512_set1_epi32(254));
    byte = _mm512_mask_mov_epi32(byte, special & _mm512_test_epi32_mask(mant, mant), _mm512_set1_epi32(255));
    const __m512i b2 = _mm512_sub_epi32(_mm512_set1_epi32(254), byte);
    __m512i r = _mm512_slli_epi32(_mm512_and_si512(b2, _mm512_set1_epi32(0xff)), 23);
    r = _mm512_mask_mov_epi32(r, _mm512_cmpeq_epi32_mask(b2, _mm512_setzero_si512()), _mm512_set1_epi32(0x400000));
    _mm512_storeu_si512(rcp, r);
    __m512i p = _mm512_sub_epi32(_mm512_set1_epi32(255), byte);
    p = _mm512_max_epi32(_mm512_min_epi32(p, _mm512_set1_epi32(127)), _mm512_set1_epi32(1));
    const __m512 top = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(p, _mm512_set1_epi32(127)), 23)),
                                     _mm512_set1_ps(f->top_factor));
    const __mmask16 is_top = _mm512_cmpge_epi32_mask(byte, _mm512_set1_epi32(f->top_byte)) &
                             _mm512_cmplt_epi32_mask(byte, _mm512_set1_epi32(254));
    _mm512_storeu_si512(limit, _mm512_mask_blend_epi32(is_top, _mm512_set1_epi32((int)f2u(f->max_pos)),
                                                       _mm512_castps_si512(top)));
    return _mm512_cvtepi32_epi8(byte);
}

/* Lanes 0-7: pairwise maxima of a's lanes; lanes 8-15: of b's. Four levels turn 16 vectors of per-block
   partial maxima into one vector of 16 block maxima, in block order. */
AVX512 static inline __m512i pair_max(__m512i a, __m512i b) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    return _mm512_max_epu32(_mm512_permutex2var_epi32(a, even, b), _mm512_permutex2var_epi32(a, odd, b));
}

AVX512 static inline void rows_avx512_kind(const void* restrict x, int in_kind, int64_t b0, int64_t count,
                                           int bs, const mx_format* fmt, uint8_t* restrict data,
                                           uint8_t* restrict scale, const int sh) {
    const mx_format local = *fmt, *f = &local;
    const encode_consts c = make_consts(f);
    uint32_t limit[16];
    float rcp[16];
    for (int64_t g0 = 0; g0 < count; g0 += 16) {
        const int n = count - g0 < 16 ? (int)(count - g0) : 16;
        __m512i m[16];
        for (int k = 0; k < 16; ++k) {
            m[k] = _mm512_setzero_si512();
            if (k >= n) continue;
            const int64_t base = (b0 + g0 + k) * bs;
            for (int i = 0; i < bs; i += 16) m[k] = _mm512_max_epu32(m[k], abs16(x, in_kind, base + i, &c));
        }
        for (int width = 16; width > 1; width /= 2)
            for (int k = 0; k < width / 2; ++k) m[k] = pair_max(m[2 * k], m[2 * k + 1]);
        const __m128i bytes = params16(m[0], f, rcp, limit);
        _mm_mask_storeu_epi8(scale + b0 + g0, (__mmask16)((1u << n) - 1), bytes);
        const __mmask16 nan = _mm_cmpeq_epi8_mask(bytes, _mm_set1_epi8((char)255));
        for (int k = 0; k < n; ++k) {
            const int64_t base = (b0 + g0 + k) * bs;
            if (nan >> k & 1) { memset(data + base, f->nan_code, bs); continue; }
            const __m512 r = _mm512_set1_ps(rcp[k]);
            const __m512 l = _mm512_castsi512_ps(_mm512_set1_epi32((int)limit[k]));
            for (int i = 0; i < bs; i += 16)
                _mm_storeu_si128((__m128i*)(data + base + i), encode16(load16(x, in_kind, base + i), r, l, &c, sh));
        }
    }
}

/* Rows at block size 32 (the OCP block): 16 blocks (512 elements) per step with every trip count constant,
   so the 16 block maxima stay in registers (the generic loop below keeps them in memory and zeroes them per
   step: 1.5x the time), two blocks encoded per 64-byte store, and the next step's 512 elements prefetched
   (the hardware prefetcher alone left a 1024x1024 cast ~1.4x slower). A last group of fewer than 16 blocks
   takes the generic loop. */
AVX512 static inline void rows32_avx512_kind(const void* restrict x, int in_kind, int64_t b0, int64_t count,
                                             const mx_format* fmt, uint8_t* restrict data,
                                             uint8_t* restrict scale, const int sh) {
    const mx_format local = *fmt, *f = &local;
    const encode_consts c = make_consts(f);
    uint32_t limit[16];
    float rcp[16];
    const int64_t full = count & ~(int64_t)15;
    for (int64_t g0 = 0; g0 < full; g0 += 16) {
        const int64_t base0 = (b0 + g0) * 32;
        __m512i m[16];
        for (int k = 0; k < 16; ++k) {
            /* a prefetch never faults, so the last step may point past the end */
            _mm_prefetch((const char*)x + (base0 + 512 + 32 * k) * (in_kind == IN_F32 ? 4 : 2), _MM_HINT_T0);
            if (in_kind == IN_F32) _mm_prefetch((const char*)x + (base0 + 512 + 32 * k + 16) * 4, _MM_HINT_T0);
            m[k] = _mm512_max_epu32(abs16(x, in_kind, base0 + 32 * k, &c), abs16(x, in_kind, base0 + 32 * k + 16, &c));
        }
        for (int width = 16; width > 1; width /= 2)
            for (int k = 0; k < width / 2; ++k) m[k] = pair_max(m[2 * k], m[2 * k + 1]);
        const __m128i bytes = params16(m[0], f, rcp, limit);
        _mm_storeu_si128((__m128i*)(scale + b0 + g0), bytes);
        const __mmask16 nan = _mm_cmpeq_epi8_mask(bytes, _mm_set1_epi8((char)255));
        for (int k = 0; k < 16; k += 2) {  /* two blocks: 64 codes, one 64-byte store */
            const int64_t base = base0 + 32 * k;
            const __m512 r0 = _mm512_set1_ps(rcp[k]), r1 = _mm512_set1_ps(rcp[k + 1]);
            const __m512 l0 = _mm512_castsi512_ps(_mm512_set1_epi32((int)limit[k]));
            const __m512 l1 = _mm512_castsi512_ps(_mm512_set1_epi32((int)limit[k + 1]));
            _mm512_storeu_si512(data + base, pack64(encode16_lanes(load16(x, in_kind, base), r0, l0, &c, sh),
                                                    encode16_lanes(load16(x, in_kind, base + 16), r0, l0, &c, sh),
                                                    encode16_lanes(load16(x, in_kind, base + 32), r1, l1, &c, sh),
                                                    encode16_lanes(load16(x, in_kind, base + 48), r1, l1, &c, sh)));
        }
        if (nan)
            for (int k = 0; k < 16; ++k)
                if (nan >> k & 1) memset(data + base0 + 32 * k, f->nan_code, 32);
    }
    if (full < count) rows_avx512_kind(x, in_kind, b0 + full, count - full, 32, f, data, scale, sh);
}

/* Rows: block sizes that are a multiple of 16 here, smaller ones on the AVX2 path; one instance per input
   kind and element type (the shift 23 - mbits a constant). */
AVX512 static void rows_avx512(const void* x, int in_kind, int64_t b0, int64_t count, int bs,
                               const mx_format* f, uint8_t* data, uint8_t* scale) {
    const int e4m3 = f->mbits == 3, f32 = in_kind == IN_F32;
    if (bs % 16) rows_avx2(x, in_kind, b0, count, bs, f, data, scale);
    else if (bs == 32 && e4m3 && f32) rows32_avx512_kind(x, IN_F32, b0, count, f, data, scale, 20);
    else if (bs == 32 && e4m3) rows32_avx512_kind(x, IN_BF16, b0, count, f, data, scale, 20);
    else if (bs == 32 && f32) rows32_avx512_kind(x, IN_F32, b0, count, f, data, scale, 21);
    else if (bs == 32) rows32_avx512_kind(x, IN_BF16, b0, count, f, data, scale, 21);
    else if (e4m3 && f32) rows_avx512_kind(x, IN_F32, b0, count, bs, f, data, scale, 20);
    else if (e4m3) rows_avx512_kind(x, IN_BF16, b0, count, bs, f, data, scale, 20);
    else if (f32) rows_avx512_kind(x, IN_F32, b0, count, bs, f, data, scale, 21);
    else rows_avx512_kind(x, IN_BF16, b0, count, bs, f, data, scale, 21);
}

AVX512 static inline void cols_avx512_kind(const void* restrict x, int in_kind, int64_t unit, int64_t m,
                                           int64_t n, int bs, const mx_format* fmt, uint8_t* restrict data,
                                           uint8_t* restrict scale, const int sh) {
    const mx_format local = *fmt, *f = &local;
    const encode_consts c = make_consts(f);
    const int64_t nbr = (m + bs - 1) / bs, batch = unit / nbr, br = unit % nbr;
    const int64_t r0 = br * bs, r1 = r0 + bs < m ? r0 + bs : m;
    const __m128i nan_codes = _mm_set1_epi8((char)f->nan_code), all_nan = _mm_set1_epi8((char)255);
    uint32_t limit[64];
    float rcp[64];
    int64_t c0 = 0;
    /* fp32: 64 columns at a time, a 64-byte store of codes per row (~15% less time than 16 columns at
       1024 columns, more at 4096). Not for bf16 (13% faster at 1024 columns, but slower in 4 of 5 rounds at
       4096x4096; not understood) nor rows (no gain measured): docs/mxfp8train.md, 2026-12-07 fifth part. */
    for (; in_kind == IN_F32 && c0 + 64 <= n; c0 += 64) {
        __m512i mx[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                         _mm512_setzero_si512()};
        for (int64_t r = r0; r < r1; ++r)
            for (int j = 0; j < 4; ++j)
                mx[j] = _mm512_max_epu32(mx[j], abs16(x, in_kind, (batch * m + r) * n + c0 + 16 * j, &c));
        __m512i bytes = _mm512_castsi128_si512(params16(mx[0], f, rcp, limit));
        bytes = _mm512_inserti32x4(bytes, params16(mx[1], f, rcp + 16, limit + 16), 1);
        bytes = _mm512_inserti32x4(bytes, params16(mx[2], f, rcp + 32, limit + 32), 2);
        bytes = _mm512_inserti32x4(bytes, params16(mx[3], f, rcp + 48, limit + 48), 3);
        _mm512_storeu_si512(scale + (batch * nbr + br) * n + c0, bytes);
        const __mmask64 nan = _mm512_cmpeq_epi8_mask(bytes, _mm512_set1_epi8((char)255));
        const __m512i nan_codes64 = _mm512_set1_epi8((char)f->nan_code);
        __m512 rv[4], lv[4];
        for (int j = 0; j < 4; ++j) rv[j] = _mm512_loadu_ps(rcp + 16 * j), lv[j] = _mm512_loadu_ps((const float*)limit + 16 * j);
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t base = (batch * m + r) * n + c0;
            __m512i code[4];
            for (int j = 0; j < 4; ++j) code[j] = encode16_lanes(load16(x, in_kind, base + 16 * j), rv[j], lv[j], &c, sh);
            _mm512_storeu_si512(data + base, _mm512_mask_blend_epi8(nan, pack64(code[0], code[1], code[2], code[3]),
                                                                    nan_codes64));
        }
    }
    for (; c0 + 16 <= n; c0 += 16) {
        __m512i mx = _mm512_setzero_si512();
        for (int64_t r = r0; r < r1; ++r) mx = _mm512_max_epu32(mx, abs16(x, in_kind, (batch * m + r) * n + c0, &c));
        const __m128i bytes = params16(mx, f, rcp, limit);
        _mm_storeu_si128((__m128i*)(scale + (batch * nbr + br) * n + c0), bytes);
        const __m512 rv = _mm512_loadu_ps(rcp);
        const __m512 lv = _mm512_loadu_ps((const float*)limit);
        const __mmask16 nan = _mm_cmpeq_epi8_mask(bytes, all_nan);
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t base = (batch * m + r) * n + c0;
            const __m128i codes = encode16(load16(x, in_kind, base), rv, lv, &c, sh);
            _mm_storeu_si128((__m128i*)(data + base), _mm_mask_blend_epi8(nan, codes, nan_codes));
        }
    }
    if (c0 < n) cols_body(x, in_kind, unit, m, n, c0, bs, f, data, scale);  /* the last n % 16 columns */
}

AVX512 static void cols_avx512(const void* x, int in_kind, int64_t unit, int64_t m, int64_t n, int bs,
                               const mx_format* f, uint8_t* data, uint8_t* scale) {
    const int e4m3 = f->mbits == 3;
    if (in_kind == IN_F32 && e4m3) cols_avx512_kind(x, IN_F32, unit, m, n, bs, f, data, scale, 20);
    else if (in_kind == IN_F32) cols_avx512_kind(x, IN_F32, unit, m, n, bs, f, data, scale, 21);
    else if (e4m3) cols_avx512_kind(x, IN_BF16, unit, m, n, bs, f, data, scale, 20);
    else cols_avx512_kind(x, IN_BF16, unit, m, n, bs, f, data, scale, 21);
}

#else
#define rows_avx2 rows_base
#define cols_avx2 cols_base
#define rows_avx512 rows_base
#define cols_avx512 cols_base
#endif

typedef void (*rows_fn)(const void*, int, int64_t, int64_t, int, const mx_format*, uint8_t*, uint8_t*);
typedef void (*cols_fn)(const void*, int, int64_t, int64_t, int64_t, int, const mx_format*, uint8_t*,
                        uint8_t*);

/* The best instruction set this CPU has, capped at `isa` (tests run every path). */
static int pick_isa(int isa) {
    int best = ISA_BASE;
#if MX_CPU_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) best = ISA_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        best = ISA_AVX512;
#endif
    return isa < best ? isa : best;
}

int mx_best_isa(void) { return pick_isa(ISA_AVX512); }

enum { MODE_ROWS = 0, MODE_COLUMNS = 1, MODE_BOTH = 2 };

typedef struct {
    const void* x; int in_kind; int64_t m, n; int bs; const mx_format* f;
    uint8_t* data; uint8_t* scale;    /* rows (or columns, in MODE_COLUMNS) */
    uint8_t* data2; uint8_t* scale2;  /* columns in MODE_BOTH */
    rows_fn rows; cols_fn cols; int mode;
    /* units [0, n_units) (runs of row blocks, rows, or column block-rows), claimed `chunk` at a time */
    int64_t n_units, chunk;
    int64_t* next;
} mx_job;

/* Row casts of rows [r0, r1) of x (m, n). */
static void cast_rows(const mx_job* a, int64_t r0, int64_t r1) {
    if (a->n % a->bs == 0)  /* the rows' blocks are consecutive blocks of the flat tensor */
        a->rows(a->x, a->in_kind, r0 * (a->n / a->bs), (r1 - r0) * (a->n / a->bs), a->bs, a->f, a->data, a->scale);
    else
        for (int64_t r = r0; r < r1; ++r) partial_row(a->x, a->in_kind, r, a->n, a->bs, a->f, a->data, a->scale);
}

/* Claim the next chunk of units, dynamically (a descheduled thread holds up one chunk, not half the work).
   MODE_BOTH: a unit is a block-row of bs rows, cast along its rows and then along its columns while it is
   still in cache (one read of x from memory for both casts). */
static void* run_units(void* arg) {
    const mx_job* a = arg;
    for (;;) {
        const int64_t u0 = __atomic_fetch_add(a->next, a->chunk, __ATOMIC_RELAXED);
        if (u0 >= a->n_units) return 0;
        const int64_t u1 = u0 + a->chunk < a->n_units ? u0 + a->chunk : a->n_units;
        if (a->mode == MODE_COLUMNS) {
            for (int64_t u = u0; u < u1; ++u) a->cols(a->x, a->in_kind, u, a->m, a->n, a->bs, a->f, a->data, a->scale);
        } else if (a->mode == MODE_BOTH) {
            for (int64_t u = u0; u < u1; ++u) {
                cast_rows(a, u * a->bs, (u + 1) * a->bs < a->m ? (u + 1) * a->bs : a->m);
                a->cols(a->x, a->in_kind, u, a->m, a->n, a->bs, a->f, a->data2, a->scale2);
            }
        } else if (a->n % a->bs == 0) {  /* units are blocks of the flat tensor */
            a->rows(a->x, a->in_kind, u0, u1 - u0, a->bs, a->f, a->data, a->scale);
        } else {  /* units are rows */
            cast_rows(a, u0, u1);
        }
    }
}

/* Cast x (batch, m, n) into codes and scales, on n_threads threads (this one included) with instruction
   sets up to `isa`. MODE_ROWS (batch = 1, blocks along n): data (m, n), scale (m, ceil(n / bs)).
   MODE_COLUMNS (blocks along m): data (batch, m, n), scale (batch, ceil(m / bs), n). MODE_BOTH (batch = 1):
   the rows into data / scale and the columns into data2 / scale2. */
void mx_cast(const void* x, int in_kind, int64_t batch, int64_t m, int64_t n, int bs, int mode,
             int emax, int mbits, int elem_bias, int rceil, int top_byte, float max_pos, float magic,
             uint32_t magic_bits, int nan_code, uint8_t* data, uint8_t* scale, uint8_t* data2,
             uint8_t* scale2, int n_threads, int isa) {
    const mx_format f = {emax, mbits, elem_bias, rceil, top_byte, max_pos, magic,
                         1.0f - 1.0f / (float)(2 << mbits), magic_bits, (uint8_t)nan_code};
    const int level = pick_isa(isa);
    int64_t next = 0;
    mx_job job = {x, in_kind, m, n, bs, &f, data, scale, data2, scale2,
                  level == ISA_AVX512 ? rows_avx512 : level == ISA_AVX2 ? rows_avx2 : rows_base,
                  level == ISA_AVX512 ? cols_avx512 : level == ISA_AVX2 ? cols_avx2 : cols_base,
                  mode, 0, 1, &next};
    int64_t elements_per_unit;
    if (mode == MODE_ROWS) {
        elements_per_unit = n % bs == 0 ? bs : n;
        job.n_units = n % bs == 0 ? m * n / bs : m;
    } else {
        elements_per_unit = (int64_t)bs * n * (mode == MODE_BOTH ? 2 : 1);
        job.n_units = batch * ((m + bs - 1) / bs);
    }
    job.chunk = (16384 + elements_per_unit - 1) / elements_per_unit;  /* ~16K elements per claim */
    if (n_threads > 64) n_threads = 64;
    pthread_t threads[64];
    int started[64] = {0};
    for (int i = 1; i < n_threads; ++i) started[i] = pthread_create(&threads[i], 0, run_units, &job) == 0;
    run_units(&job);  /* if a thread failed to start, the others claim its share */
    for (int i = 1; i < n_threads; ++i)
        if (started[i]) pthread_join(threads[i], 0);
}
