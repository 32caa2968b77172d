/* shardserve CPU kernels: the small-batch GEMV and the per-token ops of a decode step, so that a batch-1 step on a
 * CPU reads its weights at memory bandwidth and does not pay a chain of small torch ops per layer.
 *
 * Built at first use by shardserve/layers/cpu/build.py (gcc -O3 -march=native -fopenmp), loaded with ctypes. The
 * OpenMP runtime is the one torch already loaded (same soname), so these kernels share torch's thread pool.
 *
 * dtype codes: 0 = float32, 1 = bfloat16. Every kernel accumulates in float32 and rounds to the tensor dtype with
 * round-to-nearest-even, at the same points as the torch reference ops (see shardserve/layers/cpu/ops.py). Strides
 * are in elements; the last dim of every tensor is contiguous. */
#include "common.h"

int ss_abi_version(void) { return 2; }

/* 1 when AMX bf16 tiles can run in this process: built with AMX and the kernel grants the tile state (Linux asks
 * each process to request it; a CPU that lists amx_* flags in a VM that does not enable them gets 0) */
int ss_amx_available(void) {
#ifdef SS_AMX
    static int state = -1;
    if (state < 0) {
        unsigned long mask = 0;
        const long get_perm = 0x1022, req_perm = 0x1023, xtiledata = 18;  /* ARCH_{GET,REQ}_XCOMP_PERM */
        if (syscall(SYS_arch_prctl, get_perm, &mask) == 0 && (mask & (1UL << xtiledata)))
            state = 1;
        else
            state = syscall(SYS_arch_prctl, req_perm, xtiledata) == 0;
    }
    return state;
#else
    return 0;
#endif
}

