/* Whole-model Llama-family executor over the sparse kernels (see executor.h for the contract).
 *
 * Per layer, for t tokens at positions pos..pos+t:
 *   xn = RMSNorm(x) * w_attn;  q|k|v = W xn (+ bias);  RoPE(q, k);  K/V -> cache
 *   a = softmax(q K^T * scale, causal) V  (fp32, per head; grouped-query: head h reads kv head h / (H / KV))
 *   x += W_o a;  xn = RMSNorm(x) * w_mlp;  x += W_down (SiLU(W_gate xn) * W_up xn)
 * then RMSNorm(x) * w_final, and optionally lm_head. Matches transformers' eager Llama math in fp32.
 * Only portable C here: the instruction-set-specific work is in the kernels, which dispatch at run time.
 * Threads: the kernels' own pool (sp_parallel) also runs the attention heads; the library has no OpenMP runtime,
 * only `omp simd` hints (-fopenmp-simd).
 */
#include "executor.h"
#include "spmath.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static __thread char g_err[256];

static int fail(int code, const char *msg) {
    snprintf(g_err, sizeof g_err, "%s", msg);
    return code;
}

const char *spx_last_error(void) { return g_err; }
int spx_abi_version(void) { return SPX_ABI_VERSION; }

typedef struct spx_ctx {
    const spx_model *m;
    int64_t qd, kvd, qkv_rows;     /* q width, k (= v) width, fused q|k|v width */
    float *x, *xn, *qkv, *q, *k, *v, *att, *tmp, *gu, *gate, *up, *act, *scores;
    int64_t scores_stride;         /* per thread: max_len floats */
    int nthreads_alloc;
    int profile;
    double prof[SPX_T_COUNT];
} spx_ctx;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int check_matrix(const sp_matrix *w, int64_t rows, int64_t cols, const char *what) {
    if (w->rows != rows || w->cols != cols) {
        snprintf(g_err, sizeof g_err, "%s: matrix is %lldx%lld, expected %lldx%lld", what, (long long)w->rows,
                 (long long)w->cols, (long long)rows, (long long)cols);
        return -1;
    }
    if (!w->values) {
        snprintf(g_err, sizeof g_err, "%s: no values", what);
        return -1;
    }
    if (w->kind != SP_DENSE && (!w->masks || !w->row_ptr)) {
        snprintf(g_err, sizeof g_err, "%s: sparse matrix without masks/row_ptr", what);
        return -1;
    }
    return 0;
}

static int check_model(const spx_model *m) {
    if (m->n_layers < 1 || m->hidden < 1 || m->inter < 1 || m->n_heads < 1 || m->n_kv_heads < 1 || m->head_dim < 2 ||
        m->vocab < 1 || m->max_len < 1 || m->max_tokens < 1)
        return fail(-1, "non-positive model dimension");
    if (m->head_dim % 2) return fail(-1, "head_dim must be even for RoPE");
    if (m->n_heads % m->n_kv_heads) return fail(-1, "heads must be a multiple of kv heads");
    if (!m->embed || !m->final_norm || !m->rope_cos || !m->rope_sin || !m->layers || !m->k_cache || !m->v_cache)
        return fail(-1, "missing model array");
    if (m->lm_head.rows && check_matrix(&m->lm_head, m->vocab, m->hidden, "lm_head")) return -1;
    int64_t qd = m->n_heads * m->head_dim, kvd = m->n_kv_heads * m->head_dim, h = m->hidden, f = m->inter;
    for (int64_t l = 0; l < m->n_layers; l++) {
        const spx_layer *L = &m->layers[l];
        char what[64];
        if (!L->attn_norm || !L->mlp_norm) return fail(-1, "missing layer norm weight");
        snprintf(what, sizeof what, "layer %lld qkv", (long long)l);
        if (L->fused_qkv) {
            if (check_matrix(&L->q, qd + 2 * kvd, h, what)) return -1;
        } else if (check_matrix(&L->q, qd, h, what) || check_matrix(&L->k, kvd, h, what) ||
                   check_matrix(&L->v, kvd, h, what)) {
            return -1;
        }
        snprintf(what, sizeof what, "layer %lld o_proj", (long long)l);
        if (check_matrix(&L->o, h, qd, what)) return -1;
        snprintf(what, sizeof what, "layer %lld gate/up", (long long)l);
        if (L->fused_gate_up) {
            if (check_matrix(&L->gate, 2 * f, h, what)) return -1;
        } else if (check_matrix(&L->gate, f, h, what) || check_matrix(&L->up, f, h, what)) {
            return -1;
        }
        snprintf(what, sizeof what, "layer %lld down_proj", (long long)l);
        if (check_matrix(&L->down, h, f, what)) return -1;
    }
    return 0;
}

