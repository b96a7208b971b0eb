/* One decode step of a dense Llama-family model on a CPU, in C: every row of the batch brings one
 * new token at its own position; the step writes their keys and values into the KV cache and
 * returns fp32 logits. cpu_decode.py compiles this (as cpu_kernels.c) and calls it instead of the
 * PyTorch forward pass when the model fits (dense, no biases, rotate-half RoPE).
 *
 * Why: at batch 1 a 25M-parameter model's step is ~60 small matrix-vector products and ~150 other
 * ops; through PyTorch each is a dispatch of several microseconds and the matvecs stream weights at
 * a fraction of the memory bandwidth. Here the whole step is one parallel job for a small thread pool: each matvec
 * streams its weight rows once for all batch rows (nn.Linear's [out, in] layout, a dot product per
 * output), and the threads meet only at the barriers between dependent stages.
 *
 * The threads are this file's own small pool, not OpenMP's: the Engine steps from a background
 * thread, and libgomp gives each calling thread its own pool, which on a machine with as many
 * threads as cores makes libgomp fall back to sleeping at every barrier (measured 3x slower).
 *
 * Weights and cache are T (fp32, or bf16 bits as uint16_t); activations are fp32 throughout, so in
 * bf16 the logits are slightly more exact than PyTorch's, which rounds every intermediate to bf16.
 */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../model/cpu_common.h"

static inline void cpu_relax(void) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

/* -- the thread pool -------------------------------------------------------------------------
 * run(fn, arg, nt) calls fn(arg, tid, nt) on the caller (tid 0) and nt - 1 pool workers, and
 * returns when all are done. Workers spin briefly for the next job (decode steps come back to
 * back), then sleep on a condition variable. One job at a time (a mutex), so two engines in one
 * process take turns. barrier() synchronises the nt threads of the running job. */
#define MAX_THREADS 256
#define SPIN_WAIT 20000  /* pauses (~1 ms) a worker spins before it sleeps */
typedef void (*job_fn)(void *arg, int tid, int nt);
static pthread_mutex_t run_lock = PTHREAD_MUTEX_INITIALIZER, wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static int workers;  /* started so far, each with its tid 1..workers */
static atomic_long generation;  /* bumped once per job */
static atomic_int finished, bar_count, bar_phase;
static job_fn job;
static void *job_arg;
static int job_nt;

static void barrier(int nt) {
    if (nt == 1) return;
    int phase = atomic_load(&bar_phase);
    if (atomic_fetch_add(&bar_count, 1) == nt - 1) {
        atomic_store(&bar_count, 0);
        atomic_fetch_add(&bar_phase, 1);
    } else {
        for (long spins = 0; atomic_load(&bar_phase) == phase; spins++)
            if (spins < SPIN_WAIT) cpu_relax(); else sched_yield();  /* a descheduled peer */
    }
}

static long start_generation[MAX_THREADS];  /* the job a worker was started for is the next one */

static void *worker_main(void *arg) {
    int tid = (int)(intptr_t)arg;
    long seen = start_generation[tid];
    for (;;) {
        for (long spins = 0; atomic_load(&generation) == seen && spins < SPIN_WAIT; spins++) cpu_relax();
        if (atomic_load(&generation) == seen) {
            pthread_mutex_lock(&wake_lock);
            while (atomic_load(&generation) == seen) pthread_cond_wait(&wake, &wake_lock);
            pthread_mutex_unlock(&wake_lock);
        }
        seen = atomic_load(&generation);
        if (tid < job_nt) job(job_arg, tid, job_nt);
        atomic_fetch_add(&finished, 1);
    }
    return NULL;
}

static void after_fork_in_child(void) {  /* the workers did not survive a fork */
    workers = 0;
    pthread_mutex_init(&run_lock, NULL);
    pthread_mutex_init(&wake_lock, NULL);
    pthread_cond_init(&wake, NULL);
}

