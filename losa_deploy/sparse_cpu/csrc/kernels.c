/* losa-deploy sparse-cpu kernels: y = W x (decode) and Y = X W^T (prefill) for dense, bitmask and N:M weights.
 *
 * Three code paths, chosen at run time (never -march=native): AVX-512 and AVX2 functions carry a target attribute,
 * the portable one is plain C. All paths compute the same canonical sums, so they agree bit for bit on finite data:
 *   gemv: 16 lane accumulators per row (lane b sums columns 16 g + b over the groups g in order, one fused
 *         multiply-add each), then the fixed tree s8[i] = a[i] + a[i+8], s4 = s8[i] + s8[i+4], s2 = s4[i] + s4[i+2],
 *         y = s2[0] + s2[1];
 *   gemm: one fused multiply-add chain per output element over the kept columns in increasing order.
 * Work is split over output rows (balanced by bytes, aligned to the row interleave) on the pool of pool.c, so the
 * result does not depend on the thread count either.
 */
#define _GNU_SOURCE
#include "spkernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sppool.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define SP_X86 1
#else
#define SP_X86 0
#endif

#define ROW_ALIGN 16         /* row interleave of the SIMD gemv kernels; thread splits are multiples of it */
#ifndef GEMV_PF
#define GEMV_PF 1 /* gemv prefetches the next 16-row block into L2 */
#endif
#ifndef TT
#define TT 64 /* tokens per tile of the transposed X in the SIMD gemm kernels */
#endif
#define MAX_PARTS 256
#define MIN_PAR_BYTES 65536  /* below this much weight data a gemv runs on the calling thread only */

static inline int64_t groups_of(const sp_matrix *w) { return (w->cols + 15) / 16; }

/* ------------------------------------------------------------------------------------------------------------ */
/* thread-local scratch of the calling thread (padded x, transposed X)                                          */

/* *buf, 64-byte aligned, grown (a quarter plus `slack` bytes ahead) to hold at least `bytes`; NULL: out of memory */
static void *grow_scratch(void **buf, size_t *cap, size_t bytes, size_t slack) {
    if (bytes > *cap) {
        free(*buf);
        size_t want = bytes + bytes / 4 + slack;
        void *p = NULL;
        if (posix_memalign(&p, 64, want) != 0) {
            *buf = NULL;
            *cap = 0;
            return NULL;
        }
        *buf = p;
        *cap = want;
    }
    return *buf;
}

static __thread void *tl_buf;
static __thread size_t tl_cap; /* bytes */

static float *scratch(size_t nfloats) {
    return grow_scratch(&tl_buf, &tl_cap, nfloats * sizeof(float), 64 * sizeof(float));
}

/* ------------------------------------------------------------------------------------------------------------ */
/* portable path                                                                                               */

static float tree16(const float *a) {
    float s8[8], s4[4], s2[2];
    for (int i = 0; i < 8; i++) s8[i] = a[i] + a[i + 8];
    for (int i = 0; i < 4; i++) s4[i] = s8[i] + s8[i + 4];
    for (int i = 0; i < 2; i++) s2[i] = s4[i] + s4[i + 2];
    return s2[0] + s2[1];
}

static void gemv_dense_portable(const sp_matrix *w, const float *x, float *y, int64_t r0, int64_t r1) {
    const float *W = (const float *)w->values;
    int64_t cols = w->cols;
    for (int64_t r = r0; r < r1; r++) {
        const float *wr = W + r * cols;
        float acc[16] = {0};
        for (int64_t k = 0; k < cols; k++) acc[k & 15] = fmaf(wr[k], x[k], acc[k & 15]);
        y[r] = tree16(acc);
    }
}

static void gemv_sparse_portable(const sp_matrix *w, const float *x, float *y, int64_t r0, int64_t r1) {
    const float *V = (const float *)w->values;
    int64_t G = groups_of(w);
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *mr = w->masks + r * G;
        const float *v = V + w->row_ptr[r];
        float acc[16] = {0};
        for (int64_t g = 0; g < G; g++) {
            unsigned m = mr[g];
            const float *xg = x + 16 * g;
            while (m) {
                int b = __builtin_ctz(m);
                m &= m - 1;
                acc[b] = fmaf(*v++, xg[b], acc[b]);
            }
        }
        y[r] = tree16(acc);
    }
}

static void gemm_dense_portable(const sp_matrix *w, const float *x, const float *xt, int64_t T, float *y,
                                int64_t r0, int64_t r1) {
    (void)xt;
    const float *W = (const float *)w->values;
    int64_t cols = w->cols, rows = w->rows;
    for (int64_t r = r0; r < r1; r++) {
        const float *wr = W + r * cols;
        for (int64_t t = 0; t < T; t++) {
            const float *xr = x + t * cols;
            float acc = 0.0f;
            for (int64_t k = 0; k < cols; k++) acc = fmaf(wr[k], xr[k], acc);
            y[t * rows + r] = acc;
        }
    }
}

static void gemm_sparse_portable(const sp_matrix *w, const float *x, const float *xt, int64_t T, float *y,
                                 int64_t r0, int64_t r1) {
    (void)xt;
    const float *V = (const float *)w->values;
    int64_t G = groups_of(w), cols = w->cols, rows = w->rows;
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *mr = w->masks + r * G;
        for (int64_t t = 0; t < T; t++) {
            const float *xr = x + t * cols;
            const float *v = V + w->row_ptr[r];
            float acc = 0.0f;
            for (int64_t g = 0; g < G; g++) {
                unsigned m = mr[g];
                while (m) {
                    int b = __builtin_ctz(m);
                    m &= m - 1;
                    acc = fmaf(*v++, xr[16 * g + b], acc);
                }
            }
            y[t * rows + r] = acc;
        }
    }
}

#if SP_X86
/* ------------------------------------------------------------------------------------------------------------ */
/* AVX2 path                                                                                                   */

#define AVX2_ATTR __attribute__((target("avx2,fma,bmi,bmi2,popcnt")))