int ss_has_avx512(void) {
#ifdef SS_AVX512
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------------------------------------------------------
 * linear: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for m < M, n < N.
 * x, w, bias and y share dtype dt; x rows at stride ldx, w rows at ldw, y rows at ldy. Meant for small M (decode):
 * each weight row is read once from memory for all M rows of x. Rounding: the fp32 sum plus the bias, rounded once
 * (torch's CPU GEMM accumulates in fp32 too). */

#ifdef SS_AVX512
#define MR 4   /* x rows per tile */
#define NR 4   /* weight rows per tile */
#define PF_TILES 2  /* software prefetch of the weights this many tiles ahead */

/* out[c * NR + r] = x row c . w row r over K; x rows are fp32, zero-padded to a multiple of 16 */
static inline __attribute__((always_inline)) void tile(int dt, int mr, const float *const *xr,
                                                        const void *const *wr, long K, long pf, float *out) {
    __m512 acc[MR][NR];
    for (int c = 0; c < MR; c++)
        for (int r = 0; r < NR; r++) acc[c][r] = _mm512_setzero_ps();
    long k = 0;
    size_t esz = dt ? 2 : 4;
    for (; k + 16 <= K; k += 16) {
        __m512 wv[NR];
        for (int r = 0; r < NR; r++) {
            wv[r] = load16(dt, wr[r], k, 0xffff);
            _mm_prefetch((const char *)wr[r] + (k + pf) * esz, _MM_HINT_T0);
        }
        for (int c = 0; c < MR; c++) {
            if (c >= mr) break;
            __m512 xv = _mm512_loadu_ps(xr[c] + k);
            for (int r = 0; r < NR; r++) acc[c][r] = _mm512_fmadd_ps(xv, wv[r], acc[c][r]);
        }
    }
    if (k < K) {
        __mmask16 m = (__mmask16)((1u << (K - k)) - 1u);
        __m512 wv[NR];
        for (int r = 0; r < NR; r++) wv[r] = load16(dt, wr[r], k, m);
        for (int c = 0; c < MR; c++) {
            if (c >= mr) break;
            __m512 xv = _mm512_loadu_ps(xr[c] + k);
            for (int r = 0; r < NR; r++) acc[c][r] = _mm512_fmadd_ps(xv, wv[r], acc[c][r]);
        }
    }
    for (int c = 0; c < mr; c++) _mm_storeu_ps(out + c * NR, hsum4(acc[c][0], acc[c][1], acc[c][2], acc[c][3]));
}

static void tile_dispatch(int dt, int mr, const float *const *xr, const void *const *wr, long K, long pf,
                          float *out) {
    /* constant mr per call site, so each unrolls with its accumulators in registers */
    switch (mr) {
    case 1: tile(dt, 1, xr, wr, K, pf, out); break;
    case 2: tile(dt, 2, xr, wr, K, pf, out); break;
    case 3: tile(dt, 3, xr, wr, K, pf, out); break;
    default: tile(dt, 4, xr, wr, K, pf, out); break;
    }
}

#ifdef __AVX512BF16__
/* bf16 x bf16 with VDPBF16PS: 32 weights per instruction, products exact, summed in fp32. x rows are bf16,
 * zero-padded to a multiple of 32. */
static inline __attribute__((always_inline)) void tile_bf16(int mr, const bf16 *const *xr, const void *const *wr,
                                                             long K, long pf, float *out) {
    __m512 acc[MR][NR];
    for (int c = 0; c < MR; c++)
        for (int r = 0; r < NR; r++) acc[c][r] = _mm512_setzero_ps();
    long k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512i wv[NR];
        for (int r = 0; r < NR; r++) {
            wv[r] = _mm512_loadu_si512((const void *)((const bf16 *)wr[r] + k));
            _mm_prefetch((const char *)((const bf16 *)wr[r] + k + pf), _MM_HINT_T0);
        }
        for (int c = 0; c < MR; c++) {
            if (c >= mr) break;
            __m512i xv = _mm512_loadu_si512((const void *)(xr[c] + k));
            for (int r = 0; r < NR; r++)
                acc[c][r] = _mm512_dpbf16_ps(acc[c][r], (__m512bh)xv, (__m512bh)wv[r]);
        }
    }
    if (k < K) {
        __mmask32 m = (__mmask32)((1u << (K - k)) - 1u);
        __m512i wv[NR];
        for (int r = 0; r < NR; r++) wv[r] = _mm512_maskz_loadu_epi16(m, (const bf16 *)wr[r] + k);
        for (int c = 0; c < MR; c++) {
            if (c >= mr) break;
            __m512i xv = _mm512_loadu_si512((const void *)(xr[c] + k));
            for (int r = 0; r < NR; r++)
                acc[c][r] = _mm512_dpbf16_ps(acc[c][r], (__m512bh)xv, (__m512bh)wv[r]);
        }
    }
    for (int c = 0; c < mr; c++) _mm_storeu_ps(out + c * NR, hsum4(acc[c][0], acc[c][1], acc[c][2], acc[c][3]));
}

static void tile_bf16_dispatch(int mr, const bf16 *const *xr, const void *const *wr, long K, long pf, float *out) {
    switch (mr) {
    case 1: tile_bf16(1, xr, wr, K, pf, out); break;
    case 2: tile_bf16(2, xr, wr, K, pf, out); break;
    case 3: tile_bf16(3, xr, wr, K, pf, out); break;
    default: tile_bf16(4, xr, wr, K, pf, out); break;
    }
}
#define SS_DPBF16 1
#endif
#endif

#ifdef SS_AMX
#define AMX_PANEL 256  /* rows of x per pass over the weights: their k-pair panels (256 x K x 2 bytes) stay in L2 */

struct ss_tilecfg {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* r[0..15] (rows) -> its transpose, in place: 48 shuffles (unpack pairs, 4-row groups, then 128-bit lanes) */
static inline void transpose16(__m512 *r) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);      /* a0 b0 a1 b1 per 128-bit lane */
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);  /* a2 b2 a3 b3 */
    }
    for (int i = 0; i < 4; i++) {
        u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);      /* a0 b0 c0 d0 per lane: columns 0 4 8 12 */
        u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);  /* columns 1 5 9 13 */
        u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int c = 0; c < 4; c++) {  /* u[c], u[4 + c], u[8 + c], u[12 + c]: rows a-d, e-h, i-l, m-p of columns c, c+4, c+8, c+12 */
        __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
        __m512 v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88), v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
        r[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
        r[c + 8] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
        r[c + 4] = _mm512_shuffle_f32x4(v1, v3, 0x88);
        r[c + 12] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
    }
}

