/* What lmforge's C files share: bf16 <-> fp32 conversions that round as PyTorch does, a
 * vectorisable exp, and load/store macros over fp32 or bf16 (uint16_t bits) storage.
 * Included by model/cpu_kernels.c and infer/cpu_decode.c; cpu_kernels.build hashes it with them. */
#ifndef LMFORGE_CPU_COMMON_H
#define LMFORGE_CPU_COMMON_H
#include <stdint.h>
#include <string.h>

static inline float bf2f(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {  /* round to nearest even, as c10::BFloat16; branch-free */
    uint32_t u; memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);  /* NaN stays NaN */
}
static inline float rbf(float f) { return bf2f(f2bf(f)); }  /* round a float to bf16 precision */

/* exp(x), written so that it vectorises (glibc's expf does not without -ffast-math): x = n ln2 + r,
 * exp(r) by Cephes' expf polynomial (relative error < 1e-7 over the normal range), 2^n from the
 * exponent bits. Only the integer n is clamped (clamping x too slows the loop): 2^n is then 0 below
 * x ~ -88 and inf above 88.7, and NaN stays NaN. */
static inline float exp_f(float x) {
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* round(x / ln2) */
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;               /* ln2 in two parts */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    int32_t k = (int32_t)n;
    k = k < -127 ? -127 : k;
    k = k > 128 ? 128 : k;
    int32_t bits = (k + 127) << 23;
    float scale; memcpy(&scale, &bits, 4);
    return (p * r * r + r + 1.0f) * scale;
}

#define LD_f32(p, i) ((p)[i])
#define ST_f32(p, i, v) ((p)[i] = (v))
#define RN_f32(v) (v)
#define LD_bf16(p, i) bf2f((p)[i])
#define ST_bf16(p, i, v) ((p)[i] = f2bf(v))
#define RN_bf16(v) rbf(v)

#endif
