/* losa-deploy sparse-cpu kernel library: the contract between the kernels (kernels.c) and the whole-model
 * executor (executor.c). Signatures here are fixed; the kernels' owner may add fields at the END of sp_matrix
 * and add functions, never change existing ones.
 *
 * Layouts (row-major everywhere):
 *   weight W [rows = out_features][cols = in_features], y = W x.
 *   SP_DENSE     values: float or bf16 [rows][cols].
 *   SP_BITMASK   unstructured: cols split into groups of 16 (the last one zero-padded);
 *                masks[r * groups + g] has bit b set when W[r][16 g + b] is kept (from the explicit mask file,
 *                never from W != 0); values holds row r's kept weights in column order starting at
 *                row_ptr[r] (row_ptr has rows + 1 entries, row_ptr[rows] = number of kept weights).
 *   SP_NM        N of every M consecutive inputs kept (M in {4, 8}, cols % M == 0): masks as for SP_BITMASK,
 *                values as for SP_BITMASK; kernels may use the fixed count (row_ptr[r] = r * cols / M * N).
 * Threads: kernels parallelise over output rows on the library's own pthread pool (sp_set_threads); calls from
 * several caller threads are serialised.
 */
#ifndef LOSA_SPKERNELS_H
#define LOSA_SPKERNELS_H
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum sp_kind { SP_DENSE = 0, SP_BITMASK = 1, SP_NM = 2 };
enum sp_dtype { SP_F32 = 0, SP_BF16 = 1 };
enum sp_isa { SP_ISA_AUTO = -1, SP_ISA_PORTABLE = 0, SP_ISA_AVX2 = 1, SP_ISA_AVX512 = 2 };

typedef struct sp_matrix {
    int64_t rows, cols;
    int32_t kind;          /* enum sp_kind */
    int32_t dtype;         /* enum sp_dtype (values) */
    int32_t n, m;          /* SP_NM only */
    const uint16_t *masks; /* SP_BITMASK / SP_NM: [rows][groups], groups = ceil(cols / 16) */
    const int64_t *row_ptr;/* SP_BITMASK / SP_NM: [rows + 1] */
    const void *values;    /* see layouts above */
} sp_matrix;

/* y[rows] = W x[cols]. Returns 0, or a negative code (bad matrix). */
int sp_gemv(const sp_matrix *w, const float *x, float *y);
/* Y[t][rows] = sum_k X[t][k] W[r][k] for t < T (X: [T][cols], Y: [T][rows]). Returns 0 or a negative code. */
int sp_gemm(const sp_matrix *w, const float *x, int64_t t, float *y);

/* Instruction set: SP_ISA_AUTO picks the best the CPU supports (also read from the environment variable
 * LOSA_SPARSE_ISA=portable|avx2|avx512 at load). Setting one the CPU lacks returns -1 and changes nothing. */
int sp_set_isa(int isa);
int sp_get_isa(void);
int sp_cpu_supports(int isa);
void sp_set_threads(int n);
int sp_get_threads(void);
const char *sp_version(void);


/* ---- additions (kernels' owner) ---------------------------------------------------------------------------- */
/* Error codes returned by the kernels (0 = success). */
enum sp_error {
    SP_EINVAL = -1, /* a NULL pointer, or n < 1 in a batch */
    SP_EKIND = -2,  /* unknown kind */
    SP_ESHAPE = -3, /* rows < 0, cols < 1, t < 0, or batch matrices with different cols */
    SP_ENM = -4,    /* SP_NM with m not in {4, 8}, n not in 1..m, or cols % m != 0 */
    SP_EDTYPE = -5, /* values dtype not supported by this build */
    SP_ENOMEM = -6  /* scratch allocation failed */
};
/* Several matrices that share the input (q, k, v; gate, up) in ONE parallel dispatch: y[i] = W[i] x.
 * All w[i] must have the same cols. Cheaper than n separate calls when each matrix is small. */
int sp_gemv_batch(int n, const sp_matrix *const *w, const float *x, float *const *y);
/* Y[i][t][rows_i] = X W[i]^T for each i, X: [T][cols] shared. */
int sp_gemm_batch(int n, const sp_matrix *const *w, const float *x, int64_t t, float *const *y);
/* Thread pool (own pthreads, not OpenMP): idle workers spin this many microseconds after a call before sleeping
 * on a futex (default 100). 0 = sleep at once (lowest CPU use, ~5-10 us wake-up per call). */
void sp_set_spin(int microseconds);
int sp_get_spin(void);
/* "portable", "avx2", "avx512" (or "auto" for anything else). */
const char *sp_isa_name(int isa);

/* The same pool for the executor's own loops (attention heads, ...): runs fn(arg, p, nparts) once for every
 * p < nparts and returns when all are done. Parts are claimed dynamically by the calling thread and the pool's
 * workers (any part may run on any thread, so index scratch by part, not by thread). The library is built WITHOUT
 * -fopenmp (only -fopenmp-simd), so `#pragma omp parallel` is ignored: use this instead. Not from inside fn. */
typedef void (*sp_parallel_fn)(void *arg, int part, int nparts);
void sp_parallel(sp_parallel_fn fn, void *arg, int nparts);

/* Fused next-token losses over `rows` rows of `n` logits (LoSA's chunked head loss; headloss.c). Each row's student
 * logits s[i] are replaced by dLoss/ds[i] and loss[i] receives its share of the loss, both scaled by w[i] (w[i] = 0:
 * an ignored position, zero gradient and loss). KL: w KL(softmax(t) || softmax(s)), t the teacher's logits (bf16
 * bits when t_bf16, else fp32). CE: -w log softmax(s)[y]. Returns 0, SP_EINVAL, SP_ESHAPE (a target outside [0, n))
 * or SP_ENOMEM. Rows run in parallel on the pool; the result does not depend on the thread count or the ISA. */
int sp_kl_rows(int64_t rows, int64_t n, float *s, const void *t, int t_bf16, const float *w, double *loss);
int sp_ce_rows(int64_t rows, int64_t n, float *s, const int64_t *y, const float *w, double *loss);

/* n independent products one after another, each its own parallel dispatch, exactly as an executor calls them
 * (stops at the first error). For timing the per-call cost without an interpreter in the loop. */
int sp_gemv_seq(int n, const sp_matrix *const *w, const float *x, float *const *y);
int sp_gemm_seq(int n, const sp_matrix *const *w, const float *x, int64_t t, float *const *y);

#ifdef __cplusplus
}
#endif
#endif