/* bf16 y[m, n] (+ bias[n]) for n < nfull (a multiple of 16), K % 32 == 0, with AMX: y^T = w . x^T, so the weight
 * rows load straight into the A tile (16 rows x 32 k) and only x is rearranged, into k-pair panels for the B tile.
 * Per pass of AMX_PANEL rows of x the weights stream from memory once; inside a pass each block of 16 weight rows
 * (16 x K bf16, in L1) serves the pass's rows 64 at a time (4 accumulator tiles). So decode (a few rows) reads the
 * weights at bandwidth for any row count up to 256, and prefill runs at the tiles' rate. */
static void linear_amx(const bf16 *x, long ldx, const bf16 *w, long ldw, const bf16 *bias, void *y, int out_dt,
                       long ldy, long M, long nfull, long K, int nthreads) {
    long kp = K / 2, nblocks = nfull / 16;
    long panel_rows = M < AMX_PANEL ? M : AMX_PANEL;
    uint32_t *xv = (uint32_t *)aligned_alloc(64, (size_t)(((panel_rows + 15) / 16) * kp * 16) * 4);
    if (!xv) return;
    for (long p0 = 0; p0 < M; p0 += AMX_PANEL) {
        long pm = M - p0 < AMX_PANEL ? M - p0 : AMX_PANEL, mb = (pm + 15) / 16;
        for (long b = 0; b < mb; b++)  /* panel b, row r: (x[m][2r], x[m][2r + 1]) at column m % 16, m = 16 b + .. */
            for (long r0 = 0; r0 < kp; r0 += 16) {
                __m512 rows[16];
                __mmask16 k = lanes16(kp - r0);
                for (long i = 0; i < 16; i++)
                    rows[i] = 16 * b + i < pm ? _mm512_maskz_loadu_ps(k, x + (p0 + 16 * b + i) * ldx + 2 * r0)
                                              : _mm512_setzero_ps();
                transpose16(rows);
                for (long i = 0; i < 16 && r0 + i < kp; i++) _mm512_storeu_ps(xv + (b * kp + r0 + i) * 16, rows[i]);
            }
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && nblocks >= 16)
        {
            struct ss_tilecfg cfg;
            memset(&cfg, 0, sizeof cfg);
            cfg.palette = 1;
            for (int t = 0; t < 6; t++) { /* 0-3: C (16 n x 16 m fp32), 4: A (16 n x 32 k), 5: B (16 k pairs x 16 m) */
                cfg.rows[t] = 16;
                cfg.colsb[t] = 64;
            }
            _tile_loadconfig(&cfg);
            long nt = omp_get_num_threads(), tid = omp_get_thread_num();
            long b0 = nblocks * tid / nt, b1 = nblocks * (tid + 1) / nt;
            float out[16 * 16];
            for (long nb = b0; nb < b1; nb++) {
                const bf16 *wb = w + nb * 16 * ldw;
                for (long q0 = 0; q0 < mb; q0 += 4) {  /* up to 4 blocks of 16 rows of x per accumulation */
                    long g = mb - q0 < 4 ? mb - q0 : 4;
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                    for (long k0 = 0; k0 < K; k0 += 32) {
                        if (q0 == 0)
                            for (int r = 0; r < 16; r++)  /* the next block's rows, one line each per k step */
                                _mm_prefetch((const char *)(wb + (16 * PF_TILES / 2 + r) * ldw + k0), _MM_HINT_T0);
                        _tile_loadd(4, wb + k0, ldw * 2);
                        const uint32_t *xb = xv + (q0 * kp + k0 / 2) * 16;
                        _tile_loadd(5, xb, 64);
                        _tile_dpbf16ps(0, 4, 5);
                        if (g > 1) { _tile_loadd(5, xb + kp * 16, 64); _tile_dpbf16ps(1, 4, 5); }
                        if (g > 2) { _tile_loadd(5, xb + 2 * kp * 16, 64); _tile_dpbf16ps(2, 4, 5); }
                        if (g > 3) { _tile_loadd(5, xb + 3 * kp * 16, 64); _tile_dpbf16ps(3, 4, 5); }
                    }
                    for (long j = 0; j < g; j++) {
                        switch (j) {
                        case 0: _tile_stored(0, out, 64); break;
                        case 1: _tile_stored(1, out, 64); break;
                        case 2: _tile_stored(2, out, 64); break;
                        default: _tile_stored(3, out, 64); break;
                        }
                        long m0 = p0 + (q0 + j) * 16;
                        __m512 cols[16];  /* out is [16 n][16 m]: transposed, row c is y[m0 + c][nb * 16 ..] */
                        for (int n = 0; n < 16; n++) cols[n] = _mm512_loadu_ps(out + n * 16);
                        transpose16(cols);
                        __m512 bv = bias ? load16(1, bias, nb * 16, 0xffff) : _mm512_setzero_ps();
                        for (long c = 0; c < 16 && m0 + c < M; c++)
                            store16(out_dt, y, (m0 + c) * ldy + nb * 16, _mm512_add_ps(cols[c], bv), 0xffff);
                    }
                }
            }
            _tile_release();
        }
    }
    free(xv);
}
#endif