static int32_t lut_perm[256][8];  /* lane b (bit b set) takes packed value popcount(mask & ((1 << b) - 1)) */
static int32_t lut_bits[256][8];  /* -1 in lanes whose bit is set */
static int32_t lut_first[9][8];   /* -1 in the first n lanes */

__attribute__((constructor)) static void init_luts(void) {
    for (int m = 0; m < 256; m++) {
        int j = 0;
        for (int b = 0; b < 8; b++) {
            lut_perm[m][b] = (m >> b & 1) ? j++ : 0;
            lut_bits[m][b] = (m >> b & 1) ? -1 : 0;
        }
    }
    for (int n = 0; n <= 8; n++)
        for (int b = 0; b < 8; b++) lut_first[n][b] = b < n ? -1 : 0;
}

AVX2_ATTR static inline float tree16_avx2(__m256 lo, __m256 hi) {
    __m256 s8 = _mm256_add_ps(lo, hi);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
    return _mm_cvtss_f32(s1);
}

/* 8 packed values expanded into the lanes of an 8-bit mask (zero elsewhere); reads only popcount(m) floats */
AVX2_ATTR static inline __m256 expand8_avx2(unsigned m, const float *v) {
    __m256 p = _mm256_maskload_ps(v, _mm256_loadu_si256((const __m256i *)lut_first[__builtin_popcount(m)]));
    p = _mm256_permutevar8x32_ps(p, _mm256_loadu_si256((const __m256i *)lut_perm[m]));
    return _mm256_and_ps(p, _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)lut_bits[m])));
}

AVX2_ATTR static void gemv_dense_avx2(const sp_matrix *w, const float *x, float *y, int64_t r0, int64_t r1) {
    const float *W = (const float *)w->values;
    int64_t cols = w->cols, full = cols / 16, rem = cols % 16;
    for (int64_t r = r0; r < r1; r++) {
        const float *wr = W + r * cols;
        __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
        for (int64_t g = 0; g < full; g++) {
            lo = _mm256_fmadd_ps(_mm256_loadu_ps(wr + 16 * g), _mm256_loadu_ps(x + 16 * g), lo);
            hi = _mm256_fmadd_ps(_mm256_loadu_ps(wr + 16 * g + 8), _mm256_loadu_ps(x + 16 * g + 8), hi);
        }
        if (rem) {
            const float *wg = wr + 16 * full, *xg = x + 16 * full;
            int a = rem < 8 ? (int)rem : 8, b = rem > 8 ? (int)rem - 8 : 0;
            __m256 wl = _mm256_maskload_ps(wg, _mm256_loadu_si256((const __m256i *)lut_first[a]));
            __m256 wh = _mm256_maskload_ps(wg + 8, _mm256_loadu_si256((const __m256i *)lut_first[b]));
            lo = _mm256_fmadd_ps(wl, _mm256_loadu_ps(xg), lo);
            hi = _mm256_fmadd_ps(wh, _mm256_loadu_ps(xg + 8), hi);
        }
        y[r] = tree16_avx2(lo, hi);
    }
}

AVX2_ATTR static void gemv_sparse_avx2(const sp_matrix *w, const float *x, float *y, int64_t r0, int64_t r1) {
    const float *V = (const float *)w->values;
    int64_t G = groups_of(w);
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *mr = w->masks + r * G;
        const float *v = V + w->row_ptr[r];
        __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
        for (int64_t g = 0; g < G; g++) {
            unsigned m = mr[g], ml = m & 255, mh = m >> 8;
            __m256 wl = expand8_avx2(ml, v);
            v += __builtin_popcount(ml);
            __m256 wh = expand8_avx2(mh, v);
            v += __builtin_popcount(mh);
            lo = _mm256_fmadd_ps(wl, _mm256_loadu_ps(x + 16 * g), lo);
            hi = _mm256_fmadd_ps(wh, _mm256_loadu_ps(x + 16 * g + 8), hi);
        }
        y[r] = tree16_avx2(lo, hi);
    }
}

static void store_tile_column(const float *acc, int64_t nt, float *y, int64_t rows, int64_t t0, int64_t r) {
    for (int64_t t = 0; t < nt; t++) y[(t0 + t) * rows + r] = acc[t];
}

AVX2_ATTR static void gemm_dense_avx2(const sp_matrix *w, const float *x, const float *xt, int64_t T, float *y,
                                      int64_t r0, int64_t r1) {
    (void)x;
    const float *W = (const float *)w->values;
    int64_t cols = w->cols, rows = w->rows, kpad = groups_of(w) * 16, ntile = (T + TT - 1) / TT;
    float acc[TT] __attribute__((aligned(64)));
    for (int64_t tile = 0; tile < ntile; tile++) {
        const float *xtt = xt + tile * kpad * TT;
        int64_t nt = T - tile * TT < TT ? T - tile * TT : TT;
        for (int64_t r = r0; r < r1; r++) {
            const float *wr = W + r * cols;
            __m256 a[8];
            for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
            for (int64_t k = 0; k < cols; k++) {
                __m256 wv = _mm256_broadcast_ss(wr + k);
                const float *p = xtt + k * TT;
                for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(wv, _mm256_load_ps(p + 8 * i), a[i]);
            }
            for (int i = 0; i < 8; i++) _mm256_store_ps(acc + 8 * i, a[i]);
            store_tile_column(acc, nt, y, rows, tile * TT, r);
        }
    }
}

