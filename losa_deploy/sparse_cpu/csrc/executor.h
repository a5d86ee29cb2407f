/* losa-deploy sparse-cpu: whole-model executor for Llama-family decoders (RMSNorm, RoPE, grouped-query attention
 * with a KV cache, gated SiLU MLP). The layer loop runs here so that a decode step costs microseconds of
 * bookkeeping next to the weights it streams; every linear goes through sp_gemv / sp_gemm (spkernels.h).
 *
 * Ownership: every pointer in spx_model (weights, norms, rotary tables, KV cache) belongs to the caller
 * (Python keeps the numpy arrays alive); spx_create only allocates scratch for up to max_tokens tokens per call.
 * Layout mirrors runtime.py's ctypes structures: change both together.
 */
#ifndef LOSA_EXECUTOR_H
#define LOSA_EXECUTOR_H
#include <stdint.h>

#include "spkernels.h"

#ifdef __cplusplus
extern "C" {
#endif

#define SPX_ABI_VERSION 2

typedef struct spx_layer {
    const float *attn_norm;  /* [hidden] input_layernorm */
    const float *mlp_norm;   /* [hidden] post_attention_layernorm */
    const float *q_bias;     /* [heads * head_dim] or NULL (Qwen2) */
    const float *k_bias;     /* [kv_heads * head_dim] or NULL */
    const float *v_bias;     /* [kv_heads * head_dim] or NULL */
    int32_t fused_qkv;       /* 1: q holds q|k|v rows in that order (k, v unused) */
    int32_t fused_gate_up;   /* 1: gate holds gate|up rows in that order (up unused) */
    sp_matrix q, k, v, o, gate, up, down;
} spx_layer;

typedef struct spx_model {
    int64_t n_layers, hidden, inter, n_heads, n_kv_heads, head_dim, vocab;
    int64_t max_len;         /* KV cache length (positions) */
    int64_t max_tokens;      /* most tokens per spx_forward call (scratch size) */
    float rms_eps;
    float attn_scale;        /* softmax scale, usually head_dim ** -0.5 */
    const float *embed;      /* [vocab][hidden] */
    const float *final_norm; /* [hidden] */
    const float *rope_cos;   /* [max_len][head_dim / 2], attention scaling already applied */
    const float *rope_sin;   /* [max_len][head_dim / 2] */
    const spx_layer *layers; /* [n_layers] */
    sp_matrix lm_head;       /* [vocab][hidden]; rows == 0 when the caller computes logits itself */
    float *k_cache;          /* [n_layers][n_kv_heads][head_dim][max_len] (RoPE applied; transposed) */
    float *v_cache;          /* [n_layers][n_kv_heads][max_len][head_dim] */
} spx_model;

/* Phase timers (seconds, accumulated while profiling is on). */
enum spx_phase { SPX_T_LINEAR = 0, SPX_T_ATTN = 1, SPX_T_NORM_ROPE = 2, SPX_T_LM_HEAD = 3, SPX_T_TOTAL = 4,
                 SPX_T_COUNT = 5 };

int spx_abi_version(void);
/* Checks the model's shapes; NULL (see spx_last_error) when inconsistent or out of memory. */
void *spx_create(const spx_model *m);
void spx_free(void *ctx);
/* Runs tokens ids[0..t) at positions pos..pos+t (t <= max_tokens, pos + t <= max_len), writing their K/V into the
 * cache. hidden_out [t][hidden] (final-normed states) and/or logits_out [t][vocab] (needs lm_head) may be NULL;
 * with last_only only the last token's row is written (row 0 of each output). Returns 0 or a negative code. */
int spx_forward(void *ctx, const int64_t *ids, int64_t t, int64_t pos, float *hidden_out, float *logits_out,
                int32_t last_only);
const char *spx_last_error(void);
void spx_set_profile(void *ctx, int32_t on);
/* Copies the SPX_T_COUNT accumulated phase times into out and resets them. */
void spx_read_profile(void *ctx, double *out);

#ifdef __cplusplus
}
#endif
#endif