int ss_linear_max_rows(int dt, long K) {  /* most rows ss_linear is meant for (more: torch's GEMM is faster) */
#ifdef SS_AMX
    if (dt && K % 32 == 0 && ss_amx_available()) return 1 << 30;  /* AMX: ahead of torch's bf16 GEMM below ~64 rows, level with it above */
#endif
    (void)dt;
    (void)K;
    return 8;
}

static void linear_impl(int dt, int out_dt, const void *x, long ldx, const void *w, long ldw, const void *bias,
                        void *y, long ldy, long M, long N, long K, int nthreads) {
    long n_begin = 0;  /* rows below this were computed with AMX */
#ifdef SS_AMX
    if (dt && M >= 3 && K % 32 == 0 && N >= 16 && ss_amx_available()) {
        n_begin = N & ~15L;
        linear_amx((const bf16 *)x, ldx, (const bf16 *)w, ldw, (const bf16 *)bias, y, out_dt, ldy, M, n_begin, K,
                   nthreads);
        if (n_begin == N) return;
    }
#endif
    long kp = (K + 31) & ~31L;
    float *xf = (float *)aligned_alloc(64, (size_t)(M * kp) * sizeof(float));
    if (!xf) return;
    size_t esz = dt ? 2 : 4;
#ifdef SS_DPBF16
    bf16 *xb = (bf16 *)xf;  /* bf16 rows of kp elements in the same buffer */
    if (dt)
        for (long m = 0; m < M; m++) {
            memcpy(xb + m * kp, (const char *)x + m * ldx * esz, (size_t)K * esz);
            memset(xb + m * kp + K, 0, (size_t)(kp - K) * esz);
        }
    else
#endif
    for (long m = 0; m < M; m++) {
        to_f32(dt, (const char *)x + m * ldx * esz, xf + m * kp, K);
        memset(xf + m * kp + K, 0, (size_t)(kp - K) * sizeof(float));
    }
#ifdef SS_AVX512
    long nblocks = (N - n_begin + NR - 1) / NR;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && N - n_begin >= 256)
    {
    /* contiguous row blocks per thread, each a sequential stream; its first tiles are prefetched up front (the
     * prefetch in the tile loop runs PF_TILES tiles ahead, so they would otherwise start cold) */
    long nt = omp_get_num_threads(), tid = omp_get_thread_num();
    long b0 = nblocks * tid / nt, b1 = nblocks * (tid + 1) / nt;
    long warm_rows = (b1 - b0) * NR < PF_TILES * NR ? (b1 - b0) * NR : PF_TILES * NR;
    if (n_begin + b0 * NR + warm_rows > N) warm_rows = N - n_begin - b0 * NR;
    const char *first = (const char *)w + (n_begin + b0 * NR) * ldw * esz;
    for (long r = 0; r < warm_rows; r++)
        for (long off = 0; off < K * (long)esz; off += 64) _mm_prefetch(first + (r * ldw) * esz + off, _MM_HINT_T0);
    for (long nb = b0; nb < b1; nb++) {
        long n0 = n_begin + nb * NR;
        const void *wr[NR];
        for (int r = 0; r < NR; r++) {
            long n = n0 + r < N ? n0 + r : N - 1;  /* a short last block recomputes row N-1, not stored */
            wr[r] = (const char *)w + n * ldw * esz;
        }
        for (long m0 = 0; m0 < M; m0 += MR) {
            int mr = (int)(M - m0 < MR ? M - m0 : MR);
            float out[MR * NR];
#ifdef SS_DPBF16
            if (dt) {
                const bf16 *xbr[MR];
                for (int c = 0; c < MR; c++) xbr[c] = xb + (m0 + (c < mr ? c : 0)) * kp;
                tile_bf16_dispatch(mr, xbr, wr, K, m0 == 0 ? PF_TILES * NR * ldw : 0, out);
            } else
#endif
            {
                const float *xr[MR];
                for (int c = 0; c < MR; c++) xr[c] = xf + (m0 + (c < mr ? c : 0)) * kp;
                tile_dispatch(dt, mr, xr, wr, K, m0 == 0 ? PF_TILES * NR * ldw : 0, out);
            }
            for (int c = 0; c < mr; c++)
                for (int r = 0; r < NR && n0 + r < N; r++) {
                    float v = out[c * NR + r];
                    if (bias) v += load1(dt, bias, n0 + r);
                    store1(out_dt, y, (m0 + c) * ldy + n0 + r, v);
                }
        }
    }
    }