static int max_threads(void) {
    int n = sp_get_threads();
    return n < 1 ? 1 : n;
}

void *spx_create(const spx_model *m) {
    if (!m) {
        fail(-1, "null model");
        return NULL;
    }
    if (check_model(m)) return NULL;
    spx_ctx *c = calloc(1, sizeof *c);
    if (!c) {
        fail(-2, "out of memory");
        return NULL;
    }
    c->m = m;
    c->qd = m->n_heads * m->head_dim;
    c->kvd = m->n_kv_heads * m->head_dim;
    c->qkv_rows = c->qd + 2 * c->kvd;
    int64_t T = m->max_tokens, h = m->hidden, f = m->inter;
    c->nthreads_alloc = 256; /* scores rows for up to this many OpenMP threads */
    c->scores_stride = m->max_len;
    c->x = malloc(sizeof(float) * T * h);
    c->xn = malloc(sizeof(float) * T * h);
    c->tmp = malloc(sizeof(float) * T * h);
    c->qkv = malloc(sizeof(float) * T * c->qkv_rows);
    c->att = malloc(sizeof(float) * T * c->qd);
    int64_t gu_w = 2 * f > c->qkv_rows ? 2 * f : c->qkv_rows; /* also scratch for unfused q/k/v */
    c->gu = malloc(sizeof(float) * T * gu_w);
    c->act = malloc(sizeof(float) * T * gu_w); /* also scratch for unfused gate/up */
    c->scores = malloc(sizeof(float) * c->nthreads_alloc * c->scores_stride);
    if (!c->x || !c->xn || !c->tmp || !c->qkv || !c->att || !c->gu || !c->act || !c->scores) {
        spx_free(c);
        fail(-2, "out of memory for executor scratch");
        return NULL;
    }
    return c;
}

void spx_free(void *ctx) {
    spx_ctx *c = ctx;
    if (!c) return;
    free(c->x);
    free(c->xn);
    free(c->tmp);
    free(c->qkv);
    free(c->att);
    free(c->gu);
    free(c->act);
    free(c->scores);
    free(c);
}

void spx_set_profile(void *ctx, int32_t on) { ((spx_ctx *)ctx)->profile = on; }

void spx_read_profile(void *ctx, double *out) {
    spx_ctx *c = ctx;
    for (int i = 0; i < SPX_T_COUNT; i++) {
        out[i] = c->prof[i];
        c->prof[i] = 0.0;
    }
}

/* y[t][n] = x[t][n] / sqrt(mean(x[t]^2) + eps) * w[n] (transformers' LlamaRMSNorm in fp32). */
SPX_CLONES
static void rmsnorm(const float *x, const float *w, float *y, int64_t t, int64_t n, float eps) {
    for (int64_t i = 0; i < t; i++) {
        const float *xi = x + i * n;
        float *yi = y + i * n;
        double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}; /* lane j % 8, summed in a fixed tree: same on every clone */
        int64_t j = 0;
        for (; j + 8 <= n; j += 8)
            for (int l = 0; l < 8; l++) acc[l] += (double)xi[j + l] * xi[j + l];
        for (; j < n; j++) acc[j % 8] += (double)xi[j] * xi[j];
        double ss = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
        float r = 1.0f / sqrtf((float)(ss / (double)n) + eps);
        for (j = 0; j < n; j++) yi[j] = w[j] * (xi[j] * r);
    }
}