static void run(job_fn fn, void *arg, int nt) {
    if (nt < 1) nt = 1;
    if (nt > MAX_THREADS) nt = MAX_THREADS;
    pthread_mutex_lock(&run_lock);
    static int atfork_set;
    if (!atfork_set) { pthread_atfork(NULL, NULL, after_fork_in_child); atfork_set = 1; }
    while (workers < nt - 1) {
        pthread_t t;
        start_generation[workers + 1] = atomic_load(&generation);
        if (pthread_create(&t, NULL, worker_main, (void *)(intptr_t)(workers + 1)) != 0) break;
        pthread_detach(t);
        workers++;
    }
    if (nt > workers + 1) nt = workers + 1;
    job = fn; job_arg = arg; job_nt = nt;
    atomic_store(&finished, 0);
    atomic_store(&bar_count, 0);
    pthread_mutex_lock(&wake_lock);
    atomic_fetch_add(&generation, 1);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&wake_lock);
    fn(arg, 0, nt);
    for (long spins = 0; atomic_load(&finished) < workers; spins++)
        if (spins < SPIN_WAIT) cpu_relax(); else sched_yield();
    pthread_mutex_unlock(&run_lock);
}

/* This thread's share [lo, hi) of n iterations (static schedule). */
#define SHARE(n, lo, hi) long lo = (n) * tid / nt, hi = (n) * (tid + 1) / nt

/* With AVX512-BF16 (Intel Sapphire Rapids, AMD Zen 4 and later), a bf16 matvec rounds x to bf16
 * (as PyTorch's bf16 path holds its activations) and multiplies pairs of bf16 with vdpbf16ps,
 * accumulating in fp32: twice the multiply-adds per instruction and no conversion of the weights. */
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
static inline __attribute__((always_inline)) void dp_block(const uint16_t *w[4], const uint16_t *xb[4], const int NB,
                                                           long in, __m512 acc[4][4]) {
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < NB; c++) acc[r][c] = _mm512_setzero_ps();
    for (long i = 0; i < in; i += 32) {
        __m512bh xv[4];
        for (int c = 0; c < NB; c++) xv[c] = (__m512bh)_mm512_loadu_si512(xb[c] + i);
        for (int r = 0; r < 4; r++) {
            __m512bh wv = (__m512bh)_mm512_loadu_si512(w[r] + i);
            for (int c = 0; c < NB; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], wv, xv[c]);
        }
    }
}

/* xh: x in bf16, shared by the threads; `convert` fills it (a split job, then a barrier), the
 * matvecs that follow on the same x (k and v after q, up after gate) reuse it. */
static int matvec_dp_bf16(const uint16_t *W, const float *x, float *y, long B, long in, long out, int add,
                          uint16_t *xh, int convert, int tid, int nt) {
    if (in % 32) return 0;
    if (convert) {
        SHARE(B * in, lo, hi);
        for (long i = lo; i < hi; i++) xh[i] = f2bf(x[i]);
        barrier(nt);
    }
    /* Blocks of 4 weight rows x 4 batch rows: 16 accumulators, each weight vector loaded once per
     * 4 batch rows. A short last block repeats its last row (computed, not stored). */
    SHARE((out + 3) / 4, lo, hi);
    for (long jb = lo; jb < hi; jb++) {
        long j0 = jb * 4;
        const uint16_t *w[4];
        for (int r = 0; r < 4; r++) w[r] = W + (j0 + r < out ? j0 + r : out - 1) * in;
        for (long b0 = 0; b0 < B; b0 += 4) {
            const uint16_t *xb[4];
            for (int c = 0; c < 4; c++) xb[c] = xh + (b0 + c < B ? b0 + c : B - 1) * in;
            __m512 acc[4][4];
            if (B == 1) dp_block(w, xb, 1, in, acc);  /* constant NB: each version keeps its sums in registers */
            else dp_block(w, xb, 4, in, acc);
            for (int r = 0; r < 4 && j0 + r < out; r++)
                for (int c = 0; c < 4 && b0 + c < B; c++) {
                    float sum = _mm512_reduce_add_ps(acc[r][c]), *dst = y + (b0 + c) * out + j0 + r;
                    *dst = add ? *dst + sum : sum;
                }
        }
    }
    return 1;
}
#define MATVEC_FAST_bf16 matvec_dp_bf16
#else
#define MATVEC_FAST_bf16(W, x, y, B, in, out, add, xh, convert, tid, nt) 0
#endif
#define MATVEC_FAST_f32(W, x, y, B, in, out, add, xh, convert, tid, nt) 0