#else
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && N - n_begin >= 256)
    for (long n = n_begin; n < N; n++) {
        const char *wrow = (const char *)w + n * ldw * esz;
        for (long m = 0; m < M; m++) {
            float v = dot_f32(dt, xf + m * kp, wrow, K);
            if (bias) v += load1(dt, bias, n);
            store1(out_dt, y, m * ldy + n, v);
        }
    }
#endif
    free(xf);
}

/* y in x's dtype (F.linear) */
void ss_linear(int dt, const void *x, long ldx, const void *w, long ldw, const void *bias, void *y, long ldy,
               long M, long N, long K, int nthreads) {
    linear_impl(dt, dt, x, ldx, w, ldw, bias, y, ldy, M, N, K, nthreads);
}

/* y in float32: the fp32 sums unrounded (logits: a bf16 LM head's outputs near 20 would round in steps of 0.125) */
void ss_linear_f32out(int dt, const void *x, long ldx, const void *w, long ldw, const void *bias, float *y, long ldy,
                      long M, long N, long K, int nthreads) {
    linear_impl(dt, 0, x, ldx, w, ldw, bias, y, ldy, M, N, K, nthreads);
}

/* ---------------------------------------------------------------------------------------------------------------
 * rms_norm over rows of H: with res (fused add): s = round(x + res), res_out = s; then
 * out = round(w * round(s * rsqrt(mean(s^2) + eps))) -- RMSNorm._norm's order (normalise in fp32, cast, weight). */