AVX2_ATTR static void gemm_sparse_avx2(const sp_matrix *w, const float *x, const float *xt, int64_t T, float *y,
                                       int64_t r0, int64_t r1) {
    (void)x;
    const float *V = (const float *)w->values;
    int64_t G = groups_of(w), rows = w->rows, kpad = G * 16, ntile = (T + TT - 1) / TT;
    float acc[TT] __attribute__((aligned(64)));
    for (int64_t tile = 0; tile < ntile; tile++) {
        const float *xtt = xt + tile * kpad * TT;
        int64_t nt = T - tile * TT < TT ? T - tile * TT : TT;
        for (int64_t r = r0; r < r1; r++) {
            const uint16_t *mr = w->masks + r * G;
            const float *v = V + w->row_ptr[r];
            __m256 a[8];
            for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
            for (int64_t g = 0; g < G; g++) {
                unsigned m = mr[g];
                const float *xg = xtt + g * 16 * TT;
                while (m) {
                    int b = __builtin_ctz(m);
                    m &= m - 1;
                    __m256 wv = _mm256_broadcast_ss(v++);
                    const float *p = xg + b * TT;
                    for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(wv, _mm256_load_ps(p + 8 * i), a[i]);
                }
            }
            for (int i = 0; i < 8; i++) _mm256_store_ps(acc + 8 * i, a[i]);
            store_tile_column(acc, nt, y, rows, tile * TT, r);
        }
    }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* AVX-512 path                                                                                                */

#define AVX512_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,popcnt")))

AVX512_ATTR static inline float tree16_avx512(__m512 a) {
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
    return _mm_cvtss_f32(s1);
}

AVX512_ATTR static void gemv_dense_avx512(const sp_matrix *w, const float *x, float *y, int64_t r0, int64_t r1) {
    const float *W = (const float *)w->values;
    int64_t cols = w->cols, full = cols / 16, rem = cols % 16;
    __mmask16 tail = (__mmask16)((1u << rem) - 1);
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        const float *w0 = W + r * cols, *w1 = w0 + cols, *w2 = w1 + cols, *w3 = w2 + cols;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t g = 0; g < full; g++) {
            __m512 xv = _mm512_loadu_ps(x + 16 * g);
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + 16 * g), xv, a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + 16 * g), xv, a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + 16 * g), xv, a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + 16 * g), xv, a3);
        }
        if (rem) {
            __m512 xv = _mm512_loadu_ps(x + 16 * full);
            a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w0 + 16 * full), xv, a0);
            a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w1 + 16 * full), xv, a1);
            a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w2 + 16 * full), xv, a2);
            a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w3 + 16 * full), xv, a3);
        }
        y[r] = tree16_avx512(a0);
        y[r + 1] = tree16_avx512(a1);
        y[r + 2] = tree16_avx512(a2);
        y[r + 3] = tree16_avx512(a3);
    }
    for (; r < r1; r++) {
        const float *w0 = W + r * cols;
        __m512 a0 = _mm512_setzero_ps();
        for (int64_t g = 0; g < full; g++)
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + 16 * g), _mm512_loadu_ps(x + 16 * g), a0);
        if (rem)
            a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w0 + 16 * full), _mm512_loadu_ps(x + 16 * full), a0);
        y[r] = tree16_avx512(a0);
    }
}

/* The row-block kernels below keep RI rows in flight: value pointers v[i] from the row pointers rp, accumulators
 * a[i], and at the end y[i] from a[i] through the canonical tree. */
#define GEMV_ROWS_START(RI)                                                                                         \
    const float *v[RI];                                                                                             \
    __m512 a[RI];                                                                                                   \
    for (int i = 0; i < RI; i++) {                                                                                  \
        v[i] = V + rp[i];                                                                                           \
        a[i] = _mm512_setzero_ps();                                                                                 \
    }
#define GEMV_ROWS_STORE(RI) for (int i = 0; i < RI; i++) y[i] = tree16_avx512(a[i]);

/* RI rows at once, each with its own value pointer: RI independent popcount/pointer chains and RI streams in
 * flight hide both the expand latency and the memory latency (measured on the 2-core Sapphire Rapids VM, one
 * thread, 4096x4096 at 70%, out of cache: 4 rows 9.7 GB/s, 8 rows 11.8, 16 rows 12.2). The mask goes straight from
 * memory into a k register (no kmov from a GPR on port 5); the expand reads memory (as fast as load + register
 * expand here, and it never reads past the row's values).
 * The expand merges into xv and the FMA is masked by the same k, instead of a zero-masked expand and a full FMA:
 * on AMD Zen 5 a zero-masked vexpandps still waits for its destination register, and gcc -O3 gives all 16 rows one
 * destination, so the 16 expands ran one after another (2026-12-05, Zen 5 VM, one thread, 1536x576 at 70% out of
 * cache: 14.2 -> 29.5 GB/s). xv is ready at the top of the group, so merging into it costs no wait. Skipping the
 * masked lanes equals adding their zero products on finite data (the accumulators start at +0). */
#define SPARSE_GEMV_ROWS(RI)                                                                                        \
    AVX512_ATTR static inline void gemv_sparse_avx512_##RI(const uint16_t *m0, int64_t G, const float *V,          \
                                                           const int64_t *rp, const float *x, float *y,            \
                                                           const char *pf, int64_t pf_step) {                      \
        GEMV_ROWS_START(RI)                                                                                        \
        for (int64_t g = 0; g < G; g++) {                                                                          \
            __m512 xv = _mm512_load_ps(x + 16 * g);                                                                \
            if (GEMV_PF && pf) {                                                                                   \
                for (int64_t q = 0; q < pf_step; q++) _mm_prefetch(pf + 64 * (g * pf_step + q), _MM_HINT_T1);    \
            }                                                                                                      \
            _Pragma("GCC unroll 16") for (int i = 0; i < RI; i++) {                                                \
                const uint16_t *mp = m0 + i * G + g;                                                               \
                __mmask16 k = _load_mask16((__mmask16 *)mp);                                                       \
                a[i] = _mm512_mask3_fmadd_ps(_mm512_mask_expandloadu_ps(xv, k, v[i]), xv, a[i], k);                \
                v[i] += __builtin_popcount(*mp);                                                                   \
            }                                                                                                      \
        }                                                                                                          \
        GEMV_ROWS_STORE(RI)                                                                                        \
    }
SPARSE_GEMV_ROWS(16)
SPARSE_GEMV_ROWS(1)

/* N:M: every full group of 16 inputs keeps exactly 16 N / M, so group g's values start at g * 16 N / M: no popcount
 * chain at all, and one value pointer per row. */