/* a = SiLU(g) * u for t tokens; gu rows hold gate then up ([t][2 f]). */
SPX_CLONES
static void silu_mul(const float *gu, float *act, int64_t t, int64_t f) {
    for (int64_t i = 0; i < t; i++) {
        const float *g = gu + i * 2 * f, *u = g + f;
        float *a = act + i * f;
#pragma omp simd
        for (int64_t e = 0; e < f; e++) a[e] = g[e] / (1.0f + spx_exp(-g[e])) * u[e];
    }
}

/* Rotate one head vector (rotate_half convention: pairs (i, i + d/2)). */
static void rope(float *v, const float *cs, const float *sn, int64_t d) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = b * cs[i] + a * sn[i];
    }
}

/* y = W x for t tokens (rows of x), through the kernel library. */
static int linear(spx_ctx *c, const sp_matrix *w, const float *x, int64_t t, float *y) {
    double t0 = c->profile ? now() : 0.0;
    int rc = t == 1 ? sp_gemv(w, x, y) : sp_gemm(w, x, t, y);
    if (c->profile) c->prof[SPX_T_LINEAR] += now() - t0;
    if (rc) {
        snprintf(g_err, sizeof g_err, "sparse kernel returned %d for a %lldx%lld matrix (kind %d)", rc,
                 (long long)w->rows, (long long)w->cols, (int)w->kind);
    }
    return rc;
}

/* Several matrices sharing the input (unfused q, k, v or gate, up) in one pool dispatch; their rows are laid out
 * side by side in y [t][total]. With t > 1 the kernels write [t][rows_i] blocks into scratch, copied into place. */
static int linear_split(spx_ctx *c, const sp_matrix *const *ws, int n, const float *x, int64_t t, float *y,
                        int64_t total, float *scratch) {
    float *outs[4];
    int64_t off = 0;
    for (int i = 0; i < n; i++) {
        outs[i] = t == 1 ? y + off : scratch + off * t;
        off += ws[i]->rows;
    }
    double t0 = c->profile ? now() : 0.0;
    int rc = t == 1 ? sp_gemv_batch(n, ws, x, outs) : sp_gemm_batch(n, ws, x, t, outs);
    if (c->profile) c->prof[SPX_T_LINEAR] += now() - t0;
    if (rc) {
        snprintf(g_err, sizeof g_err, "sparse kernel batch returned %d", rc);
        return rc;
    }
    if (t > 1) {
        off = 0;
        for (int i = 0; i < n; i++) {
            for (int64_t r = 0; r < t; r++)
                memcpy(y + r * total + off, outs[i] + r * ws[i]->rows, sizeof(float) * ws[i]->rows);
            off += ws[i]->rows;
        }
    }
    return 0;
}

typedef struct attn_job {
    spx_ctx *c;
    int64_t layer, t, pos;
} attn_job;

/* One (head, token) pair: softmax(q K^T * scale) V over keys 0..pos+i (causal), fp32 throughout. K is cached
 * transposed ([head_dim][max_len]) so that the scores of consecutive keys are computed side by side in SIMD lanes
 * with no horizontal sums. */
