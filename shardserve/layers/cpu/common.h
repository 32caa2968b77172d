/* Shared by the CPU kernels' sources (kernels.c, attention.c): the includes, the bf16 conversions with
 * round-to-nearest-even, the dtype-generic loads and stores, and the AVX-512 helpers. */
#ifndef SS_COMMON_H
#define SS_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE  /* syscall() for the AMX permission request */
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SS_AVX512 1
#endif

#if defined(SS_AVX512) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define SS_AMX 1
#endif

typedef uint16_t bf16;

static inline float bf2f(bf16 h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

static inline float load1(int dt, const void *p, long i) {
    return dt ? bf2f(((const bf16 *)p)[i]) : ((const float *)p)[i];
}

static inline void store1(int dt, void *p, long i, float v) {
    if (dt) ((bf16 *)p)[i] = f2bf(v);
    else ((float *)p)[i] = v;
}

/* value rounded to the tensor dtype (what torch keeps after an op in that dtype) */
static inline float round_dt(int dt, float v) { return dt ? bf2f(f2bf(v)) : v; }

static void to_f32(int dt, const void *src, float *dst, long n) {
    if (dt) {
        const bf16 *s = (const bf16 *)src;
        for (long i = 0; i < n; i++) dst[i] = bf2f(s[i]);
    } else {
        memcpy(dst, src, n * sizeof(float));
    }
}

/* sum_i a[i] * b[i], a float32, b of dtype dt (vectorised by the compiler) */
static inline float dot_f32(int dt, const float *a, const void *b, long n) {
    float s = 0.f;
    if (dt) {
        const bf16 *bb = (const bf16 *)b;
#pragma omp simd reduction(+ : s)
        for (long i = 0; i < n; i++) s += a[i] * bf2f(bb[i]);
    } else {
        const float *bf = (const float *)b;
#pragma omp simd reduction(+ : s)
        for (long i = 0; i < n; i++) s += a[i] * bf[i];
    }
    return s;
}

#ifdef SS_AVX512
static inline __m512 load16(int dt, const void *w, long k, __mmask16 m) {
    if (dt) {
        __m256i h = _mm256_maskz_loadu_epi16(m, (const bf16 *)w + k);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(m, (const float *)w + k);
}

/* v rounded to bf16 with round-to-nearest-even (f2bf for 16 lanes; NaN stays NaN) */
static inline __m256i f2bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    r = _mm512_srli_epi32(r, 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
}

static inline void store16(int dt, void *p, long i, __m512 v, __mmask16 m) {
    if (dt) _mm256_mask_storeu_epi16((bf16 *)p + i, m, f2bf16(v));
    else _mm512_mask_storeu_ps((float *)p + i, m, v);
}

/* v as the dtype keeps it (round_dt for 16 lanes) */
static inline __m512 round16(int dt, __m512 v) {
    return dt ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(f2bf16(v)), 16)) : v;
}

static inline __mmask16 lanes16(long n) { return n >= 16 ? (__mmask16)0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1u); }

/* the horizontal sums of a, b, c, d in one vector (fewer shuffles than four _mm512_reduce_add_ps) */
static inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  /* a0+a2 b0+b2 a1+a3 b1+b3 */
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));  /* per 128-bit lane: a b c d */
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#endif

#ifdef SS_AVX512
/* exp(x) for 16 lanes: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its degree-6 Taylor polynomial (relative error
 * ~1e-7, an ulp of fp32), times 2^n by scalef (which also saturates to 0 and inf at the range ends) */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-103.9f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  /* ln2 = 0.693145752 + 1.42860677e-6 */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* attention.c, called by the fused decode blocks in kernels.c */
void ss_write_kv(int dt, const void *k, long skt, long skh, const void *v, long svt, long svh, void *cache, long Hk,
                 long S, long D, const int64_t *slots, long T);
long ss_decode_attention(int dt, const void *q, long sqs, long sqh, void *out, const void *cache, long Hk, long NB,
                         long BS, long D, const int64_t *tables, long ldt, const int64_t *lens, long Sq, long Hq,
                         float scale, long window, float softcap, float *lse, int nthreads);

#endif