#define NM_GEMV_ROWS(RI)                                                                                            \
    AVX512_ATTR static inline void gemv_nm_avx512_##RI(const uint16_t *m0, int64_t G, const float *V,              \
                                                       const int64_t *rp, int64_t per, const float *x, float *y) {  \
        GEMV_ROWS_START(RI)                                                                                        \
        for (int64_t g = 0; g < G; g++) {                                                                          \
            __m512 xv = _mm512_load_ps(x + 16 * g);                                                                \
            _Pragma("GCC unroll 16") for (int i = 0; i < RI; i++) {                                                \
                __mmask16 k = _load_mask16((__mmask16 *)(m0 + i * G + g));                                         \
                a[i] = _mm512_mask3_fmadd_ps(_mm512_mask_expandloadu_ps(xv, k, v[i] + g * per), xv, a[i], k);      \
            }                                                                                                      \
        }                                                                                                          \
        GEMV_ROWS_STORE(RI)                                                                                        \
    }
NM_GEMV_ROWS(16)
NM_GEMV_ROWS(1)

#define PF_MAX_GROUPS 128 /* the gemv prefetches values in software for rows of up to 128 x 16 inputs */

/* cache lines holding the values of rows [r, r + 16) */
static inline int64_t block_lines(const int64_t *rp, int64_t r) { return ((rp[r + 16] - rp[r]) * 4 + 63) / 64; }

AVX512_ATTR static void gemv_sparse_avx512(const sp_matrix *w, const float *x, float *y, int64_t r0, int64_t r1) {
    const float *V = (const float *)w->values;
    int64_t G = groups_of(w);
    int64_t r = r0;
    if (w->kind == SP_NM) {
        int64_t per = 16 * w->n / w->m;
        for (; r + 16 <= r1; r += 16) gemv_nm_avx512_16(w->masks + r * G, G, V, w->row_ptr + r, per, x, y + r);
        for (; r < r1; r++) gemv_nm_avx512_1(w->masks + r * G, G, V, w->row_ptr + r, per, x, y + r);
        return;
    }
    const int64_t *rp = w->row_ptr;
    /* short rows (the real model's 576 inputs: ~11 lines a row) end before the hardware prefetchers ramp up, so the
     * values are prefetched in software, only for rows of up to 2048 inputs (see below) */
    int short_rows = G <= PF_MAX_GROUPS;
    if (short_rows && r + 16 <= r1) {
        /* a part starts cold (no block before it prefetched this one): ask for all of its first block's lines at
         * once rather than letting 16 row streams miss one line after another. Zen 5 VM, 2026-12-05, the 70% demo
         * model's block linears, 2 threads (8 parts a matrix): 5.9 / 5.4 -> 4.5 / 4.2 ms a token */
        const char *pv = (const char *)(V + rp[r]);
        int64_t lines = block_lines(rp, r), mlines = (16 * G * 2 + 63) / 64;
        for (int64_t q = 0; q < lines; q++) _mm_prefetch(pv + 64 * q, _MM_HINT_T0);
        for (int64_t q = 0; q < mlines; q++) _mm_prefetch((const char *)(w->masks + r * G) + 64 * q, _MM_HINT_T0);
    }
    for (; r + 16 <= r1; r += 16) {
        /* fetch the next 16-row block's values into L2 while this block runs, spread over its groups. One thread,
         * CPU time: 576x576 7.7 -> 11.9 GB/s, 1536x576 7.5 -> 10.1, 576x1536 8.3 -> 11.0, 1024x2048 8.7 -> 11.3;
         * but 4096x4096 12.3 -> 10.3, hence PF_MAX_GROUPS. */
        const char *pf = NULL;
        int64_t step = 0;
        if (short_rows && r + 32 <= r1) {
            pf = (const char *)(V + rp[r + 16]);
            step = (block_lines(rp, r + 16) + G - 1) / G;
        }
        gemv_sparse_avx512_16(w->masks + r * G, G, V, rp + r, x, y + r, pf, step);
    }
    for (; r < r1; r++) gemv_sparse_avx512_1(w->masks + r * G, G, V, rp + r, x, y + r, NULL, 0);
}

/* Prefill, outer-product form: for each kept w[r][k], Y[tile][r] += w * Xt[k][tile] over a tile of TT = 64 tokens
 * held in 4 registers, so every FMA lane does useful work (no zero FLOPs). Xt is read in chunks of KC_GROUPS * 16
 * columns (128 x 64 x 4 B = 32 KB, fits L1); a row's partial sums wait in a per-thread buffer between chunks. Each
 * row's masks in a chunk are first turned into a list of Xt offsets with vpcompressd, so the FMA loop has no
 * data-dependent branches but its trip count. The dense kernel shares the chunking and blocks 4 rows x 64 tokens
 * (16 accumulators; each Xt load feeds 4 FMAs). */
#ifndef KC_GROUPS
#define KC_GROUPS 8
#endif
#ifndef PF_ROWS
#define PF_ROWS 1
#endif
#ifndef PF_LINES
#define PF_LINES (KC_GROUPS * 16 * 4 * 4 / 10 / 64 + 1) /* the lines of a chunk at 60% sparsity */
#endif

static __thread void *tl_buf2;
static __thread size_t tl_cap2;

static void *scratch2(size_t bytes) { return grow_scratch(&tl_buf2, &tl_cap2, bytes, 256); }

/* Yt[r - r0][t] (row stride ld) -> y[(t0 + t) * rows + r] for t < nt, in 16 x 16 blocks */
static void untranspose_ld(const float *yt, int64_t ld, int64_t r0, int64_t r1, int64_t nt, int64_t t0, float *y,
                           int64_t rows) {
    for (int64_t tb = 0; tb < nt; tb += 16) {
        int64_t te = tb + 16 < nt ? tb + 16 : nt;
        for (int64_t rb = r0; rb < r1; rb += 16) {
            int64_t re = rb + 16 < r1 ? rb + 16 : r1;
            for (int64_t t = tb; t < te; t++)
                for (int64_t r = rb; r < re; r++) y[(t0 + t) * rows + r] = yt[(r - r0) * ld + t];
        }
    }
}

static void untranspose(const float *yt, int64_t r0, int64_t r1, int64_t nt, int64_t t0, float *y, int64_t rows) {
    untranspose_ld(yt, TT, r0, r1, nt, t0, y, rows);
}

