/* Paged attention on the CPU: the KV-cache write and one call that attends every sequence of a step, decodes and
 * (chunked) prefills alike, straight from the paged cache.
 *
 * The cache is [2, Hk, NB, BS, D] (K plane, V plane); key j of a sequence sits in block tab[j / BS] at offset
 * j % BS. Query row t of a sequence with context length L and chunk length ql is the token at position
 * L - ql + (t - start); it attends keys j <= its position (and j > position - window when window > 0). Query head
 * h reads KV head h / G (G = Hq / Hk). Scores s = q.k * scale, then softcap * tanh(s / softcap) when softcap > 0;
 * lse = log sum exp(s) over the attended keys (natural log, float32).
 *
 * Two inner routines, both exact softmax attention accumulated in float32:
 *  - attend_pos: the G heads of one KV head for one position (a decode; or any row without AVX-512). Scores first
 *    (4 keys per horizontal sum), then the softmax, then one pass over V: each K and V row is read once.
 *  - attend_tile (AVX-512): 16 consecutive positions of one sequence for the G heads of one KV head, flash-style
 *    over tiles of 16 keys with an online softmax. The queries are held transposed (a vector = one dim of 16
 *    rows), so a score vector is 16 rows' scores for one key and the softmax needs no horizontal reductions; each
 *    K/V tile is converted to fp32 once and used by the G heads. */
#include "common.h"

/* write_kv: cache [2, Hk, S, D] (S = blocks * block_size slots, contiguous); k, v [T, Hk, D] with strides;
 * slot of token t = slots[t] (a negative slot is skipped: a padding token). */
void ss_write_kv(int dt, const void *k, long skt, long skh, const void *v, long svt, long svh, void *cache, long Hk,
                 long S, long D, const int64_t *slots, long T) {
    size_t esz = dt ? 2 : 4;
    char *kc = (char *)cache, *vc = (char *)cache + (size_t)(Hk * S * D) * esz;
    for (long t = 0; t < T; t++) {
        int64_t slot = slots[t];
        if (slot < 0 || slot >= S) continue;
        for (long h = 0; h < Hk; h++) {
            size_t off = (size_t)((h * S + slot) * D) * esz;
            memcpy(kc + off, (const char *)k + (t * skt + h * skh) * esz, (size_t)D * esz);
            memcpy(vc + off, (const char *)v + (t * svt + h * svh) * esz, (size_t)D * esz);
        }
    }
}

struct attn_args {  /* what every task of one call shares */
    int dt;
    size_t esz;
    const char *q;
    long sqt, sqh;
    char *out;   /* [T, Hq, D] contiguous */
    float *lse;  /* [T, Hq] or NULL */
    const char *kc, *vc;
    long Hk, Hq, G, NB, BS, D;
    float scale, softcap;
    long window;
};

static inline const char *key_row(const struct attn_args *a, const char *plane, const int64_t *tab, long hk, long j) {
    return plane + (size_t)(((hk * a->NB + tab[j / a->BS]) * a->BS + j % a->BS) * a->D) * a->esz;
}

static inline float cap_score(const struct attn_args *a, float s) {
    s *= a->scale;
    return a->softcap > 0.f ? a->softcap * tanhf(s / a->softcap) : s;
}

/* out rows (t, heads hk*G .. hk*G+G-1) = acc / sum; lse = mx + log(sum) */
static void store_pos(const struct attn_args *a, long t, long hk, const float *acc, long ldacc, const float *mx,
                      const float *sum) {
    for (long g = 0; g < a->G; g++) {
        long h = hk * a->G + g;
        float inv = sum[g] > 0.f ? 1.0f / sum[g] : 0.f;
        char *orow = a->out + (size_t)((t * a->Hq + h) * a->D) * a->esz;
        for (long d = 0; d < a->D; d++) store1(a->dt, orow, d, acc[g * ldacc + d] * inv);
        if (a->lse) a->lse[t * a->Hq + h] = sum[g] > 0.f ? mx[g] + logf(sum[g]) : -INFINITY;
    }
}