void ss_rms_norm(int dt, const void *x, long ldx, const void *res, long ldr, const void *w, void *out, long ldo,
                 void *res_out, long ldro, long T, long H, float eps, int nthreads) {
    size_t esz = dt ? 2 : 4;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && T * H >= 16384)
    for (long t = 0; t < T; t++) {
        const char *xt = (const char *)x + t * ldx * esz;
        float *s = (float *)malloc((size_t)(H + 16) * sizeof(float));
        if (!s) continue;
        const char *rt = res ? (const char *)res + t * ldr * esz : NULL;
        char *rot = res ? (char *)res_out + t * ldro * esz : NULL;
        float ss = 0.f;
        long i = 0;
#ifdef SS_AVX512
        __m512 acc = _mm512_setzero_ps();
        for (; i < H; i += 16) {  /* the residual add rounded to the dtype, as the reference keeps it */
            __mmask16 m = lanes16(H - i);
            __m512 v = load16(dt, xt, i, m);
            if (res) {
                v = round16(dt, _mm512_add_ps(v, load16(dt, rt, i, m)));
                store16(dt, rot, i, v, m);
            }
            _mm512_storeu_ps(s + i, v);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        ss = _mm512_reduce_add_ps(acc);
#else
        for (; i < H; i++) {
            s[i] = load1(dt, xt, i);
            if (res) {
                s[i] = round_dt(dt, s[i] + load1(dt, rt, i));
                store1(dt, rot, i, s[i]);
            }
            ss += s[i] * s[i];
        }
#endif
        float r = 1.0f / sqrtf(ss / (float)H + eps);
        char *ot = (char *)out + t * ldo * esz;
        i = 0;
#ifdef SS_AVX512
        for (__m512 vr = _mm512_set1_ps(r); i < H; i += 16) {
            __mmask16 m = lanes16(H - i);
            store16(dt, ot, i, _mm512_mul_ps(load16(dt, w, i, m), round16(dt, _mm512_mul_ps(_mm512_loadu_ps(s + i), vr))), m);
        }
#endif
        for (; i < H; i++) store1(dt, ot, i, load1(dt, w, i) * round_dt(dt, s[i] * r));
        free(s);
    }
}


/* silu_and_mul: x [T, 2I] = [gate | up] -> out [T, I] = round(round(silu(gate)) * up); silu in fp32 (the exp
 * vectorized with AVX-512), then the reference's two roundings */
void ss_silu_and_mul(int dt, const void *x, long ldx, void *out, long ldo, long T, long I, int nthreads) {
    size_t esz = dt ? 2 : 4;
    long total = T * I;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && total >= 16384)
    for (long t = 0; t < T; t++) {
        const char *xt = (const char *)x + t * ldx * esz;
        char *ot = (char *)out + t * ldo * esz;
        long i = 0;
#ifdef SS_AVX512
        for (; i < I; i += 16) {
            __mmask16 m = lanes16(I - i);
            __m512 g = load16(dt, xt, i, m);
            __m512 a = round16(dt, _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(
                _mm512_setzero_ps(), g)))));
            store16(dt, ot, i, _mm512_mul_ps(a, load16(dt, xt, I + i, m)), m);
        }
#endif
        for (; i < I; i++) {
            float g = load1(dt, xt, i);
            float a = round_dt(dt, g / (1.0f + expf(-g)));
            store1(dt, ot, i, a * load1(dt, xt, I + i));
        }
    }
}

/* rotary (neox, rotate-half) of q [T, Hq, D] and k [T, Hk, D] (token and head strides given) into contiguous
 * qo [T, Hq, D] and ko [T, Hk, D]; cos/sin [P, D] float32 rows picked by pos[t]; fp32 math, one rounding. */