AVX512_ATTR static void gemm_dense_avx512(const sp_matrix *w, const float *x, const float *xt, int64_t T, float *y,
                                          int64_t r0, int64_t r1) {
    (void)x;
    const float *W = (const float *)w->values;
    int64_t cols = w->cols, rows = w->rows, kpad = groups_of(w) * 16, ntile = (T + TT - 1) / TT;
    int64_t nr = r1 - r0, kc = KC_GROUPS * 16;
    float *yt = scratch2((size_t)nr * TT * sizeof(float));
    if (!yt) { /* out of memory: the slow path needs no scratch */
        gemm_dense_portable(w, x, xt, T, y, r0, r1);
        return;
    }
    for (int64_t tile = 0; tile < ntile; tile++) {
        const float *xtt = xt + tile * kpad * TT;
        int64_t nt = T - tile * TT < TT ? T - tile * TT : TT;
        for (int64_t k0 = 0; k0 < cols; k0 += kc) {
            int64_t k1 = k0 + kc < cols ? k0 + kc : cols;
            int64_t r = r0;
            for (; r + 4 <= r1; r += 4) {
                float *acc = yt + (r - r0) * TT;
                __m512 a[4][4];
                for (int i = 0; i < 4; i++)
                    for (int q = 0; q < 4; q++)
                        a[i][q] = k0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(acc + i * TT + 16 * q);
                const float *w0 = W + r * cols;
                for (int64_t k = k0; k < k1; k++) {
                    const float *p = xtt + k * TT;
                    __m512 x0 = _mm512_load_ps(p), x1 = _mm512_load_ps(p + 16), x2 = _mm512_load_ps(p + 32),
                           x3 = _mm512_load_ps(p + 48);
                    _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) {
                        __m512 wv = _mm512_set1_ps(w0[i * cols + k]);
                        a[i][0] = _mm512_fmadd_ps(wv, x0, a[i][0]);
                        a[i][1] = _mm512_fmadd_ps(wv, x1, a[i][1]);
                        a[i][2] = _mm512_fmadd_ps(wv, x2, a[i][2]);
                        a[i][3] = _mm512_fmadd_ps(wv, x3, a[i][3]);
                    }
                }
                for (int i = 0; i < 4; i++)
                    for (int q = 0; q < 4; q++) _mm512_store_ps(acc + i * TT + 16 * q, a[i][q]);
            }
            for (; r < r1; r++) {
                float *acc = yt + (r - r0) * TT;
                __m512 a[4];
                for (int q = 0; q < 4; q++) a[q] = k0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(acc + 16 * q);
                const float *w0 = W + r * cols;
                for (int64_t k = k0; k < k1; k++) {
                    __m512 wv = _mm512_set1_ps(w0[k]);
                    for (int q = 0; q < 4; q++) a[q] = _mm512_fmadd_ps(wv, _mm512_load_ps(xtt + k * TT + 16 * q), a[q]);
                }
                for (int q = 0; q < 4; q++) _mm512_store_ps(acc + 16 * q, a[q]);
            }
        }
        untranspose(yt, r0, r1, nt, tile * TT, y, rows);
    }
}

/* chunk [g0, g1) of one row: Xt offsets of its kept columns (vpcompressd), returns how many */
AVX512_ATTR static inline int decode_chunk(const uint16_t *mr, int64_t g0, int64_t g1, __m512i lane_tt, int32_t *idx) {
    int n = 0;
    for (int64_t g = g0; g < g1; g++) {
        __mmask16 k = _load_mask16((__mmask16 *)(mr + g));
        __m512i o = _mm512_add_epi32(lane_tt, _mm512_set1_epi32((int)((g - g0) * 16 * TT)));
        _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi32(k, o));
        n += __builtin_popcount(mr[g]);
    }
    return n;
}

#define FMA4(A, W, P)                                                                                               \
    do {                                                                                                           \
        A##0 = _mm512_fmadd_ps(W, _mm512_load_ps(P), A##0);                                                        \
        A##1 = _mm512_fmadd_ps(W, _mm512_load_ps((P) + 16), A##1);                                                 \
        A##2 = _mm512_fmadd_ps(W, _mm512_load_ps((P) + 32), A##2);                                                 \
        A##3 = _mm512_fmadd_ps(W, _mm512_load_ps((P) + 48), A##3);                                                 \
    } while (0)
#define LOAD4(A, P, ZERO)                                                                                           \
    do {                                                                                                           \
        if (ZERO) {                                                                                                \
            A##0 = A##1 = A##2 = A##3 = _mm512_setzero_ps();                                                       \
        } else {                                                                                                   \
            A##0 = _mm512_load_ps(P);                                                                              \
            A##1 = _mm512_load_ps((P) + 16);                                                                       \
            A##2 = _mm512_load_ps((P) + 32);                                                                       \
            A##3 = _mm512_load_ps((P) + 48);                                                                       \
        }                                                                                                          \
    } while (0)