#ifdef SS_AVX512
/* the rows of keys j .. j + n - 1 (within one block) into the caches ahead of their use */
static inline void prefetch_keys(const struct attn_args *a, const char *plane, const int64_t *tab, long hk, long j,
                                 long n) {
    const char *r = key_row(a, plane, tab, hk, j);
    for (size_t o = 0, bytes = (size_t)(n * a->D) * a->esz; o < bytes; o += 64) _mm_prefetch(r + o, _MM_HINT_T0);
}

/* sc[g * lds + i] = q_g . k_{lo + i} for the 4 keys at rows kr .. kr + 3 (one block), i = j - lo */
static inline void scores4(const struct attn_args *a, const float *qf, long Dp, const char *kr, float *sc, long lds) {
    const long D = a->D, G = a->G;
#ifdef __AVX512BF16__
    if (a->dt) {  /* bf16 pairs straight from the rows: VDPBF16PS, no conversion */
        const size_t rs = (size_t)D * 2;
        for (long g = 0; g < G; g++) {
            const __m512i *qv = (const __m512i *)(qf + 2 * G * Dp) + g * (Dp / 32);  /* q_g as bf16 (attend_pos) */
            __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
            for (long d = 0, c = 0; d < D; d += 32, c++) {
                __mmask32 m = D - d >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (D - d)) - 1u);
                __m512bh q = (__m512bh)_mm512_loadu_si512(qv + c);
                s0 = _mm512_dpbf16_ps(s0, q, (__m512bh)_mm512_maskz_loadu_epi16(m, kr + d * 2));
                s1 = _mm512_dpbf16_ps(s1, q, (__m512bh)_mm512_maskz_loadu_epi16(m, kr + rs + d * 2));
                s2 = _mm512_dpbf16_ps(s2, q, (__m512bh)_mm512_maskz_loadu_epi16(m, kr + 2 * rs + d * 2));
                s3 = _mm512_dpbf16_ps(s3, q, (__m512bh)_mm512_maskz_loadu_epi16(m, kr + 3 * rs + d * 2));
            }
            _mm_storeu_ps(sc + g * lds, hsum4(s0, s1, s2, s3));
        }
        return;
    }
#endif
    const size_t rs = (size_t)D * a->esz;
    for (long g = 0; g < G; g++) {
        const float *qg = qf + g * Dp;
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (long d = 0; d < D; d += 16) {
            __mmask16 m = lanes16(D - d);
            __m512 q = _mm512_loadu_ps(qg + d);
            s0 = _mm512_fmadd_ps(q, load16(a->dt, kr, d, m), s0);
            s1 = _mm512_fmadd_ps(q, load16(a->dt, kr + rs, d, m), s1);
            s2 = _mm512_fmadd_ps(q, load16(a->dt, kr + 2 * rs, d, m), s2);
            s3 = _mm512_fmadd_ps(q, load16(a->dt, kr + 3 * rs, d, m), s3);
        }
        _mm_storeu_ps(sc + g * lds, hsum4(s0, s1, s2, s3));
    }
}

/* acc[g][d0 .. d0 + 64) += sum_j p_g(j) v_j[d0 ..] for heads g0 .. g0 + gn - 1 (gn <= 4): 16 accumulators held in
 * registers over all the keys lo .. p, so each V row is converted once per 64 dims and 4 heads. dt is a constant in
 * each of the two callers below (inlined), so the loads carry no dtype test. */
