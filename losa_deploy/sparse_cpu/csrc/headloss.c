/* Fused next-token losses over rows of logits, for LoSA's chunked head loss (compress/losa/head_loss.py).
 *
 * Why: with the head frozen, a training step's loss needs, per token, a log-softmax of 49k student logits (and of
 * the teacher's for distillation), the loss and dLoss/dlogits. PyTorch does that in ~10 passes over [rows, vocab]
 * fp32 tensors with 3-4 exponentials per logit, ~18% of a distillation step on 2 cores (2026-12-04, AVX-512 VM).
 * Here each row is done by one thread in three passes that stay in its L2 cache, with two exponentials per logit
 * (one for cross-entropy), and the row's gradient overwrites its logits in place.
 *
 * Per row i with weight w_i (1/valid tokens, 0 for an ignored position):
 *   KL:  loss_i = w_i KL(softmax(t_i) || softmax(s_i)),    s_i <- w_i (softmax(s_i) - softmax(t_i))
 *   CE:  loss_i = -w_i log softmax(s_i)[y_i],              s_i <- w_i (softmax(s_i) - onehot(y_i))
 * Rows are independent, so the result does not depend on the number of threads; sums keep 16 lane accumulators
 * added in a fixed order, so every clone (AVX-512, AVX2, portable) gives the same bits.
 */
#include "spkernels.h"
#include "spmath.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>

#define LANES 16

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static double lanes_sum(const float *a) {
    double s = 0.0;
    for (int l = 0; l < LANES; l++) s += (double)a[l];
    return s;
}

static float lanes_max(const float *a) {
    float m = a[0];
    for (int l = 1; l < LANES; l++) m = a[l] > m ? a[l] : m;
    return m;
}

/* One KL row; `T` reads teacher logit j (fp32 or bf16). `et` is scratch of n floats. */
#define KL_ROW(NAME, TTYPE, T)                                                                                       \
    SPX_CLONES static double NAME(int64_t n, float *s, const TTYPE *t, float *et, float w) {                        \
        float ms[LANES], mt[LANES];                                                                                  \
        for (int l = 0; l < LANES; l++) ms[l] = mt[l] = -INFINITY;                                                   \
        for (int64_t j0 = 0; j0 < n; j0 += LANES) {                                                                  \
            const int64_t len = n - j0 < LANES ? n - j0 : LANES;                                                     \
            for (int64_t l = 0; l < len; l++) {                                                                      \
                const float a = s[j0 + l], b = T(t[j0 + l]);                                                         \
                ms[l] = a > ms[l] ? a : ms[l];                                                                       \
                mt[l] = b > mt[l] ? b : mt[l];                                                                       \
            }                                                                                                        \
        }                                                                                                            \
        const float xs = lanes_max(ms), xt = lanes_max(mt);                                                          \
        float zs[LANES] = {0}, zt[LANES] = {0}, ac[LANES] = {0};                                                     \
        const int64_t nb = n - n % LANES;                                                                            \
        for (int64_t j0 = 0; j0 < nb; j0 += LANES) {                                                                 \
            _Pragma("omp simd")                                                                                      \
            for (int l = 0; l < LANES; l++) {                                                                        \
                const float sv = s[j0 + l], tv = T(t[j0 + l]);                                                       \
                const float es = spx_exp(sv - xs), e_t = spx_exp(tv - xt);                                           \
                zs[l] += es;                                                                                         \
                zt[l] += e_t;                                                                                        \
                ac[l] += e_t * (tv - sv);                                                                            \
                s[j0 + l] = es;                                                                                      \
                et[j0 + l] = e_t;                                                                                    \
            }                                                                                                        \
        }                                                                                                            \
        for (int64_t j = nb; j < n; j++) {                                                                           \
            const float sv = s[j], tv = T(t[j]);                                                                     \
            const float es = spx_exp(sv - xs), e_t = spx_exp(tv - xt);                                               \
            zs[j - nb] += es;                                                                                        \
            zt[j - nb] += e_t;                                                                                       \
            ac[j - nb] += e_t * (tv - sv);                                                                           \
            s[j] = es;                                                                                               \
            et[j] = e_t;                                                                                             \
        }                                                                                                            \
        const double Zs = lanes_sum(zs), Zt = lanes_sum(zt), A = lanes_sum(ac);                                      \
        /* KL = sum_j pt_j (t_j - s_j) - xt + xs - log Zt + log Zs */                                                \
        const double kl = A / Zt - (double)xt + (double)xs - log(Zt) + log(Zs);                                      \
        const float gs = (float)(w / Zs), gt = (float)(w / Zt);                                                      \
        _Pragma("omp simd")                                                                                          \
        for (int64_t j = 0; j < n; j++) s[j] = s[j] * gs - et[j] * gt;                                               \
        return w * kl;                                                                                               \
    }

