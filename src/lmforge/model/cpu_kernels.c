/* Fused CPU kernels for the elementwise parts of a training step: RMSNorm, RoPE and SwiGLU,
 * forward and backward, and the cross-entropy with its gradient, in fp32 and bf16.
 *
 * Why: on a CPU each PyTorch elementwise op is one pass over memory, and autograd runs several
 * per layer (RMSNorm alone is ~10 ops forward and backward). These kernels do each in one or two
 * passes, with OpenMP over rows. They compute in fp32 and, for bf16, round where PyTorch's op
 * sequence rounds, so the results equal the PyTorch reference bit for bit (RMSNorm up to the
 * order of its sum of squares). cpu_kernels.py compiles this file on first use and falls back to
 * PyTorch ops when no C compiler is available.
 *
 * Types: T is float or uint16_t (bf16 bits). All tensors are contiguous row-major.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "cpu_common.h"


/* RMSNorm: y = w * round(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps) (transformers' LlamaRMSNorm). */
#define RMSNORM(S, T)                                                                              \
void rmsnorm_fwd_##S(const T *x, const T *w, T *y, float *rstd, long rows, long dim, float eps,    \
                     int nt) {                                                                     \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                   \
    for (long r = 0; r < rows; r++) {                                                              \
        const T *xr = x + r * dim; T *yr = y + r * dim;                                            \
        float ss = 0.f;                                                                            \
        _Pragma("omp simd reduction(+:ss)")                                                        \
        for (long i = 0; i < dim; i++) { float v = LD_##S(xr, i); ss += v * v; }                   \
        float s = 1.f / sqrtf(ss / (float)dim + eps);                                              \
        rstd[r] = s;                                                                               \
        _Pragma("omp simd")                                                                        \
        for (long i = 0; i < dim; i++) ST_##S(yr, i, RN_##S(LD_##S(xr, i) * s) * LD_##S(w, i));    \
    }                                                                                              \
}                                                                                                  \
/* dx = rstd * (g - n * mean(g * n)), g = dy * w, n = x * rstd; dw = sum over rows of dy * n,      \
 * accumulated per thread into dw_part[nt][dim] (zeroed by the caller) and summed there. */        \
void rmsnorm_bwd_##S(const T *dy, const T *x, const T *w, const float *rstd, T *dx, float *dw_part,\
                     long rows, long dim, int nt) {                                                \
    _Pragma("omp parallel num_threads(nt)")                                                        \
    {                                                                                              \
        float *dwp = dw_part + (long)omp_get_thread_num() * dim;                                   \
        _Pragma("omp for schedule(static)")                                                        \
        for (long r = 0; r < rows; r++) {                                                          \
            const T *xr = x + r * dim, *gr = dy + r * dim; T *dxr = dx + r * dim;                  \
            float s = rstd[r], dot = 0.f;                                                          \
            _Pragma("omp simd reduction(+:dot)")                                                   \
            for (long i = 0; i < dim; i++) {                                                       \
                float n = LD_##S(xr, i) * s, g = LD_##S(gr, i);                                    \
                dot += g * LD_##S(w, i) * n;                                                       \
                dwp[i] += g * RN_##S(n);                                                           \
            }                                                                                      \
            float c = dot / (float)dim;                                                            \
            _Pragma("omp simd")                                                                    \
            for (long i = 0; i < dim; i++)                                                         \
                ST_##S(dxr, i, s * (LD_##S(gr, i) * LD_##S(w, i) - LD_##S(xr, i) * s * c));        \
        }                                                                                          \
    }                                                                                              \
}

/* RoPE, rotate-half convention, on x [rows = B*T, heads, dim] with cos/sin [rows, dim]; x's rows are
 * ldx elements apart (a slice of a fused q/k/v projection), y is contiguous:
 * y = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1). sign = -1 gives the
 * backward pass (the transpose of the rotation: the same formula with -sin, since cos and sin
 * repeat across the two halves). Rounding follows PyTorch: round(round(x*c) + round(r*s)). */