static inline __attribute__((always_inline)) void pv_block_dt(const int dt, const int gn, const struct attn_args *a,
                                                              const int64_t *tab, long hk, long lo, long p,
                                                              const float *sc, long lds, long g0, long d0,
                                                              float *acc, long Dp) {
    const long D = a->D, BS = a->BS, dn = D - d0;
    __mmask16 m[4];
    for (int c = 0; c < 4; c++) m[c] = lanes16(dn - 16 * c);
    __m512 o[4][4];
#pragma GCC unroll 4
    for (int g = 0; g < 4; g++)
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) o[g][c] = _mm512_setzero_ps();
    const float *s0 = sc + g0 * lds - lo, *s1 = s0 + lds, *s2 = s1 + lds, *s3 = s2 + lds;
    for (long j = lo; j <= p;) {
        long off = j % BS, cnt = BS - off < p + 1 - j ? BS - off : p + 1 - j;
        if (j + cnt <= p) prefetch_keys(a, a->vc, tab, hk, j + cnt, BS < p + 1 - j - cnt ? BS : p + 1 - j - cnt);
        const char *vr = key_row(a, a->vc, tab, hk, j) + (size_t)d0 * (dt ? 2 : 4);
        for (long r = 0; r < cnt; r++, vr += (size_t)D * (dt ? 2 : 4)) {
            __m512 v[4];
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) v[c] = load16(dt, vr, 16 * c, m[c]);
            const long i = j + r;
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) {  /* gn is a constant: the unused heads compile away */
                o[0][c] = _mm512_fmadd_ps(_mm512_set1_ps(s0[i]), v[c], o[0][c]);
                if (gn > 1) o[1][c] = _mm512_fmadd_ps(_mm512_set1_ps(s1[i]), v[c], o[1][c]);
                if (gn > 2) o[2][c] = _mm512_fmadd_ps(_mm512_set1_ps(s2[i]), v[c], o[2][c]);
                if (gn > 3) o[3][c] = _mm512_fmadd_ps(_mm512_set1_ps(s3[i]), v[c], o[3][c]);
            }
        }
        j += cnt;
    }
    for (int g = 0; g < gn; g++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc + (g0 + g) * Dp + d0 + 16 * c, o[g][c]);
}

static void pv_block(const struct attn_args *a, const int64_t *tab, long hk, long lo, long p, const float *sc,
                     long lds, long g0, long gn, long d0, float *acc, long Dp) {
#define PV(dt, gn) pv_block_dt(dt, gn, a, tab, hk, lo, p, sc, lds, g0, d0, acc, Dp)
    switch (gn + 4 * (a->dt != 0)) {
    case 1: PV(0, 1); break;
    case 2: PV(0, 2); break;
    case 3: PV(0, 3); break;
    case 4: PV(0, 4); break;
    case 5: PV(1, 1); break;
    case 6: PV(1, 2); break;
    case 7: PV(1, 3); break;
    default: PV(1, 4); break;
    }
#undef PV
}
#endif

/* The G heads of KV head hk for query row t at position p (keys lo..p). work: G * (3 * Dp + p - lo + 5) floats,
 * Dp = D rounded up to 64. */
static void attend_pos(const struct attn_args *a, const int64_t *tab, long hk, long t, long p, float *work) {
    const int dt = a->dt;
    const long G = a->G, D = a->D, Dp = (D + 63) & ~63L, BS = a->BS;
    const long lo = a->window > 0 && p + 1 - a->window > 0 ? p + 1 - a->window : 0, n = p + 1 - lo;
    float *qf = work, *acc = qf + G * Dp, *sc = acc + 2 * G * Dp;  /* acc's second half: the bf16 copy of q */
    const long lds = n + 4;  /* sc: G rows of n (+4) scores */
    float mx[G], sum[G];
    for (long g = 0; g < G; g++) {
        memset(qf + g * Dp, 0, (size_t)Dp * sizeof(float));
        const char *qr = a->q + (size_t)(t * a->sqt + (hk * G + g) * a->sqh) * a->esz;
        to_f32(dt, qr, qf + g * Dp, D);
        if (dt) {  /* q as bf16, zero-padded to 32-element chunks (the VDPBF16PS path reads it) */
            bf16 *qb = (bf16 *)(qf + 2 * G * Dp) + g * Dp;
            memset(qb, 0, (size_t)Dp * 2);
            memcpy(qb, qr, (size_t)D * 2);
        }
    }
    /* scores */
    for (long j = lo; j <= p;) {
        long off = j % BS, cnt = BS - off < p + 1 - j ? BS - off : p + 1 - j;
        const char *kr = key_row(a, a->kc, tab, hk, j);
        long r = 0;
#ifdef SS_AVX512
        if (j + cnt <= p) prefetch_keys(a, a->kc, tab, hk, j + cnt, BS < p + 1 - j - cnt ? BS : p + 1 - j - cnt);
        for (; r + 4 <= cnt; r += 4) scores4(a, qf, Dp, kr + (size_t)(r * D) * a->esz, sc + (j + r - lo), lds);
#endif
        for (; r < cnt; r++)
            for (long g = 0; g < G; g++)
                sc[g * lds + (j + r - lo)] = dot_f32(dt, qf + g * Dp, kr + (size_t)(r * D) * a->esz, D);
        j += cnt;
    }
    /* softmax (unnormalised: the sum divides at the end) */
    for (long g = 0; g < G; g++) {
        float *sg = sc + g * lds, m = -INFINITY, s = 0.f;
        long i = 0;
#ifdef SS_AVX512
        if (a->softcap <= 0.f) {  /* scale and max, vectorised */
            __m512 vmax = _mm512_set1_ps(-INFINITY), vsc = _mm512_set1_ps(a->scale);
            for (; i < n; i += 16) {
                __mmask16 k = lanes16(n - i);
                __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, sg + i), vsc);
                _mm512_mask_storeu_ps(sg + i, k, x);
                vmax = _mm512_mask_max_ps(vmax, k, vmax, x);
            }
            m = _mm512_reduce_max_ps(vmax);
        }