#define F32(x) (x)
KL_ROW(kl_row_f32, float, F32)
KL_ROW(kl_row_bf16, uint16_t, bf16_to_f32)

SPX_CLONES static double ce_row(int64_t n, float *s, int64_t y, float w) {
    float ms[LANES];
    for (int l = 0; l < LANES; l++) ms[l] = -INFINITY;
    for (int64_t j0 = 0; j0 < n; j0 += LANES) {
        const int64_t len = n - j0 < LANES ? n - j0 : LANES;
        for (int64_t l = 0; l < len; l++) ms[l] = s[j0 + l] > ms[l] ? s[j0 + l] : ms[l];
    }
    const float xs = lanes_max(ms), sy = s[y];
    float zs[LANES] = {0};
    const int64_t nb = n - n % LANES;
    for (int64_t j0 = 0; j0 < nb; j0 += LANES) {
#pragma omp simd
        for (int l = 0; l < LANES; l++) {
            const float es = spx_exp(s[j0 + l] - xs);
            zs[l] += es;
            s[j0 + l] = es;
        }
    }
    for (int64_t j = nb; j < n; j++) {
        const float es = spx_exp(s[j] - xs);
        zs[j - nb] += es;
        s[j] = es;
    }
    const double Z = lanes_sum(zs);
    const float g = (float)(w / Z);
#pragma omp simd
    for (int64_t j = 0; j < n; j++) s[j] *= g;
    s[y] -= w;
    return w * (log(Z) + (double)xs - (double)sy);
}

typedef struct {
    int64_t rows, n;
    float *s;
    const void *t;      /* KL: teacher logits [rows, n]; NULL for CE */
    int t_bf16;
    const int64_t *y;   /* CE: targets [rows] */
    const float *w;
    double *loss;       /* [rows] */
    int nparts;
    _Atomic int failed;
} loss_job;

static void loss_part(void *arg, int part, int nparts) {
    loss_job *J = (loss_job *)arg;
    const int64_t r0 = J->rows * part / nparts, r1 = J->rows * (part + 1) / nparts;
    float *et = NULL;
    if (J->t != NULL && r1 > r0) {
        et = (float *)malloc((size_t)J->n * sizeof(float));
        if (et == NULL) {
            J->failed = 1;
            return;
        }
    }
    for (int64_t i = r0; i < r1; i++) {
        float *s = J->s + i * J->n;
        const float w = J->w[i];
        if (w == 0.0f) { /* an ignored position: no loss, no gradient */
            memset(s, 0, (size_t)J->n * sizeof(float));
            J->loss[i] = 0.0;
        } else if (J->t == NULL) {
            J->loss[i] = ce_row(J->n, s, J->y[i], w);
        } else if (J->t_bf16) {
            J->loss[i] = kl_row_bf16(J->n, s, (const uint16_t *)J->t + i * J->n, et, w);
        } else {
            J->loss[i] = kl_row_f32(J->n, s, (const float *)J->t + i * J->n, et, w);
        }
    }
    free(et);
}

static int run_rows(loss_job *J) {
    if (J->rows < 0 || J->n < 1) return SP_ESHAPE;
    if (J->rows == 0) return 0;
    if (J->s == NULL || J->w == NULL || J->loss == NULL) return SP_EINVAL;
    if (J->t == NULL && J->y == NULL) return SP_EINVAL;
    if (J->y != NULL)
        for (int64_t i = 0; i < J->rows; i++)
            if (J->w[i] != 0.0f && (J->y[i] < 0 || J->y[i] >= J->n)) return SP_ESHAPE;
    const int threads = sp_get_threads();
    int nparts = (int)(J->rows < 4 * (int64_t)threads ? J->rows : 4 * threads);
    J->failed = 0;
    sp_parallel(loss_part, J, nparts);
    return J->failed ? SP_ENOMEM : 0;
}

int sp_kl_rows(int64_t rows, int64_t n, float *s, const void *t, int t_bf16, const float *w, double *loss) {
    if (t == NULL) return SP_EINVAL;
    loss_job J = {rows, n, s, t, t_bf16 != 0, NULL, w, loss, 0, 0};
    return run_rows(&J);
}

int sp_ce_rows(int64_t rows, int64_t n, float *s, const int64_t *y, const float *w, double *loss) {
    if (y == NULL) return SP_EINVAL;
    loss_job J = {rows, n, s, NULL, 0, y, w, loss, 0, 0};
    return run_rows(&J);
}