#define STORE4(A, P)                                                                                                \
    do {                                                                                                           \
        _mm512_store_ps(P, A##0);                                                                                  \
        _mm512_store_ps((P) + 16, A##1);                                                                           \
        _mm512_store_ps((P) + 32, A##2);                                                                           \
        _mm512_store_ps((P) + 48, A##3);                                                                           \
    } while (0)

/* One row at a time over a chunk of KC_GROUPS groups, two token tiles (128 tokens) at once: each kept weight feeds
 * 8 FMAs into 8 accumulators (4 per tile), so the chains of dependent FMAs (4-cycle latency) no longer bind and the
 * decode of the masks is shared by 128 tokens. The next row's values and masks are prefetched: rows lie far apart
 * and each is visited for one chunk only, which the hardware prefetchers do not follow. */
AVX512_ATTR static void gemm_sparse_avx512(const sp_matrix *w, const float *x, const float *xt, int64_t T, float *y,
                                           int64_t r0, int64_t r1) {
    (void)x;
    const float *V = (const float *)w->values;
    const int64_t *rp = w->row_ptr;
    int64_t G = groups_of(w), rows = w->rows, kpad = G * 16, ntile = (T + TT - 1) / TT, nr = r1 - r0;
    const int64_t ld = 2 * TT; /* Yt row: the partial sums of two tiles */
    size_t yt_bytes = (size_t)nr * ld * sizeof(float), off_bytes = (size_t)nr * sizeof(int64_t);
    char *buf = scratch2(yt_bytes + off_bytes + (KC_GROUPS * 16 + 16) * sizeof(int32_t) + 64);
    if (!buf) { /* out of memory: the slow path needs no scratch */
        gemm_sparse_portable(w, x, xt, T, y, r0, r1);
        return;
    }
    float *yt = (float *)buf;
    int64_t *off = (int64_t *)(buf + yt_bytes);
    int32_t *idx = (int32_t *)(buf + yt_bytes + off_bytes);
    const __m512i lane_tt = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(TT));
    for (int64_t tile = 0; tile < ntile; tile += 2) {
        int two = tile + 1 < ntile;
        const float *xtt = xt + tile * kpad * TT, *xtt1 = xtt + kpad * TT;
        for (int64_t r = r0; r < r1; r++) off[r - r0] = rp[r];
        for (int64_t g0 = 0; g0 < G; g0 += KC_GROUPS) {
            int64_t g1 = g0 + KC_GROUPS < G ? g0 + KC_GROUPS : G;
            const float *xc = xtt + g0 * 16 * TT, *xc1 = xtt1 + g0 * 16 * TT;
            for (int64_t r = r0; r < r1; r++) {
                if (r + PF_ROWS < r1) {
                    const char *pv = (const char *)(V + off[r + PF_ROWS - r0]);
                    for (int q = 0; q < PF_LINES; q++) _mm_prefetch(pv + 64 * q, _MM_HINT_T0);
                    _mm_prefetch((const char *)(w->masks + (r + PF_ROWS) * G + g0), _MM_HINT_T0);
                }
                int n = decode_chunk(w->masks + r * G, g0, g1, lane_tt, idx);
                const float *v = V + off[r - r0];
                off[r - r0] += n;
                float *acc = yt + (r - r0) * ld;
                __m512 a0, a1, a2, a3, b0, b1, b2, b3;
                LOAD4(a, acc, g0 == 0);
                if (two) {
                    LOAD4(b, acc + TT, g0 == 0);
                    for (int j = 0; j < n; j++) {
                        __m512 wv = _mm512_set1_ps(v[j]);
                        FMA4(a, wv, xc + idx[j]);
                        FMA4(b, wv, xc1 + idx[j]);
                    }
                    STORE4(b, acc + TT);
                } else {
                    for (int j = 0; j < n; j++) {
                        __m512 wv = _mm512_set1_ps(v[j]);
                        FMA4(a, wv, xc + idx[j]);
                    }
                }
                STORE4(a, acc);
            }
        }
        int64_t nt = T - tile * TT < TT ? T - tile * TT : TT;
        untranspose_ld(yt, ld, r0, r1, nt, tile * TT, y, rows);
        if (two) {
            int64_t nt1 = T - (tile + 1) * TT < TT ? T - (tile + 1) * TT : TT;
            untranspose_ld(yt + TT, ld, r0, r1, nt1, (tile + 1) * TT, y, rows);
        }
    }
}
#endif /* SP_X86 */

/* ------------------------------------------------------------------------------------------------------------ */
/* dispatch                                                                                                    */

typedef void (*gemv_fn)(const sp_matrix *, const float *, float *, int64_t, int64_t);
typedef void (*gemm_fn)(const sp_matrix *, const float *, const float *, int64_t, float *, int64_t, int64_t);

static int g_isa = SP_ISA_PORTABLE;

int sp_cpu_supports(int isa) {
    if (isa == SP_ISA_PORTABLE) return 1;
#if SP_X86
    __builtin_cpu_init();
    if (isa == SP_ISA_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                   __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
    if (isa == SP_ISA_AVX512)
        return sp_cpu_supports(SP_ISA_AVX2) && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512dq");
#endif
    return 0;
}

static int best_isa(void) {
    if (sp_cpu_supports(SP_ISA_AVX512)) return SP_ISA_AVX512;
    if (sp_cpu_supports(SP_ISA_AVX2)) return SP_ISA_AVX2;
    return SP_ISA_PORTABLE;
}

int sp_set_isa(int isa) {
    if (isa == SP_ISA_AUTO) {
        g_isa = best_isa();
        return 0;
    }
    if (isa < SP_ISA_PORTABLE || isa > SP_ISA_AVX512 || !sp_cpu_supports(isa)) return -1;
    g_isa = isa;
    return 0;
}

int sp_get_isa(void) { return g_isa; }

__attribute__((constructor)) static void init_isa(void) {
    g_isa = best_isa();
    const char *e = getenv("LOSA_SPARSE_ISA");
    if (!e || !*e || !strcmp(e, "auto")) return;
    if (!strcmp(e, "portable")) sp_set_isa(SP_ISA_PORTABLE);
    else if (!strcmp(e, "avx2")) sp_set_isa(SP_ISA_AVX2);
    else if (!strcmp(e, "avx512")) sp_set_isa(SP_ISA_AVX512);
}

const char *sp_isa_name(int isa) {
    switch (isa) {
    case SP_ISA_PORTABLE: return "portable";
    case SP_ISA_AVX2: return "avx2";
    case SP_ISA_AVX512: return "avx512";
    default: return "auto";
    }
}

/* KERNELS(op)[isa][sparse]: the kernel of each instruction set (g_isa is always one of the three) for dense and for
 * bitmask / N:M matrices; without x86 every row is the portable pair. */
#if SP_X86
#define KERNELS(OP)                                                                                                 \
    {{OP##_dense_portable, OP##_sparse_portable}, {OP##_dense_avx2, OP##_sparse_avx2},                              \
     {OP##_dense_avx512, OP##_sparse_avx512}}
#else
#define KERNELS(OP)                                                                                                 \
    {{OP##_dense_portable, OP##_sparse_portable}, {OP##_dense_portable, OP##_sparse_portable},                      \
     {OP##_dense_portable, OP##_sparse_portable}}
#endif
static const gemv_fn gemv_kernels[3][2] = KERNELS(gemv);
static const gemm_fn gemm_kernels[3][2] = KERNELS(gemm);

static gemv_fn pick_gemv(int isa, int kind) { return gemv_kernels[isa][kind != SP_DENSE]; }
static gemm_fn pick_gemm(int isa, int kind) { return gemm_kernels[isa][kind != SP_DENSE]; }

void sp_set_threads(int n) { sp_pool_set_threads(n); }
int sp_get_threads(void) { return sp_pool_threads(); }
void sp_set_spin(int us) { sp_pool_set_spin(us); }
int sp_get_spin(void) { return sp_pool_spin(); }
const char *sp_version(void) { return "losa-sparse-cpu 0.1"; }

/* ------------------------------------------------------------------------------------------------------------ */
/* validation, work split, entry points                                                                        */

static int check_matrix(const sp_matrix *w) {
    if (!w || !w->values) return SP_EINVAL;
    if (w->rows < 0 || w->cols < 1) return SP_ESHAPE;
    if (w->dtype != SP_F32) return SP_EDTYPE;
    if (w->kind == SP_DENSE) return 0;
    if (w->kind != SP_BITMASK && w->kind != SP_NM) return SP_EKIND;
    if (!w->masks || !w->row_ptr) return SP_EINVAL;
    if (w->kind == SP_NM && (!(w->m == 4 || w->m == 8) || w->n < 1 || w->n > w->m || w->cols % w->m)) return SP_ENM;
    return 0;
}

/* bytes a kernel streams for rows [0, r) */
static double cost_upto(const sp_matrix *w, int64_t r) {
    if (w->kind == SP_DENSE) return (double)r * (double)(w->cols * 4 + 16);
    return (double)w->row_ptr[r] * 4.0 + (double)r * (double)(groups_of(w) * 2 + 16);
}

typedef struct {
    int nmat;
    const sp_matrix *const *w;
    float *const *y;
    const float *x;   /* gemv: padded x; gemm: X as given */
    const float *xt;  /* gemm, SIMD paths: transposed tiles */
    int64_t T;
    int isa;
    int gemm;
    int bmat[MAX_PARTS + 1];
    int64_t brow[MAX_PARTS + 1];
} job_t;

static void split(job_t *j, int nparts, double total) {
    j->bmat[0] = 0;
    j->brow[0] = 0;
    j->bmat[nparts] = j->nmat - 1;
    j->brow[nparts] = j->w[j->nmat - 1]->rows;
    int mi = 0;
    double before = 0.0;
    for (int p = 1; p < nparts; p++) {
        double target = total * p / nparts;
        while (mi < j->nmat - 1 && before + cost_upto(j->w[mi], j->w[mi]->rows) <= target) {
            before += cost_upto(j->w[mi], j->w[mi]->rows);
            mi++;
        }
        const sp_matrix *w = j->w[mi];
        int64_t lo = 0, hi = w->rows; /* largest r with cost_upto(r) <= target - before */
        while (lo < hi) {
            int64_t mid = (lo + hi + 1) / 2;
            if (cost_upto(w, mid) <= target - before) lo = mid;
            else hi = mid - 1;
        }
        int64_t r = (lo + ROW_ALIGN / 2) / ROW_ALIGN * ROW_ALIGN;
        if (r > w->rows) r = w->rows;
        if (mi < j->bmat[p - 1] || (mi == j->bmat[p - 1] && r < j->brow[p - 1])) {
            j->bmat[p] = j->bmat[p - 1];
            j->brow[p] = j->brow[p - 1];
        } else {
            j->bmat[p] = mi;
            j->brow[p] = r;
        }
    }
}

static void run_part(void *arg, int p, int nparts) {
    (void)nparts;
    job_t *j = arg;
    for (int i = j->bmat[p]; i <= j->bmat[p + 1] && i < j->nmat; i++) {
        const sp_matrix *w = j->w[i];
        int64_t r0 = i == j->bmat[p] ? j->brow[p] : 0;
        int64_t r1 = i == j->bmat[p + 1] ? j->brow[p + 1] : w->rows;
        if (r1 <= r0) continue;
        if (j->gemm) pick_gemm(j->isa, w->kind)(w, j->x, j->xt, j->T, j->y[i], r0, r1);
        else pick_gemv(j->isa, w->kind)(w, j->x, j->y[i], r0, r1);
    }
}

static int check_batch(int n, const sp_matrix *const *w, const float *x, float *const *y) {
    if (n < 1 || !w || !x || !y) return SP_EINVAL;
    for (int i = 0; i < n; i++) {
        int rc = check_matrix(w[i]);
        if (rc) return rc;
        if (!y[i]) return SP_EINVAL;
        if (w[i]->cols != w[0]->cols) return SP_ESHAPE;
    }
    return 0;
}

/* Parts claimed dynamically by the pool: several per thread, so a descheduled thread on a shared machine costs one
 * small part, not half the work; none smaller than PART_BYTES; a single part (no pool) below MIN_PAR_BYTES. */
#define PART_BYTES 32768
#define PARTS_PER_THREAD 4

static int nparts_for(double bytes, double min_bytes) {
    int n = sp_pool_threads();
    if (bytes < min_bytes || n <= 1) return 1;
    double by_size = bytes / PART_BYTES;
    int np = n * PARTS_PER_THREAD;
    if (by_size < np) np = by_size < n ? n : (int)by_size;
    return np > MAX_PARTS ? MAX_PARTS : np;
}

/* One batch of products (gemv: T = 1) on the pool, in parts balanced by weight bytes times tokens. */
static void run_batch(int n, const sp_matrix *const *w, const float *x, const float *xt, int64_t T, float *const *y,
                      int gemm) {
    job_t j;
    j.nmat = n;
    j.w = w;
    j.y = y;
    j.x = x;
    j.xt = xt;
    j.T = T;
    j.isa = g_isa;
    j.gemm = gemm;
    double total = 0.0;
    for (int i = 0; i < n; i++) total += cost_upto(w[i], w[i]->rows);
    int np = nparts_for(total * (double)T, MIN_PAR_BYTES);
    split(&j, np, total);
    sp_pool_run(run_part, &j, np);
}

int sp_gemv_batch(int n, const sp_matrix *const *w, const float *x, float *const *y) {
    int rc = check_batch(n, w, x, y);
    if (rc) return rc;
    int64_t cols = w[0]->cols, kpad = groups_of(w[0]) * 16;
    float *xp = scratch((size_t)kpad);
    if (!xp) return SP_ENOMEM;
    memcpy(xp, x, (size_t)cols * sizeof(float));
    memset(xp + cols, 0, (size_t)(kpad - cols) * sizeof(float));
    run_batch(n, w, xp, NULL, 1, y, 0);
    return 0;
}

int sp_gemv(const sp_matrix *w, const float *x, float *y) { return sp_gemv_batch(1, &w, x, &y); }

/* Xt[tile][k][TT]: X transposed per tile of TT tokens, zero beyond cols and beyond T */
typedef struct {
    const float *x;
    float *xt;
    int64_t T, cols, kpad, ntile;
    int simd;
} tjob_t;

#if SP_X86
/* 8 x 8 block: dst[j * ldd + i] = src[i * lds + j] (unpack / shuffle / permute2f128) */
AVX2_ATTR static inline void transpose8_avx2(const float *src, int64_t lds, float *dst, int64_t ldd) {
    __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + lds), r2 = _mm256_loadu_ps(src + 2 * lds),
           r3 = _mm256_loadu_ps(src + 3 * lds), r4 = _mm256_loadu_ps(src + 4 * lds),
           r5 = _mm256_loadu_ps(src + 5 * lds), r6 = _mm256_loadu_ps(src + 6 * lds),
           r7 = _mm256_loadu_ps(src + 7 * lds);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
           t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
           t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE),
           s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE),
           s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE),
           s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(s0, s4, 0x20));
    _mm256_storeu_ps(dst + ldd, _mm256_permute2f128_ps(s1, s5, 0x20));
    _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(s2, s6, 0x20));
    _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(s3, s7, 0x20));
    _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(s0, s4, 0x31));
    _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(s1, s5, 0x31));
    _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(s2, s6, 0x31));
    _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(s3, s7, 0x31));
}