#endif
        for (; i < n; i++) {
            sg[i] = cap_score(a, sg[i]);
            m = sg[i] > m ? sg[i] : m;
        }
        i = 0;
#ifdef SS_AVX512
        __m512 vs = _mm512_setzero_ps(), vm = _mm512_set1_ps(m);
        for (; i < n; i += 16) {
            __mmask16 k = lanes16(n - i);
            __m512 e = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sg + i), vm)));
            _mm512_mask_storeu_ps(sg + i, k, e);
            vs = _mm512_add_ps(vs, e);
        }
        s = _mm512_reduce_add_ps(vs);
#endif
        for (; i < n; i++) {
            sg[i] = expf(sg[i] - m);
            s += sg[i];
        }
        mx[g] = m;
        sum[g] = s;
    }
    /* P.V */
#ifdef SS_AVX512
    for (long g0 = 0; g0 < G; g0 += 4)
        for (long d0 = 0; d0 < D; d0 += 64)
            pv_block(a, tab, hk, lo, p, sc, lds, g0, G - g0 < 4 ? G - g0 : 4, d0, acc, Dp);
#else
    memset(acc, 0, (size_t)(G * Dp) * sizeof(float));
    for (long j = lo; j <= p;) {
        long off = j % BS, cnt = BS - off < p + 1 - j ? BS - off : p + 1 - j;
        const char *vr = key_row(a, a->vc, tab, hk, j);
        for (long r = 0; r < cnt; r++) {
            const char *row = vr + (size_t)(r * D) * a->esz;
            for (long d = 0; d < D; d++) {
                float v = load1(dt, row, d);
                for (long g = 0; g < G; g++) acc[g * Dp + d] += sc[g * lds + j + r - lo] * v;
            }
        }
        j += cnt;
    }
#endif
    store_pos(a, t, hk, acc, Dp, mx, sum);
}

#ifdef SS_AVX512
#define TILE 16  /* query positions per tile task, and keys per key tile: one vector each */