static void rotate_rows(int dt, const void *x, long st, long sh, long H, void *o, long T, long D,
                        const int64_t *pos, const float *cosc, const float *sinc, int nthreads) {
    size_t esz = dt ? 2 : 4;
    long half = D / 2;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && T * H * D >= 32768)
    for (long t = 0; t < T; t++) {
        const float *c = cosc + pos[t] * D, *s = sinc + pos[t] * D;
        for (long h = 0; h < H; h++) {
            const char *xr = (const char *)x + (t * st + h * sh) * esz;
            char *orow = (char *)o + (t * H + h) * D * esz;
            long i = 0;
#ifdef SS_AVX512
            for (; i < half; i += 16) {  /* separate products and sum (no FMA): the scalar code's rounding */
                __mmask16 m = lanes16(half - i);
                __m512 a = load16(dt, xr, i, m), b = load16(dt, xr, i + half, m);
                __m512 c0 = _mm512_maskz_loadu_ps(m, c + i), c1 = _mm512_maskz_loadu_ps(m, c + half + i);
                __m512 s0 = _mm512_maskz_loadu_ps(m, s + i), s1 = _mm512_maskz_loadu_ps(m, s + half + i);
                store16(dt, orow, i, _mm512_sub_ps(_mm512_mul_ps(a, c0), _mm512_mul_ps(b, s0)), m);
                store16(dt, orow, i + half, _mm512_add_ps(_mm512_mul_ps(b, c1), _mm512_mul_ps(a, s1)), m);
            }
#endif
            for (; i < half; i++) {
                float a = load1(dt, xr, i), b = load1(dt, xr, i + half);
                store1(dt, orow, i, a * c[i] - b * s[i]);
                store1(dt, orow, i + half, b * c[i + half] + a * s[i + half]);
            }
        }
    }
}