/* Model layout: the pointer table and sizes cpu_decode.py passes. */
enum { P_EMBED, P_NORM, P_HEAD, P_LAYERS };
enum { L_IN_NORM, L_Q, L_K, L_V, L_O, L_POST_NORM, L_GATE, L_UP, L_DOWN, L_KCACHE, L_VCACHE, L_N };
enum { D_LAYERS, D_HIDDEN, D_HEADS, D_KV, D_HEAD_DIM, D_INTER, D_VOCAB, D_MAX_LEN, D_WINDOW, D_N };

#define DECODE(S, T)                                                                               \
/* y[b, j] (+)= sum_i W[j, i] x[b, i], W [out, in], this thread's share of the outputs, then a     \
 * barrier. Blocks of 4 weight rows x 4 batch rows: 16 sums per pass, each weight element loaded    \
 * once per 4 batch rows; a short last block repeats its last row (computed, not stored). */       \
static void matvec_##S(const T *W, const float *x, float *y, long B, long in, long out, int add,    \
                       uint16_t *xh, int convert, int tid, int nt) {                               \
    if (MATVEC_FAST_##S(W, x, y, B, in, out, add, xh, convert, tid, nt)) { barrier(nt); return; }  \
    SHARE((out + 3) / 4, lo, hi);                                                                  \
    for (long jb = lo; jb < hi; jb++) {                                                            \
        long j0 = jb * 4;                                                                          \
        const T *w0 = W + j0 * in, *w1 = W + (j0 + 1 < out ? j0 + 1 : out - 1) * in;               \
        const T *w2 = W + (j0 + 2 < out ? j0 + 2 : out - 1) * in;                                  \
        const T *w3 = W + (j0 + 3 < out ? j0 + 3 : out - 1) * in;                                  \
        for (long b0 = 0; b0 < B; b0 += 4) {                                                       \
            const float *x0 = x + b0 * in, *x1 = x + (b0 + 1 < B ? b0 + 1 : B - 1) * in;           \
            const float *x2 = x + (b0 + 2 < B ? b0 + 2 : B - 1) * in;                              \
            const float *x3 = x + (b0 + 3 < B ? b0 + 3 : B - 1) * in;                              \
            float a[16] = {0};                                                                     \
            float a00 = 0, a01 = 0, a02 = 0, a03 = 0, a10 = 0, a11 = 0, a12 = 0, a13 = 0;          \
            float a20 = 0, a21 = 0, a22 = 0, a23 = 0, a30 = 0, a31 = 0, a32 = 0, a33 = 0;          \
            if (B == 1) {  /* batch 1: one x row, the other three sums unused */                   \
                _Pragma("omp simd reduction(+:a00, a10, a20, a30)")                                \
                for (long i = 0; i < in; i++) {                                                    \
                    float v = x0[i];                                                               \
                    a00 += LD_##S(w0, i) * v; a10 += LD_##S(w1, i) * v;                            \
                    a20 += LD_##S(w2, i) * v; a30 += LD_##S(w3, i) * v;                            \
                }                                                                                  \
            } else {                                                                               \
                _Pragma("omp simd reduction(+:a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33)") \
                for (long i = 0; i < in; i++) {                                                    \
                    float u0 = LD_##S(w0, i), u1 = LD_##S(w1, i), u2 = LD_##S(w2, i), u3 = LD_##S(w3, i); \
                    float v0 = x0[i], v1 = x1[i], v2 = x2[i], v3 = x3[i];                          \
                    a00 += u0 * v0; a01 += u0 * v1; a02 += u0 * v2; a03 += u0 * v3;                \
                    a10 += u1 * v0; a11 += u1 * v1; a12 += u1 * v2; a13 += u1 * v3;                \
                    a20 += u2 * v0; a21 += u2 * v1; a22 += u2 * v2; a23 += u2 * v3;                \
                    a30 += u3 * v0; a31 += u3 * v1; a32 += u3 * v2; a33 += u3 * v3;                \
                }                                                                                  \
            }                                                                                      \
            a[0] = a00; a[1] = a01; a[2] = a02; a[3] = a03; a[4] = a10; a[5] = a11; a[6] = a12;    \
            a[7] = a13; a[8] = a20; a[9] = a21; a[10] = a22; a[11] = a23; a[12] = a30; a[13] = a31; \
            a[14] = a32; a[15] = a33;                                                              \
            for (int r = 0; r < 4 && j0 + r < out; r++)                                            \
                for (int c = 0; c < 4 && b0 + c < B; c++) {                                        \
                    float *dst = y + (b0 + c) * out + j0 + r;                                      \
                    *dst = add ? *dst + a[r * 4 + c] : a[r * 4 + c];                               \
                }                                                                                  \
        }                                                                                          \
    }                                                                                              \
    barrier(nt);                                                                                   \
}                                                                                                  \
                                                                                                   \
static void rmsnorm_rows_##S(const float *x, const T *w, float *y, long B, long n, float eps,       \
                             int tid, int nt) {                                                    \
    SHARE(B, lo, hi);                                                                              \
    for (long b = lo; b < hi; b++) {                                                               \
        const float *xb = x + b * n; float *yb = y + b * n;                                        \
        float ss = 0.f;                                                                            \
        for (long i = 0; i < n; i++) ss += xb[i] * xb[i];                                          \
        float s = 1.f / sqrtf(ss / (float)n + eps);                                                \
        for (long i = 0; i < n; i++) yb[i] = xb[i] * s * LD_##S(w, i);                             \
    }                                                                                              \
    barrier(nt);                                                                                   \
}                                                                                                  \
                                                                                                   \