static inline __m512 tanh16(__m512 x) {  /* 1 - 2 / (exp(2x) + 1); exp16 saturates, so |x| large gives +-1 */
    __m512 e = exp16(_mm512_add_ps(x, x));
    return _mm512_sub_ps(_mm512_set1_ps(1.0f), _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
}

/* Query rows t0 .. t0 + nr - 1 (nr <= 16) at positions pos0 .. pos0 + nr - 1 of one sequence, heads of KV head hk.
 * work: 2 * G * D * 16 + 2 * 16 * D + 2 * G * 16 floats. */
static void attend_tile(const struct attn_args *a, const int64_t *tab, long hk, long t0, long pos0, long nr,
                        float *work) {
    const int dt = a->dt;
    const long G = a->G, D = a->D;
    float *Qt = work, *Ot = Qt + G * D * TILE, *Kf = Ot + G * D * TILE, *Vf = Kf + TILE * D;
    float *mb = Vf + TILE * D, *lb = mb + G * TILE;
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 ninf = _mm512_set1_ps(-INFINITY), vscale = _mm512_set1_ps(a->scale);
    for (long g = 0; g < G; g++) {
        float *qg = Qt + g * D * TILE;
        for (long i = 0; i < TILE; i++) {
            if (i < nr) {
                const char *qr = a->q + (size_t)((t0 + i) * a->sqt + (hk * G + g) * a->sqh) * a->esz;
                for (long d = 0; d < D; d++) qg[d * TILE + i] = load1(dt, qr, d);
            } else {
                for (long d = 0; d < D; d++) qg[d * TILE + i] = 0.f;
            }
        }
        _mm512_storeu_ps(mb + g * TILE, ninf);
        _mm512_storeu_ps(lb + g * TILE, _mm512_setzero_ps());
    }
    memset(Ot, 0, (size_t)(G * D * TILE) * sizeof(float));
    const long last = pos0 + nr - 1;
    const long lo = a->window > 0 && pos0 + 1 - a->window > 0 ? pos0 + 1 - a->window : 0;
    for (long k0 = lo; k0 <= last; k0 += TILE) {
        const long nk = last + 1 - k0 < TILE ? last + 1 - k0 : TILE;
        for (long j = 0; j < TILE; j++) {
            float *kd = Kf + j * D, *vd = Vf + j * D;
            if (j < nk) {
                const char *kr = key_row(a, a->kc, tab, hk, k0 + j), *vr = key_row(a, a->vc, tab, hk, k0 + j);
                for (long d = 0; d < D; d += 16) {
                    __mmask16 k = lanes16(D - d);
                    _mm512_mask_storeu_ps(kd + d, k, load16(dt, kr, d, k));
                    _mm512_mask_storeu_ps(vd + d, k, load16(dt, vr, d, k));
                }
            } else {
                memset(kd, 0, (size_t)D * sizeof(float));
                memset(vd, 0, (size_t)D * sizeof(float));
            }
        }
        /* does any (row, key) pair of this tile fall outside the causal window? */
        const int masked = nk < TILE || k0 + TILE - 1 > pos0 || (a->window > 0 && k0 <= last - a->window);
        __mmask16 valid[TILE];
        if (masked)
            for (long j = 0; j < TILE; j++) {
                long rel = k0 + j - pos0;  /* row i sees this key when i >= rel (and i < rel + window) */
                __mmask16 v = j < nk ? _mm512_cmpge_epi32_mask(iota, _mm512_set1_epi32((int)(rel < -1 ? -1 : rel)))
                                     : (__mmask16)0;
                if (a->window > 0) v &= _mm512_cmplt_epi32_mask(iota, _mm512_set1_epi32((int)(rel + a->window > 16 ? 16 : rel + a->window)));
                valid[j] = v;
            }
        for (long g = 0; g < G; g++) {
            const float *qg = Qt + g * D * TILE;
            __m512 s[TILE];
#pragma GCC unroll 16
            for (long j = 0; j < TILE; j++) s[j] = _mm512_setzero_ps();
            for (long d = 0; d < D; d++) {
                __m512 qd = _mm512_loadu_ps(qg + d * TILE);
#pragma GCC unroll 16
                for (long j = 0; j < TILE; j++) s[j] = _mm512_fmadd_ps(qd, _mm512_set1_ps(Kf[j * D + d]), s[j]);
            }
            __m512 mt = ninf;
#pragma GCC unroll 16
            for (long j = 0; j < TILE; j++) {
                s[j] = _mm512_mul_ps(s[j], vscale);
                if (a->softcap > 0.f) {
                    __m512 cap = _mm512_set1_ps(a->softcap);
                    s[j] = _mm512_mul_ps(cap, tanh16(_mm512_div_ps(s[j], cap)));
                }
                if (masked) s[j] = _mm512_mask_mov_ps(ninf, valid[j], s[j]);
                mt = _mm512_max_ps(mt, s[j]);
            }
            __m512 mold = _mm512_loadu_ps(mb + g * TILE), mnew = _mm512_max_ps(mold, mt);
            __m512 msafe = _mm512_mask_mov_ps(mnew, _mm512_cmp_ps_mask(mnew, ninf, _CMP_EQ_OQ), _mm512_setzero_ps());
            __m512 alpha = exp16(_mm512_sub_ps(mold, msafe)), tot = _mm512_setzero_ps();
#pragma GCC unroll 16
            for (long j = 0; j < TILE; j++) {
                s[j] = exp16(_mm512_sub_ps(s[j], msafe));
                if (masked) s[j] = _mm512_maskz_mov_ps(valid[j], s[j]);
                tot = _mm512_add_ps(tot, s[j]);
            }
            _mm512_storeu_ps(mb + g * TILE, mnew);
            _mm512_storeu_ps(lb + g * TILE, _mm512_fmadd_ps(_mm512_loadu_ps(lb + g * TILE), alpha, tot));
            float *og = Ot + g * D * TILE;
            long d = 0;
            for (; d + 8 <= D; d += 8) {
                __m512 o[8];
#pragma GCC unroll 8
                for (long u = 0; u < 8; u++) o[u] = _mm512_mul_ps(_mm512_loadu_ps(og + (d + u) * TILE), alpha);
#pragma GCC unroll 16
                for (long j = 0; j < TILE; j++) {
#pragma GCC unroll 8
                    for (long u = 0; u < 8; u++) o[u] = _mm512_fmadd_ps(s[j], _mm512_set1_ps(Vf[j * D + d + u]), o[u]);
                }
#pragma GCC unroll 8
                for (long u = 0; u < 8; u++) _mm512_storeu_ps(og + (d + u) * TILE, o[u]);
            }
            for (; d < D; d++) {
                __m512 o = _mm512_mul_ps(_mm512_loadu_ps(og + d * TILE), alpha);
                for (long j = 0; j < TILE; j++) o = _mm512_fmadd_ps(s[j], _mm512_set1_ps(Vf[j * D + d]), o);
                _mm512_storeu_ps(og + d * TILE, o);
            }
        }
    }
    for (long g = 0; g < G; g++) {
        const float *og = Ot + g * D * TILE, *m = mb + g * TILE, *l = lb + g * TILE;
        long h = hk * G + g;
        for (long i = 0; i < nr; i++) {
            float inv = l[i] > 0.f ? 1.0f / l[i] : 0.f;
            char *orow = a->out + (size_t)(((t0 + i) * a->Hq + h) * D) * a->esz;
            for (long d = 0; d < D; d++) store1(dt, orow, d, og[d * TILE + i] * inv);
            if (a->lse) a->lse[(t0 + i) * a->Hq + h] = l[i] > 0.f ? m[i] + logf(l[i]) : -INFINITY;
        }
    }
}
#define TILE_MIN_ROWS 4  /* fewer query rows of a sequence: attend_pos per row */
#else
#define TILE 1
#define TILE_MIN_ROWS (1L << 62)
#endif

struct attn_task {
    long s, hk, row, nr;  /* sequence, KV head, first query row within the chunk, rows */
    long cost;
};

static int by_cost_desc(const void *x, const void *y) {
    long a = ((const struct attn_task *)x)->cost, b = ((const struct attn_task *)y)->cost;
    return (a < b) - (a > b);
}

/* Attention of every sequence's query chunk over its paged context (module comment above). q [T, Hq, D] (token and
 * head strides sqt, sqh); out [T, Hq, D] contiguous; lse [T, Hq] float32 or NULL. Sequence s has context length
 * ctx[s], its ql[s] query rows start at row qs[s], its block ids are tables[s * ldt ...]. Returns the number of
 * lengths, row ranges or block ids out of range (then nothing is computed). */
long ss_paged_attention(int dt, const void *q, long sqt, long sqh, void *out, const void *cache, long Hk, long NB,
                        long BS, long D, const int64_t *tables, long ldt, const int64_t *ctx, const int64_t *ql,
                        const int64_t *qs, long S, long T, long Hq, float scale, long window, float softcap,
                        float *lse, int nthreads) {
    long bad = 0, ntasks = 0, max_ctx = 1, work = 0;
    for (long s = 0; s < S; s++) {
        if (ctx[s] < 0 || ctx[s] > ldt * BS || ql[s] < 0 || ql[s] > ctx[s] || qs[s] < 0 || qs[s] + ql[s] > T) {
            bad++;
            continue;
        }
        for (long b = 0; b < (ctx[s] + BS - 1) / BS; b++) bad += tables[s * ldt + b] < 0 || tables[s * ldt + b] >= NB;
        ntasks += ql[s] >= TILE_MIN_ROWS ? (ql[s] + TILE - 1) / TILE : ql[s];
        max_ctx = ctx[s] > max_ctx ? ctx[s] : max_ctx;
        work += ql[s] * ctx[s];
    }
    if (bad || Hk <= 0 || Hq % Hk) return bad + (Hk <= 0 || Hq % Hk);
    ntasks *= Hk;
    struct attn_args a = {dt, dt ? 2 : 4, (const char *)q, sqt, sqh, (char *)out, lse, (const char *)cache,
                          (const char *)cache + (size_t)(Hk * NB * BS * D) * (dt ? 2 : 4), Hk, Hq, Hq / Hk, NB, BS, D,
                          scale, softcap, window};
    struct attn_task *tasks = (struct attn_task *)malloc((size_t)(ntasks > 0 ? ntasks : 1) * sizeof(struct attn_task));
    if (!tasks) return -1;
    long n = 0;
    for (long s = 0; s < S; s++) {
        long L = ctx[s], first = L - ql[s];  /* position of the chunk's first row */
        long step = ql[s] >= TILE_MIN_ROWS ? TILE : 1;
        for (long r = 0; r < ql[s]; r += step) {
            long nr = ql[s] - r < step ? ql[s] - r : step, keys = first + r + nr;
            if (window > 0 && keys > window + nr) keys = window + nr;
            for (long hk = 0; hk < Hk; hk++)
                tasks[n++] = (struct attn_task){s, hk, r, nr, keys * (step == 1 ? 4 : TILE)};
        }
    }
    qsort(tasks, (size_t)n, sizeof(struct attn_task), by_cost_desc);  /* longest first: even finish across threads */
    const long G = Hq / Hk;
    const long wtile = 2 * G * D * 16 + 2 * 16 * D + 2 * G * 16;
    const long Dq = (D + 63) & ~63L, wpos = G * (3 * Dq + max_ctx + 4);
    const size_t wsize = (size_t)(wtile > wpos ? wtile : wpos) * sizeof(float);
    int fail = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && n > 1 && work * Hq * D >= 65536)
    {
        float *w = (float *)aligned_alloc(64, (wsize + 63) & ~(size_t)63);
        if (!w) {
#pragma omp atomic write
            fail = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (long i = 0; i < n; i++) {
            if (!w) continue;
            const struct attn_task *tk = &tasks[i];
            const int64_t *tab = tables + tk->s * ldt;
            long t0 = qs[tk->s] + tk->row, pos0 = ctx[tk->s] - ql[tk->s] + tk->row;
#ifdef SS_AVX512
            if (tk->nr > 1 || ql[tk->s] >= TILE_MIN_ROWS) {
                attend_tile(&a, tab, tk->hk, t0, pos0, tk->nr, w);
                continue;
            }
#endif
            attend_pos(&a, tab, tk->hk, t0, pos0, w);
        }
        free(w);
    }
    free(tasks);
    return fail ? -1 : 0;
}

/* One query token per sequence (a decode step): q [Sq, Hq, D] (strides sqs, sqh), out [Sq, Hq, D] contiguous, the
 * query of sequence s at position lens[s] - 1 (a sequence with lens[s] == 0 gets zeros and lse -inf). */
long ss_decode_attention(int dt, const void *q, long sqs, long sqh, void *out, const void *cache, long Hk, long NB,
                         long BS, long D, const int64_t *tables, long ldt, const int64_t *lens, long Sq, long Hq,
                         float scale, long window, float softcap, float *lse, int nthreads) {
    int64_t *ql = (int64_t *)malloc((size_t)(2 * (Sq > 0 ? Sq : 1)) * sizeof(int64_t));
    if (!ql) return -1;
    int64_t *qs = ql + Sq;
    for (long s = 0; s < Sq; s++) {
        ql[s] = lens[s] > 0;
        qs[s] = s;
        if (lens[s] == 0) {
            memset((char *)out + (size_t)(s * Hq * D) * (dt ? 2 : 4), 0, (size_t)(Hq * D) * (dt ? 2 : 4));
            if (lse)
                for (long h = 0; h < Hq; h++) lse[s * Hq + h] = -INFINITY;
        }
    }
    long bad = ss_paged_attention(dt, q, sqs, sqh, out, cache, Hk, NB, BS, D, tables, ldt, lens, ql, qs, Sq, Sq, Hq,
                                  scale, window, softcap, lse, nthreads);
    free(ql);
    return bad;
}