#define ROPE(S, T)                                                                                 \
void rope_##S(const T *x, long ldx, const T *cs, const T *sn, T *y, long rows, long heads, long dim,\
              float sign, int nt) {                                                                \
    long half = dim / 2;                                                                           \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                   \
    for (long r = 0; r < rows; r++) {                                                              \
        const T *c = cs + r * dim, *s = sn + r * dim;                                              \
        for (long h = 0; h < heads; h++) {                                                         \
            const T *xr = x + r * ldx + h * dim; T *yr = y + (r * heads + h) * dim;                \
            _Pragma("omp simd")                                                                    \
            for (long i = 0; i < half; i++) {                                                      \
                float a = RN_##S(LD_##S(xr, i) * LD_##S(c, i));                                    \
                float b = RN_##S(-LD_##S(xr, i + half) * (sign * LD_##S(s, i)));                   \
                ST_##S(yr, i, a + b);                                                              \
                float a2 = RN_##S(LD_##S(xr, i + half) * LD_##S(c, i + half));                     \
                float b2 = RN_##S(LD_##S(xr, i) * (sign * LD_##S(s, i + half)));                   \
                ST_##S(yr, i + half, a2 + b2);                                                     \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}

/* SwiGLU: y = round(silu(g)) * u, g and u [rows, n] with rows ld elements apart (the two halves of
 * a fused gate/up projection), y [rows, n] contiguous. Backward, rounding as autograd does:
 * da = round(dy * u), du = round(dy * a), dg = da * silu'(g), silu'(g) = sig * (1 + g * (1 - sig)). */
#define SWIGLU(S, T)                                                                               \
void swiglu_fwd_##S(const T *g, const T *u, T *y, long rows, long n, long ld, int nt) {            \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                   \
    for (long r = 0; r < rows; r++) {                                                              \
        const T *gr = g + r * ld, *ur = u + r * ld; T *yr = y + r * n;                             \
        _Pragma("omp simd")                                                                        \
        for (long i = 0; i < n; i++) {                                                             \
            float v = LD_##S(gr, i);                                                               \
            ST_##S(yr, i, RN_##S(v / (1.f + exp_f(-v))) * LD_##S(ur, i));                          \
        }                                                                                          \
    }                                                                                              \
}                                                                                                  \
void swiglu_bwd_##S(const T *dy, const T *g, const T *u, T *dg, T *du, long rows, long n, long ld, \
                    int nt) {                                                                      \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                   \
    for (long r = 0; r < rows; r++) {                                                              \
        const T *gr = g + r * ld, *ur = u + r * ld, *dyr = dy + r * n;                             \
        T *dgr = dg + r * ld, *dur = du + r * ld;                                                  \
        _Pragma("omp simd")                                                                        \
        for (long i = 0; i < n; i++) {                                                             \
            float v = LD_##S(gr, i), d = LD_##S(dyr, i);                                           \
            float sig = 1.f / (1.f + exp_f(-v));                                                   \
            float da = RN_##S(d * LD_##S(ur, i));                                                  \
            ST_##S(dur, i, d * RN_##S(v * sig));                                                   \
            ST_##S(dgr, i, da * (sig * (1.f + v * (1.f - sig))));                                  \
        }                                                                                          \
    }                                                                                              \
}

/* Cross-entropy of each row of logits [rows, V] against its label, and its gradient in place of
 * the logits: softmax(x) - onehot(label), all zeros for a row whose label is `ignore` (loss 0).
 * Per row: a max pass, a sum-of-exp pass and the gradient pass, over a row that stays in cache.
 * Labels are checked by the caller (0 <= label < V or ignore). */
#define XENT(S, T)                                                                                 \
void cross_entropy_##S(T *logits, const int64_t *labels, float *loss, long rows, long V, long ignore,\
                       int nt) {                                                                   \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                   \
    for (long r = 0; r < rows; r++) {                                                              \
        T *x = logits + r * V;                                                                     \
        long y = labels[r];                                                                        \
        if (y == ignore) { memset(x, 0, sizeof(T) * V); loss[r] = 0.f; continue; }                 \
        float m = -INFINITY, s = 0.f;                                                              \
        _Pragma("omp simd reduction(max:m)")                                                       \
        for (long i = 0; i < V; i++) { float v = LD_##S(x, i); m = v > m ? v : m; }                \
        _Pragma("omp simd reduction(+:s)")                                                         \
        for (long i = 0; i < V; i++) s += exp_f(LD_##S(x, i) - m);                                 \
        float xy = LD_##S(x, y), inv = 1.f / s;                                                    \
        loss[r] = m + logf(s) - xy;                                                                \
        _Pragma("omp simd")                                                                        \
        for (long i = 0; i < V; i++) ST_##S(x, i, exp_f(LD_##S(x, i) - m) * inv);                  \
        ST_##S(x, y, exp_f(xy - m) * inv - 1.f);                                                   \
    }                                                                                              \
}

/* Causal softmax over attention scores [rows, T] whose row r is query position r % T (the G query
 * heads sharing a KV head stacked as G*T rows): p = softmax(scale * s) over keys 0..t, 0 beyond.
 * Backward: ds = scale * p * (dp - sum(dp * p)), computed in place of dp. */
#define CAUSAL_SOFTMAX(S, T)                                                                       \
void causal_softmax_fwd_##S(const T *s, T *p, long rows, long T_, float scale, int nt) {           \
    _Pragma("omp parallel num_threads(nt)")                                                        \
    {                                                                                              \
        float *e = malloc(sizeof(float) * T_);  /* this thread's exp(x - max), one exp per score */ \
        _Pragma("omp for schedule(static)")                                                        \
        for (long r = 0; r < rows; r++) {                                                          \
            const T *sr = s + r * T_; T *pr = p + r * T_;                                          \
            long n = r % T_ + 1;                                                                   \
            float m = -INFINITY, sum = 0.f;                                                        \
            _Pragma("omp simd reduction(max:m)")                                                   \
            for (long i = 0; i < n; i++) { float v = LD_##S(sr, i) * scale; m = v > m ? v : m; }   \
            _Pragma("omp simd reduction(+:sum)")                                                   \
            for (long i = 0; i < n; i++) { e[i] = exp_f(LD_##S(sr, i) * scale - m); sum += e[i]; } \
            float inv = 1.f / sum;                                                                 \
            _Pragma("omp simd")                                                                    \
            for (long i = 0; i < n; i++) ST_##S(pr, i, e[i] * inv);                                \
            memset(pr + n, 0, sizeof(T) * (T_ - n));                                               \
        }                                                                                          \
        free(e);                                                                                   \
    }                                                                                              \
}                                                                                                  \
void causal_softmax_bwd_##S(T *dp, const T *p, long rows, long T_, float scale, int nt) {          \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                   \
    for (long r = 0; r < rows; r++) {                                                              \
        T *dr = dp + r * T_; const T *pr = p + r * T_;                                             \
        long n = r % T_ + 1;                                                                       \
        float dot = 0.f;                                                                           \
        _Pragma("omp simd reduction(+:dot)")                                                       \
        for (long i = 0; i < n; i++) dot += LD_##S(dr, i) * LD_##S(pr, i);                        \
        _Pragma("omp simd")                                                                        \
        for (long i = 0; i < n; i++) ST_##S(dr, i, scale * LD_##S(pr, i) * (LD_##S(dr, i) - dot)); \
        memset(dr + n, 0, sizeof(T) * (T_ - n));                                                   \
    }                                                                                              \
}

RMSNORM(f32, float)
RMSNORM(bf16, uint16_t)
ROPE(f32, float)
ROPE(bf16, uint16_t)
SWIGLU(f32, float)
SWIGLU(bf16, uint16_t)
XENT(f32, float)
XENT(bf16, uint16_t)
CAUSAL_SOFTMAX(f32, float)
CAUSAL_SOFTMAX(bf16, uint16_t)