/* tokens [0, nt8) x columns [0, cols8) by 8 x 8 blocks */
AVX2_ATTR static void transpose_blocks_avx2(const float *src, int64_t cols, int64_t nt8, int64_t cols8, float *dst) {
    for (int64_t k0 = 0; k0 < cols8; k0 += 8)
        for (int64_t t0 = 0; t0 < nt8; t0 += 8) transpose8_avx2(src + t0 * cols + k0, cols, dst + k0 * TT + t0, TT);
}
#endif

static void transpose_part(void *arg, int p, int np) {
    tjob_t *j = arg;
    int64_t t0 = j->ntile * p / np, t1 = j->ntile * (p + 1) / np, cols = j->cols;
    for (int64_t tile = t0; tile < t1; tile++) {
        float *dst = j->xt + tile * j->kpad * TT;
        const float *src = j->x + tile * TT * cols;
        int64_t nt = j->T - tile * TT < TT ? j->T - tile * TT : TT;
        if (nt < TT) memset(dst, 0, (size_t)(j->kpad * TT) * sizeof(float));
        else memset(dst + cols * TT, 0, (size_t)((j->kpad - cols) * TT) * sizeof(float));
        int64_t nt8 = 0, cols8 = 0;
#if SP_X86
        if (j->simd) {
            nt8 = nt / 8 * 8;
            cols8 = cols / 8 * 8;
            transpose_blocks_avx2(src, cols, nt8, cols8, dst);
        }
#endif
        /* what the blocks left: all tokens for columns >= cols8, tokens >= nt8 for columns < cols8 */
        for (int64_t t = 0; t < nt; t++) {
            const float *row = src + t * cols;
            for (int64_t k = t < nt8 ? cols8 : 0; k < cols; k++) dst[k * TT + t] = row[k];
        }
    }
}

