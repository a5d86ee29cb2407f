/* Internal: portable float math shared by the executor and the head-loss kernels (header-only, no ABI). */
#ifndef LOSA_SPMATH_H
#define LOSA_SPMATH_H

#include <stdint.h>
#include <string.h>

/* x86-64 gcc: clones for AVX-512 and AVX2 picked at load (ifunc); elsewhere plain C. Every loop of executor.c and
 * headloss.c either keeps one accumulator per output element or lane (summed in a fixed order) or is a max, and
 * -ffp-contract=off forbids fused multiply-adds, so all clones give bit-identical results. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPX_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SPX_CLONES
#endif

/* exp(x) in plain float arithmetic (Cephes' polynomial on x - k ln2, k = round(x / ln2)), within a few ulp of expf,
 * so that loops over it vectorise in every clone: libm's scalar expf made the SiLU and softmax loops dominate.
 * No float compares (they block vectorisation unless AVX-512): |x| is clamped to 87.3 on the bits, and k is
 * rounded with the 1.5 * 2^23 trick. */
static inline float spx_exp(float x) {
    int32_t b;
    memcpy(&b, &x, sizeof b);
    int32_t sign = b & INT32_MIN, mag = b & 0x7fffffff;
    mag = mag < 0x42ae999a ? mag : 0x42ae999a; /* 87.3f */
    b = mag | sign;
    memcpy(&x, &b, sizeof x);
    float fk = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    int32_t k = (int32_t)fk; /* -126 ..= 126 */
    x = x - fk * 0.693359375f;
    x = x - fk * -2.12194440e-4f;
    float z = x * x;
    float y = 1.9875691500e-4f;
    y = y * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * z + x + 1.0f;
    int32_t e = (k + 127) << 23;
    float scale;
    memcpy(&scale, &e, sizeof scale);
    return y * scale;
}

#endif