SPX_CLONES
static void attend_one(spx_ctx *c, int64_t layer, int64_t pos, int64_t h, int64_t i, float *s) {
    const spx_model *m = c->m;
    const int64_t hd = m->head_dim, KV = m->n_kv_heads, L = m->max_len, kvh = h / (m->n_heads / KV);
    const float *Kt = m->k_cache + ((layer * KV + kvh) * hd) * L;
    const float *V = m->v_cache + ((layer * KV + kvh) * L) * hd;
    const float *q = c->qkv + i * c->qkv_rows + h * hd;
    const float scale = m->attn_scale;
    const int64_t n = pos + i + 1;
    for (int64_t j = 0; j < n; j++) s[j] = 0.0f;
    for (int64_t e = 0; e < hd; e++) {
        const float qe = q[e], *kt = Kt + e * L;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) s[j] += qe * kt[j];
    }
    float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; j++) {
        s[j] *= scale;
        mx = s[j] > mx ? s[j] : mx;
    }
#pragma omp simd
    for (int64_t j = 0; j < n; j++) s[j] = spx_exp(s[j] - mx);
    float sum = 0.0f;
    for (int64_t j = 0; j < n; j++) sum += s[j]; /* in key order */
    const float inv = 1.0f / sum;
    float *o = c->att + i * c->qd + h * hd;
    for (int64_t e = 0; e < hd; e++) o[e] = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        const float *vj = V + j * hd;
        const float p = s[j] * inv;
#pragma omp simd
        for (int64_t e = 0; e < hd; e++) o[e] += p * vj[e];
    }
}

/* Pool worker: a strided share of the (head, token) pairs, balanced because later tokens see more keys. */
static void attn_part(void *arg, int part, int nparts) {
    attn_job *j = arg;
    spx_ctx *c = j->c;
    const int64_t H = c->m->n_heads, work = H * j->t;
    float *s = c->scores + (int64_t)part * c->scores_stride;
    for (int64_t w = part; w < work; w += nparts) attend_one(c, j->layer, j->pos, w % H, w / H, s);
}

/* Causal grouped-query attention for t new tokens at positions pos.. (their K/V already in the cache). */
static void attention(spx_ctx *c, int64_t layer, int64_t t, int64_t pos) {
    attn_job j = {c, layer, t, pos};
    int64_t work = c->m->n_heads * t;
    int parts = max_threads();
    if (parts > c->nthreads_alloc) parts = c->nthreads_alloc;
    if (parts > work) parts = (int)work;
    /* a decode step's attention is a few microseconds of work per layer until the cache is long */
    if (parts <= 1 || (t == 1 && pos < 64)) {
        attn_part(&j, 0, 1);
        return;
    }
    sp_parallel(attn_part, &j, parts);
}