/* Rotate-half RoPE of one head in place; c/s the row's cos/sin (repeating across the halves). */  \
static void rope_head_##S(float *x, const T *c, const T *s, long D) {                              \
    long half = D / 2;                                                                             \
    for (long i = 0; i < half; i++) {                                                              \
        float a = x[i], b = x[i + half];                                                           \
        x[i] = a * LD_##S(c, i) - b * LD_##S(s, i);                                                \
        x[i + half] = b * LD_##S(c, i + half) + a * LD_##S(s, i + half);                           \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
/* tokens/positions [B]; cos/sin [B, head_dim]; logits [B, vocab] out; scratch: see scratch_floats. \
 * Cache buffers are [B_cache, KV, max_len, head_dim]; rows 0..B-1 are this batch. */              \
typedef struct {                                                                                   \
    void **ptrs; const long *dims; float eps, scale; const int64_t *tokens, *positions; long B;     \
    const T *cos, *sin; float *logits, *scratch;                                                   \
} Step_##S;                                                                                        \
                                                                                                   \
static void step_body_##S(void *arg, int tid, int nt) {                                            \
    const Step_##S *a = arg;                                                                       \
    void **ptrs = a->ptrs;                                                                         \
    const long *dims = a->dims;                                                                    \
    const int64_t *tokens = a->tokens, *positions = a->positions;                                  \
    const T *cos = a->cos, *sin = a->sin;                                                          \
    float eps = a->eps, scale = a->scale, *logits = a->logits;                                     \
    long B = a->B, L = dims[D_LAYERS], Hd = dims[D_HIDDEN], H = dims[D_HEADS], KV = dims[D_KV];    \
    long D = dims[D_HEAD_DIM], I = dims[D_INTER], V = dims[D_VOCAB], M = dims[D_MAX_LEN];          \
    long window = dims[D_WINDOW], G = H / KV;                                                      \
    float *x = a->scratch, *xn = x + B * Hd, *q = xn + B * Hd, *k = q + B * H * D;                 \
    float *v = k + B * KV * D, *att = v + B * KV * D, *gate = att + B * H * D, *up = gate + B * I;  \
    float *probs = up + B * I;  /* [B * H, M] */                                                   \
    uint16_t *xh = (uint16_t *)(probs + B * H * M);  /* a matvec's input in bf16 (bf16 weights) */ \
    const T *embed = (const T *)ptrs[P_EMBED];                                                     \
    {                                                                                              \
        SHARE(B, lo, hi);                                                                          \
        for (long b = lo; b < hi; b++)                                                             \
            for (long i = 0; i < Hd; i++) x[b * Hd + i] = LD_##S(embed + tokens[b] * Hd, i);       \
        barrier(nt);                                                                               \
    }                                                                                              \
    for (long l = 0; l < L; l++) {                                                                 \
        void **lp = ptrs + P_LAYERS + l * L_N;                                                     \
        T *kc = (T *)lp[L_KCACHE], *vc = (T *)lp[L_VCACHE];                                        \
        rmsnorm_rows_##S(x, (const T *)lp[L_IN_NORM], xn, B, Hd, eps, tid, nt);                    \
        matvec_##S((const T *)lp[L_Q], xn, q, B, Hd, H * D, 0, xh, 1, tid, nt);                           \
        matvec_##S((const T *)lp[L_K], xn, k, B, Hd, KV * D, 0, xh, 0, tid, nt);                          \
        matvec_##S((const T *)lp[L_V], xn, v, B, Hd, KV * D, 0, xh, 0, tid, nt);                          \
        {   /* RoPE on q and k heads; k and v rounded into the cache at the row's position. */     \
            SHARE(B * (H + KV), lo, hi);                                                           \
            for (long bh = lo; bh < hi; bh++) {                                                    \
                long b = bh / (H + KV), h = bh % (H + KV);                                         \
                const T *c = cos + b * D, *s = sin + b * D;                                        \
                if (h < H) { rope_head_##S(q + (b * H + h) * D, c, s, D); continue; }              \
                h -= H;                                                                            \
                float *kh = k + (b * KV + h) * D, *vh = v + (b * KV + h) * D;                      \
                rope_head_##S(kh, c, s, D);                                                        \
                long at = ((b * KV + h) * M + positions[b]) * D;                                   \
                for (long i = 0; i < D; i++) { ST_##S(kc + at, i, kh[i]); ST_##S(vc + at, i, vh[i]); } \
            }                                                                                      \
            barrier(nt);                                                                           \
        }                                                                                          \
        {   /* Attention of each (row, head) over the row's cached positions. */                   \
            SHARE(B * H, lo, hi);                                                                  \
            for (long bh = lo; bh < hi; bh++) {                                                    \
                long b = bh / H, h = bh % H, kvh = h / G, pos = positions[b];                      \
                long first = window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0;            \
                const float *qh = q + (b * H + h) * D;                                             \
                const T *kb = kc + (b * KV + kvh) * M * D, *vb = vc + (b * KV + kvh) * M * D;      \
                float *p = probs + bh * M, m = -INFINITY, sum = 0.f;                               \
                long t = first;                                                                    \
                for (; t + 4 <= pos + 1; t += 4) {  /* four keys per pass over q */                \
                    const T *k0 = kb + t * D, *k1 = k0 + D, *k2 = k1 + D, *k3 = k2 + D;            \
                    float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;                                  \
                    _Pragma("omp simd reduction(+:d0, d1, d2, d3)")                                \
                    for (long i = 0; i < D; i++) {                                                 \
                        float qi = qh[i];                                                          \
                        d0 += qi * LD_##S(k0, i); d1 += qi * LD_##S(k1, i);                        \
                        d2 += qi * LD_##S(k2, i); d3 += qi * LD_##S(k3, i);                        \
                    }                                                                              \
                    p[t] = d0 * scale; p[t + 1] = d1 * scale; p[t + 2] = d2 * scale; p[t + 3] = d3 * scale; \
                }                                                                                  \
                for (; t <= pos; t++) {                                                            \
                    float dot = 0.f;                                                               \
                    _Pragma("omp simd reduction(+:dot)")                                           \
                    for (long i = 0; i < D; i++) dot += qh[i] * LD_##S(kb + t * D, i);             \
                    p[t] = dot * scale;                                                            \
                }                                                                                  \
                for (t = first; t <= pos; t++) m = p[t] > m ? p[t] : m;                            \
                for (long t = first; t <= pos; t++) { p[t] = exp_f(p[t] - m); sum += p[t]; }        \
                float *o = att + (b * H + h) * D;                                                  \
                for (long i = 0; i < D; i++) o[i] = 0.f;                                           \
                for (long t = first; t <= pos; t++) {                                              \
                    float w = p[t] / sum;                                                          \
                    _Pragma("omp simd")                                                            \
                    for (long i = 0; i < D; i++) o[i] += w * LD_##S(vb + t * D, i);                \
                }                                                                                  \
            }                                                                                      \
            barrier(nt);                                                                           \
        }                                                                                          \
        matvec_##S((const T *)lp[L_O], att, x, B, H * D, Hd, 1, xh, 1, tid, nt);  /* residual add */ \
        rmsnorm_rows_##S(x, (const T *)lp[L_POST_NORM], xn, B, Hd, eps, tid, nt);                  \
        matvec_##S((const T *)lp[L_GATE], xn, gate, B, Hd, I, 0, xh, 1, tid, nt);                  \
        matvec_##S((const T *)lp[L_UP], xn, up, B, Hd, I, 0, xh, 0, tid, nt);                      \
        {                                                                                          \
            SHARE(B * I, lo, hi);                                                                  \
            for (long i = lo; i < hi; i++) gate[i] = gate[i] / (1.f + exp_f(-gate[i])) * up[i];     \
            barrier(nt);                                                                           \
        }                                                                                          \
        matvec_##S((const T *)lp[L_DOWN], gate, x, B, I, Hd, 1, xh, 1, tid, nt);  /* residual add */ \
    }                                                                                              \
    rmsnorm_rows_##S(x, (const T *)ptrs[P_NORM], xn, B, Hd, eps, tid, nt);                         \
    matvec_##S((const T *)ptrs[P_HEAD], xn, logits, B, Hd, V, 0, xh, 1, tid, nt);                  \
}                                                                                                  \
                                                                                                   \
void decode_step_##S(void **ptrs, const long *dims, float eps, float scale, const int64_t *tokens, \
                     const int64_t *positions, long B, const T *cos, const T *sin, float *logits,  \
                     float *scratch, int nt) {                                                     \
    Step_##S a = {ptrs, dims, eps, scale, tokens, positions, B, cos, sin, logits, scratch};        \
    run(step_body_##S, &a, nt);                                                                    \
}

DECODE(f32, float)
DECODE(bf16, uint16_t)

/* Floats of scratch decode_step needs for a batch of B. */
long scratch_floats(const long *dims, long B) {
    long Hd = dims[D_HIDDEN], H = dims[D_HEADS], KV = dims[D_KV], D = dims[D_HEAD_DIM], I = dims[D_INTER];
    long widest = Hd > H * D ? Hd : H * D;  /* the longest matvec input, for xh */
    widest = widest > I ? widest : I;
    return B * (2 * Hd + 2 * H * D + 2 * KV * D + 2 * I + H * dims[D_MAX_LEN]) + (B * widest + 1) / 2;
}