int sp_gemm_batch(int n, const sp_matrix *const *w, const float *x, int64_t t, float *const *y) {
    int rc = check_batch(n, w, x, y);
    if (rc) return rc;
    if (t < 0) return SP_ESHAPE;
    if (t == 0) return 0;
    const float *xt = NULL;
    if (g_isa != SP_ISA_PORTABLE) {
        tjob_t tj;
        tj.x = x;
        tj.T = t;
        tj.cols = w[0]->cols;
        tj.kpad = groups_of(w[0]) * 16;
        tj.ntile = (t + TT - 1) / TT;
        tj.xt = scratch((size_t)(tj.ntile * tj.kpad * TT));
        tj.simd = g_isa == SP_ISA_AVX2 || g_isa == SP_ISA_AVX512;
        if (!tj.xt) return SP_ENOMEM;
        sp_pool_run(transpose_part, &tj, (int)tj.ntile);
        xt = tj.xt;
    }
    run_batch(n, w, x, xt, t, y, 1);
    return 0;
}

int sp_gemm(const sp_matrix *w, const float *x, int64_t t, float *y) { return sp_gemm_batch(1, &w, x, t, &y); }

void sp_parallel(sp_parallel_fn fn, void *arg, int nparts) {
    if (!fn) return;
    sp_pool_run(fn, arg, nparts);
}

int sp_gemv_seq(int n, const sp_matrix *const *w, const float *x, float *const *y) {
    if (n < 1 || !w || !y) return SP_EINVAL;
    for (int i = 0; i < n; i++) {
        int rc = sp_gemv(w[i], x, y[i]);
        if (rc) return rc;
    }
    return 0;
}

int sp_gemm_seq(int n, const sp_matrix *const *w, const float *x, int64_t t, float *const *y) {
    if (n < 1 || !w || !y) return SP_EINVAL;
    for (int i = 0; i < n; i++) {
        int rc = sp_gemm(w[i], x, t, y[i]);
        if (rc) return rc;
    }
    return 0;
}