/* returns the number of positions outside [0, P) (then nothing is written) */
long ss_rotary(int dt, const void *q, long sqt, long sqh, long Hq, const void *k, long skt, long skh, long Hk,
               void *qo, void *ko, const int64_t *pos, const float *cosc, const float *sinc, long P, long T, long D,
               int nthreads) {
    long bad = 0;
    for (long t = 0; t < T; t++) bad += pos[t] < 0 || pos[t] >= P;
    if (bad) return bad;
    rotate_rows(dt, q, sqt, sqh, Hq, qo, T, D, pos, cosc, sinc, nthreads);
    rotate_rows(dt, k, skt, skh, Hk, ko, T, D, pos, cosc, sinc, nthreads);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * A decode step's layer as two calls (the tensor-parallel all-reduces fall between and after them): the same kernels
 * as above in the same order, with every intermediate rounded to the dtype as the per-op path rounds it, so the
 * fused layer gives the per-op layer's results bit for bit. All T tokens are decodes (one per sequence). */

struct ss_attn_weights {  /* fields are 8 bytes each, mirrored by ctypes in decode_layer.py */
    const void *norm_w;
    double eps;
    int64_t hidden;
    const void *qkv_w, *qkv_b;
    int64_t heads, kv_heads, head_dim;
    const void *q_norm_w, *k_norm_w;  /* per-head RMSNorm of q and k (Qwen3), or NULL */
    double qk_eps;
    const float *cos, *sin;
    int64_t max_pos;
    double scale;
    int64_t window;
    double softcap;
    const void *o_w;
    int64_t o_ldw;
};

/* h = norm(x (+ residual)), residual <- x (+ residual); out [T, hidden] = o_proj(attention(rope(qkv_proj(h))));
 * has_res = 0: residual <- x. Returns the count of out-of-range positions/block ids (then out is not written). */
long ss_attn_block(const struct ss_attn_weights *w, int dt, const void *x, void *residual, int has_res, void *out,
                   void *kv_cache, int64_t blocks, int64_t block_size, const int64_t *pos, const int64_t *slots,
                   const int64_t *tables, int64_t ldt, const int64_t *lens, int64_t T, int nthreads) {
    size_t esz = dt ? 2 : 4;
    long H = w->hidden, D = w->head_dim, nq = w->heads * D, nkv = w->kv_heads * D, width = nq + 2 * nkv;
    char *buf = (char *)malloc((size_t)(T * (H + width + 2 * nq + nkv)) * esz);
    if (!buf) return -1;
    char *h = buf, *qkv = h + T * H * esz, *q = qkv + T * width * esz, *k = q + T * nq * esz,
         *att = k + T * nkv * esz;
    if (!has_res) memcpy(residual, x, (size_t)(T * H) * esz);
    ss_rms_norm(dt, has_res ? x : residual, H, has_res ? residual : NULL, H, w->norm_w, h, H, residual, H, T, H,
                (float)w->eps, nthreads);
    ss_linear(dt, h, H, w->qkv_w, H, w->qkv_b, qkv, width, T, width, H, nthreads);
    if (w->q_norm_w)
        for (long t = 0; t < T; t++) {
            char *row = qkv + t * width * esz;
            ss_rms_norm(dt, row, D, NULL, 0, w->q_norm_w, row, D, NULL, 0, w->heads, D, (float)w->qk_eps, 1);
            ss_rms_norm(dt, row + nq * esz, D, NULL, 0, w->k_norm_w, row + nq * esz, D, NULL, 0, w->kv_heads, D,
                        (float)w->qk_eps, 1);
        }
    long bad = ss_rotary(dt, qkv, width, D, w->heads, qkv + nq * esz, width, D, w->kv_heads, q, k, pos, w->cos,
                         w->sin, w->max_pos, T, D, nthreads);
    if (!bad) {
        ss_write_kv(dt, k, nkv, D, qkv + (nq + nkv) * esz, width, D, kv_cache, w->kv_heads, blocks * block_size, D,
                    slots, T);
        bad = ss_decode_attention(dt, q, nq, D, att, kv_cache, w->kv_heads, blocks, block_size, D, tables, ldt, lens,
                                  T, w->heads, (float)w->scale, w->window, (float)w->softcap, NULL, nthreads);
    }
    if (!bad) ss_linear(dt, att, nq, w->o_w, w->o_ldw, NULL, out, H, T, H, nq, nthreads);
    free(buf);
    return bad;
}

struct ss_mlp_weights {
    const void *norm_w;
    double eps;
    int64_t hidden, inter;  /* inter: this rank's intermediate size */
    const void *gate_up_w, *down_w;
};

/* h = norm(x + residual), residual <- x + residual; out [T, hidden] = down(silu(gate(h)) * up(h)) */
long ss_mlp_block(const struct ss_mlp_weights *w, int dt, const void *x, void *residual, void *out, int64_t T,
                  int nthreads) {
    size_t esz = dt ? 2 : 4;
    long H = w->hidden, I = w->inter;
    char *buf = (char *)malloc((size_t)(T * (H + 3 * I)) * esz);
    if (!buf) return -1;
    char *h = buf, *gu = h + T * H * esz, *a = gu + T * 2 * I * esz;
    ss_rms_norm(dt, x, H, residual, H, w->norm_w, h, H, residual, H, T, H, (float)w->eps, nthreads);
    ss_linear(dt, h, H, w->gate_up_w, H, NULL, gu, 2 * I, T, 2 * I, H, nthreads);
    ss_silu_and_mul(dt, gu, 2 * I, a, I, T, I, nthreads);
    ss_linear(dt, a, I, w->down_w, I, NULL, out, H, T, H, I, nthreads);
    free(buf);
    return 0;
}

/* A stage's whole stack of L decoder layers for a decode step (tensor parallelism off: nothing to reduce between
 * blocks), one call per step. x [T, hidden] in: the stage's input hidden states, out: the last layer's MLP output;
 * residual in/out as in the blocks (has_res = 0: the first layer starts it from x). kv[l] is layer l's cache. */
long ss_decode_stack(int64_t L, const struct ss_attn_weights *aw, const struct ss_mlp_weights *mw, void *const *kv,
                     int dt, void *x, void *residual, int has_res, int64_t blocks, int64_t block_size,
                     const int64_t *pos, const int64_t *slots, const int64_t *tables, int64_t ldt,
                     const int64_t *lens, int64_t T, int nthreads) {
    size_t esz = dt ? 2 : 4;
    void *tmp = malloc((size_t)(T * aw[0].hidden) * esz);
    if (!tmp) return -1;
    long bad = 0;
    for (int64_t l = 0; l < L && !bad; l++) {
        bad = ss_attn_block(&aw[l], dt, x, residual, has_res || l > 0, tmp, kv[l], blocks, block_size, pos, slots,
                            tables, ldt, lens, T, nthreads);
        if (!bad) bad = ss_mlp_block(&mw[l], dt, tmp, residual, x, T, nthreads);
    }
    free(tmp);
    return bad;
}