int spx_forward(void *ctx, const int64_t *ids, int64_t t, int64_t pos, float *hidden_out, float *logits_out,
                int32_t last_only) {
    spx_ctx *c = ctx;
    if (!c) return fail(-1, "null executor");
    const spx_model *m = c->m;
    if (t < 1 || t > m->max_tokens) return fail(-3, "token count outside 1..max_tokens");
    if (pos < 0 || pos + t > m->max_len) return fail(-4, "sequence longer than the KV cache (max_len)");
    if (logits_out && !m->lm_head.rows) return fail(-1, "logits asked for but the model has no lm_head");
    const int64_t h = m->hidden, f = m->inter, hd = m->head_dim, KV = m->n_kv_heads, L = m->max_len;
    const int64_t qd = c->qd, kvd = c->kvd, qr = c->qkv_rows, half = hd / 2;
    double t_start = c->profile ? now() : 0.0, t0;
    for (int64_t i = 0; i < t; i++) {
        int64_t id = ids[i];
        if (id < 0 || id >= m->vocab) return fail(-5, "token id outside the vocabulary");
        memcpy(c->x + i * h, m->embed + id * h, sizeof(float) * h);
    }
    int rc;
    for (int64_t l = 0; l < m->n_layers; l++) {
        const spx_layer *Ly = &m->layers[l];
        t0 = c->profile ? now() : 0.0;
        rmsnorm(c->x, Ly->attn_norm, c->xn, t, h, m->rms_eps);
        if (c->profile) c->prof[SPX_T_NORM_ROPE] += now() - t0;
        if (Ly->fused_qkv) {
            rc = linear(c, &Ly->q, c->xn, t, c->qkv);
        } else {
            const sp_matrix *ws[3] = {&Ly->q, &Ly->k, &Ly->v};
            rc = linear_split(c, ws, 3, c->xn, t, c->qkv, qr, c->gu);
        }
        if (rc) return rc;
        t0 = c->profile ? now() : 0.0;
        for (int64_t i = 0; i < t; i++) {
            float *row = c->qkv + i * qr;
            if (Ly->q_bias)
                for (int64_t e = 0; e < qd; e++) row[e] += Ly->q_bias[e];
            if (Ly->k_bias)
                for (int64_t e = 0; e < kvd; e++) row[qd + e] += Ly->k_bias[e];
            if (Ly->v_bias)
                for (int64_t e = 0; e < kvd; e++) row[qd + kvd + e] += Ly->v_bias[e];
            const float *cs = m->rope_cos + (pos + i) * half, *sn = m->rope_sin + (pos + i) * half;
            for (int64_t hh = 0; hh < m->n_heads; hh++) rope(row + hh * hd, cs, sn, hd);
            for (int64_t kh = 0; kh < KV; kh++) {
                float *kr = row + qd + kh * hd;
                rope(kr, cs, sn, hd);
                float *kt = m->k_cache + (l * KV + kh) * hd * L + pos + i; /* transposed: [head_dim][max_len] */
                for (int64_t e = 0; e < hd; e++) kt[e * L] = kr[e];
                memcpy(m->v_cache + ((l * KV + kh) * L + pos + i) * hd, row + qd + kvd + kh * hd, sizeof(float) * hd);
            }
        }
        if (c->profile) {
            double t1 = now();
            c->prof[SPX_T_NORM_ROPE] += t1 - t0;
            t0 = t1;
        }
        attention(c, l, t, pos);
        if (c->profile) c->prof[SPX_T_ATTN] += now() - t0;
        if ((rc = linear(c, &Ly->o, c->att, t, c->tmp))) return rc;
        t0 = c->profile ? now() : 0.0;
        for (int64_t i = 0; i < t * h; i++) c->x[i] += c->tmp[i];
        rmsnorm(c->x, Ly->mlp_norm, c->xn, t, h, m->rms_eps);
        if (c->profile) c->prof[SPX_T_NORM_ROPE] += now() - t0;
        if (Ly->fused_gate_up) {
            rc = linear(c, &Ly->gate, c->xn, t, c->gu);
        } else {
            const sp_matrix *ws[2] = {&Ly->gate, &Ly->up};
            rc = linear_split(c, ws, 2, c->xn, t, c->gu, 2 * f, c->act);
        }
        if (rc) return rc;
        t0 = c->profile ? now() : 0.0;
        silu_mul(c->gu, c->act, t, f);
        if (c->profile) c->prof[SPX_T_NORM_ROPE] += now() - t0;
        if ((rc = linear(c, &Ly->down, c->act, t, c->tmp))) return rc;
        for (int64_t i = 0; i < t * h; i++) c->x[i] += c->tmp[i];
    }
    int64_t first = last_only ? t - 1 : 0, nrows = t - first;
    rmsnorm(c->x + first * h, m->final_norm, c->xn, nrows, h, m->rms_eps);
    if (hidden_out) memcpy(hidden_out, c->xn, sizeof(float) * nrows * h);
    if (logits_out) {
        t0 = c->profile ? now() : 0.0;
        rc = nrows == 1 ? sp_gemv(&m->lm_head, c->xn, logits_out) : sp_gemm(&m->lm_head, c->xn, nrows, logits_out);
        if (c->profile) c->prof[SPX_T_LM_HEAD] += now() - t0;
        if (rc) return fail(rc, "lm_head kernel failed");
    }
    if (c->profile) c->prof[SPX_T_TOTAL] += now() - t_start;
    return 0;
}
