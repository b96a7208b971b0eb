/* One decode step of a dense Llama-family model on a CPU, in C: every row of the batch brings one
 * new token at its own position; the step writes their keys and values into the KV cache and
 * returns fp32 logits. cpu_decode.py compiles this (as cpu_kernels.c) and calls it instead of the
 * PyTorch forward pass when the model fits (dense, no biases, rotate-half RoPE).
 *
 * Why: at batch 1 a 25M-parameter model's step is ~60 small matrix-vector products and ~150 other
 * ops; through PyTorch each is a dispatch of several microseconds and the matvecs stream weights at
 * a fraction of the memory bandwidth. Here the whole step is one parallel job for a small thread
 * pool: each matvec streams its weight rows once for all batch rows (nn.Linear's [out, in] layout,
 * a dot product per output), and the threads meet only at the barriers between dependent stages. The same step
 * prefills prompts: their tokens are rows too, each with its own cache row and position, in
 * chunks of rows that stay in L2 while the weights stream by.
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

/* The first cached position a token at `pos` attends to: the sliding window's start (0: no window). */
static inline long window_start(long pos, long window) {
    return window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0;
}

/* p[first..pos] = exp(p - max), returning their sum: three loops, each vectorised (one loop with
 * the exp and the sum was scalar). */
static inline float softmax_exp(float *p, long first, long pos) {
    float m = -INFINITY, sum = 0.f;
#pragma omp simd reduction(max:m)
    for (long t = first; t <= pos; t++) m = p[t] > m ? p[t] : m;
#pragma omp simd
    for (long t = first; t <= pos; t++) p[t] = exp_f(p[t] - m);
#pragma omp simd reduction(+:sum)
    for (long t = first; t <= pos; t++) sum += p[t];
    return sum;
}

/* Rows of a matvec's input processed together while the weights stream by: as many as fill
 * CHUNK_BYTES, so that they stay in L2 (a prefill has hundreds; measured on `small`, 1024 prompt
 * tokens, fp32: 0.46 s without chunks, 0.21 s with). A multiple of 4, the batch rows of a block. */
#ifndef CHUNK_BYTES
#define CHUNK_BYTES (512 * 1024)
#endif
static long chunk_rows(long row_bytes) {
    long rows = CHUNK_BYTES / row_bytes / 4 * 4;
    return rows < 16 ? 16 : rows;
}

/* With AVX-512 the matvecs are written in intrinsics, for two reasons.
 * - Prefetch: at batch 16 each block of 4 weight rows serves 4 passes over 4 batch rows; left to
 *   the hardware prefetcher, the first pass waits on memory and the other three leave it idle.
 *   Each pass here also prefetches its share of the next block's cache lines (prefetches never
 *   fault, so the last block may run past its matrix). Measured on `small` in fp32: batch-16 step
 *   8.7 -> 5.8 ms, batch 1 2.55 -> 2.24 ms.
 * - bf16: with AVX512-BF16 (Intel Sapphire Rapids, AMD Zen 4 and later) a bf16 matvec rounds x to
 *   bf16 (as PyTorch's bf16 path holds its activations) and multiplies pairs of bf16 with
 *   vdpbf16ps, accumulating in fp32: twice the multiply-adds per instruction, no conversion of
 *   the weights. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define PREFETCH_LINES(pf, q) do { for (int e = 0; e < (q); e++) _mm_prefetch((const char *)(pf) + 64 * e, _MM_HINT_T0); } while (0)

static inline __attribute__((always_inline)) void fma_block(const float *w[4], const float *xb[4], const int NB,
                                                            long in, uintptr_t pf, int q, __m512 acc[4][4]) {
    for (int r = 0; r < 4; r++)  /* all 16, with NB = 1 too: see reduce_4x4 */
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (long i = 0; i < in; i += 16, pf += 64 * q) {  /* one cache line of each weight row */
        PREFETCH_LINES(pf, q);
        __m512 xv[4];
        for (int c = 0; c < NB; c++) xv[c] = _mm512_loadu_ps(xb[c] + i);
        for (int r = 0; r < 4; r++) {
            __m512 wv = _mm512_loadu_ps(w[r] + i);
            for (int c = 0; c < NB; c++) acc[r][c] = _mm512_fmadd_ps(wv, xv[c], acc[r][c]);
        }
    }
}

#if defined(__AVX512BF16__)
#define HAVE_DP_BF16 1
static inline __attribute__((always_inline)) void dp_block(const uint16_t *w[4], const uint16_t *xb[4], const int NB,
                                                           long in, uintptr_t pf, int q, __m512 acc[4][4]) {
    for (int r = 0; r < 4; r++)  /* all 16, with NB = 1 too: see reduce_4x4 */
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (long i = 0; i < in; i += 32, pf += 64 * q) {
        PREFETCH_LINES(pf, q);
        __m512bh xv[4];
        for (int c = 0; c < NB; c++) xv[c] = (__m512bh)_mm512_loadu_si512(xb[c] + i);
        for (int r = 0; r < 4; r++) {
            __m512bh wv = (__m512bh)_mm512_loadu_si512(w[r] + i);
            for (int c = 0; c < NB; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], wv, xv[c]);
        }
    }
}
#else
#define HAVE_DP_BF16 0
#define dp_block(w, xb, NB, in, pf, q, acc) ((void)0)
#endif

/* The 16 sums of acc[r][c] (each over its 16 lanes) as one vector, lane 4c + r: a tree of
 * in-lane unpacks and cross-lane shuffles, 30 shuffles for all 16 where one reduction each took 64.
 * Batch 1 (its other 12 sums zero) goes through it too: each sum's lanes are added in the same order
 * whatever the batch, so a token's outputs are bitwise the same alone, beside other rows and in a
 * prefill (batching and the Engine's prefix cache change no result), at no measured cost. */
static inline __m512 reduce_4x4(__m512 acc[4][4]) {
    __m512 s[8], u[4], w[2];
    for (int c = 0; c < 4; c++)  /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        for (int h = 0; h < 2; h++) {
            __m512 a = acc[2 * h][c], b = acc[2 * h + 1][c];
            s[2 * c + h] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        }
    for (int c = 0; c < 4; c++) {  /* per 128-bit lane: [r0, r1, r2, r3] partial sums */
        __m512d a = _mm512_castps_pd(s[2 * c]), b = _mm512_castps_pd(s[2 * c + 1]);
        u[c] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int h = 0; h < 2; h++)  /* lanes: u[2h] halves, u[2h + 1] halves */
        w[h] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * h], u[2 * h + 1], 0x88),
                             _mm512_shuffle_f32x4(u[2 * h], u[2 * h + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

/* y[b, j] (+)= sum_i W[j, i] X[b, i] for this thread's share of the outputs, in blocks of 4 weight
 * rows x 4 batch rows: 16 accumulators, each weight vector loaded once per 4 batch rows. A short
 * last block repeats its last row (computed, not stored). X is fp32 for fp32 weights, bf16 (xh) for
 * bf16 weights. */
static void matvec_blocks(const void *W, int bf16, const void *X, float *y, long B, long in, long out, int add,
                          int tid, int nt) {
    long elem = bf16 ? 2 : 4, lines = in * elem / 64;
    long chunk = chunk_rows(in * elem);
    SHARE((out + 3) / 4, lo, hi);
    for (long c0 = 0; c0 < B; c0 += chunk)
    for (long jb = lo; jb < hi; jb++) {
        long j0 = jb * 4, c1 = c0 + chunk < B ? c0 + chunk : B, passes = (c1 - c0 + 3) / 4;
        int q = passes >= 4 ? 1 : passes == 1 ? 4 : 2;  /* lines to prefetch per line read, so that the passes cover 4 rows */
        const char *w[4];
        for (int r = 0; r < 4; r++) w[r] = (const char *)W + (j0 + r < out ? j0 + r : out - 1) * in * elem;
        for (long p = 0; p < passes; p++) {
            long b0 = c0 + p * 4;
            const char *xb[4];
            for (int c = 0; c < 4; c++) xb[c] = (const char *)X + (b0 + c < B ? b0 + c : B - 1) * in * elem;
            uintptr_t pf = (uintptr_t)W + (uintptr_t)((j0 + 4) * in * elem + p * lines * q * 64);
            __m512 acc[4][4];
            /* constant NB: each version keeps its sums in registers */
            if (bf16 && B == 1) dp_block((const uint16_t **)w, (const uint16_t **)xb, 1, in, pf, q, acc);
            else if (bf16) dp_block((const uint16_t **)w, (const uint16_t **)xb, 4, in, pf, q, acc);
            else if (B == 1) fma_block((const float **)w, (const float **)xb, 1, in, pf, q, acc);
            else fma_block((const float **)w, (const float **)xb, 4, in, pf, q, acc);
            float sums[16];  /* sums[4c + r] = y[b0 + c, j0 + r] */
            _mm512_storeu_ps(sums, reduce_4x4(acc));
            for (int c = 0; c < 4 && b0 + c < B; c++) {
                float *dst = y + (b0 + c) * out + j0;
                if (j0 + 4 <= out) {
                    __m128 v = _mm_loadu_ps(sums + 4 * c);
                    _mm_storeu_ps(dst, add ? _mm_add_ps(_mm_loadu_ps(dst), v) : v);
                } else {
                    for (int r = 0; j0 + r < out; r++) dst[r] = add ? dst[r] + sums[4 * c + r] : sums[4 * c + r];
                }
            }
        }
    }
}

/* With AMX (Intel Sapphire Rapids and later), bf16 matvecs over several batch rows run on the tile
 * unit: 16 weight rows x 32 inputs (a tile loaded straight from W) times the same 32 inputs of 16
 * batch rows (x converted to bf16 and packed in pairs, AMX's layout for the second operand) give a
 * 16 x 16 block of y^T, 8192 multiply-adds per instruction, accumulated in fp32. At batch 16 that
 * leaves the step bound by reading the weights, as batch 1 is (Intel's AMX programming reference,
 * "Intel Architecture Instruction Set Extensions", ch. 3). */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && HAVE_DP_BF16
#include <sys/syscall.h>
#include <unistd.h>
#define AMX_MIN_ROWS 5  /* the dot products take one pass per 4 rows: as fast up to 4 rows (measured) */
static int amx_usable(void) {
    static atomic_int ok = -1;  /* Linux hands out the tile state only on request, once per process */
    if (atomic_load(&ok) < 0) atomic_store(&ok, syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                                        18 /* XFEATURE_XTILEDATA */) == 0);
    return atomic_load(&ok);
}

typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } TileConfig;

/* x [B, in] -> xp: per 16 batch rows (the last padded with zeros), in/2 rows of 16 x (2 bf16). */
static void amx_pack(const float *x, uint16_t *xp, long B, long in, int tid, int nt) {
    /* A thread's share is whole 1 KB blocks (16 rows x 32 inputs), built on the stack and copied
     * out: rows split between threads would share every cache line (measured 3x slower). */
    long chunks = in / 32;
    SHARE((B + 15) / 16 * chunks, lo, hi);
    for (long u = lo; u < hi; u++) {
        long m0 = u / chunks * 16, i0 = u % chunks * 32;
        uint32_t block[16][16];  /* [pair][row]: inputs i0 + 2j, i0 + 2j + 1 of row m0 + r */
        for (long r = 0; r < 16; r++) {
            const float *xb = x + (m0 + r < B ? m0 + r : 0) * in + i0;
            int real = m0 + r < B;
            _Pragma("omp simd")
            for (int j = 0; j < 16; j++)
                block[j][r] = real ? f2bf(xb[2 * j]) | (uint32_t)f2bf(xb[2 * j + 1]) << 16 : 0;
        }
        memcpy(xp + m0 * in + i0 * 16, block, sizeof block);
    }
}

/* Weight rows n0..n0+15 at inputs k0..k0+31 into tile `t`; a last block of fewer rows is copied,
 * padded with zeros, into `tail` first. */
#define LOAD_W(t, n0)                                                                              \
    do {                                                                                           \
        if ((n0) + 16 <= out) {                                                                    \
            _tile_loadd(t, W + (n0) * in + k0, in * 2);                                            \
        } else {                                                                                   \
            for (long r = 0; r < 16; r++)                                                          \
                for (int i = 0; i < 32; i++) tail[r * 32 + i] = (n0) + r < out ? W[((n0) + r) * in + k0 + i] : 0; \
            _tile_loadd(t, tail, 64);                                                              \
        }                                                                                          \
    } while (0)

/* Blocks of 2 x 16 weight rows times 2 x 16 batch rows: four accumulator tiles (0-3), two of weights
 * (4, 5) and two of x (6, 7), one tile load per multiply (one block of batch rows: two loads per
 * multiply, as a decode step of up to 16 rows has; a prefill of 64 rows measured 1.5x faster so). */
static void matvec_amx(const uint16_t *W, const uint16_t *xp, float *y, long B, long in, long out, int add,
                       int tid, int nt) {
    TileConfig cfg = {0};
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);  /* per call: PyTorch's oneDNN may have set its own on this thread */
    float c[4][16][16];  /* [nb + 2 mb][n][m] */
    uint16_t tail[16 * 32];
    SHARE((out + 15) / 16, lo, hi);
    long chunk = (chunk_rows(in * 2) + 31) / 32 * 32;  /* rows of xp that stay in L2 */
    for (long c0 = 0; c0 < B; c0 += chunk)
    for (long jb = lo; jb < hi; jb += 2) {
        int nblocks = jb + 1 < hi ? 2 : 1;
        long n0 = jb * 16, n1 = n0 + 16;
        for (long m0 = c0; m0 < B && m0 < c0 + chunk; m0 += 32) {
            int mblocks = m0 + 16 < B ? 2 : 1;
            const uint16_t *x0 = xp + m0 * in, *x1 = x0 + 16 * in;
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (long k0 = 0; k0 < in; k0 += 32) {
                _tile_loadd(6, x0 + k0 * 16, 64);
                if (mblocks == 2) _tile_loadd(7, x1 + k0 * 16, 64);
                LOAD_W(4, n0);
                _tile_dpbf16ps(0, 4, 6);
                if (mblocks == 2) _tile_dpbf16ps(2, 4, 7);
                if (nblocks == 2) {
                    LOAD_W(5, n1);
                    _tile_dpbf16ps(1, 5, 6);
                    if (mblocks == 2) _tile_dpbf16ps(3, 5, 7);
                }
            }
            _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64);
            _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64);
            for (int mb = 0; mb < mblocks; mb++)
                for (int nb = 0; nb < nblocks; nb++) {
                    long nn = n0 + 16 * nb, mm = m0 + 16 * mb;
                    float (*cb)[16] = c[nb + 2 * mb];
                    for (long m = 0; m < 16 && mm + m < B; m++)
                        for (long n = 0; n < 16 && nn + n < out; n++) {
                            float *dst = y + (mm + m) * out + nn + n;
                            *dst = add ? *dst + cb[n][m] : cb[n][m];
                        }
                }
        }
    }
    _tile_release();
}
#undef LOAD_W
#define AMX_ROWS(B) ((B) >= AMX_MIN_ROWS && amx_usable())
#else
#define AMX_ROWS(B) 0
#define AMX_MIN_ROWS 0
#define amx_pack(x, xp, B, in, tid, nt) ((void)0)
#define matvec_amx(W, xp, y, B, in, out, add, tid, nt) ((void)0)
#endif

/* xh: x in bf16 (packed for AMX when the tiles take it), shared by the threads; `convert` fills it
 * (a split job, then a barrier), the matvecs that follow on the same x (k and v after q, up after
 * gate) reuse it. */
static int matvec_avx512_bf16(const uint16_t *W, const float *x, float *y, long B, long in, long out, int add,
                              uint16_t *xh, int convert, int tid, int nt) {
    if (!HAVE_DP_BF16 || in % 32) return 0;
    if (AMX_ROWS(B)) {  /* xh holds x packed for AMX: which layout depends on B and `in` alone */
        if (convert) {
            amx_pack(x, xh, B, in, tid, nt);
            barrier(nt);
        }
        matvec_amx(W, xh, y, B, in, out, add, tid, nt);
        return 1;
    }
    if (convert) {
        SHARE(B * in, lo, hi);
        for (long i = lo; i < hi; i++) xh[i] = f2bf(x[i]);
        barrier(nt);
    }
    matvec_blocks(W, 1, xh, y, B, in, out, add, tid, nt);
    return 1;
}

static int matvec_avx512_f32(const float *W, const float *x, float *y, long B, long in, long out, int add,
                             uint16_t *xh, int convert, int tid, int nt) {
    (void)xh; (void)convert;
    if (in % 16) return 0;
    matvec_blocks(W, 0, x, y, B, in, out, add, tid, nt);
    return 1;
}
#define MATVEC_FAST_bf16 matvec_avx512_bf16
#define MATVEC_FAST_f32 matvec_avx512_f32

/* Attention of the G query heads that share one key/value head, in intrinsics: for each head g,
 * o_g = softmax(scale * K q_g) V over positions first..pos of a row's cache. Keys 16 at a time
 * (bf16 converted to fp32 once for all G heads), their sums gathered by reduce_4x4; then each value
 * row is loaded once for all G heads. (The portable per-head loops below reduced each key's sum
 * lane by lane and converted the cache once per head: ~4x slower at batch 16.) p: G rows of
 * `pstride` scores. */
static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline const float *keys16_f32(const float *k, long D, float *buf) { (void)D; (void)buf; return k; }
static inline const float *keys16_bf16(const uint16_t *k, long D, float *buf) {
    for (long i = 0; i < 16 * D; i += 16) _mm512_storeu_ps(buf + i, load16_bf16(k + i));
    return buf;
}
#define ATTEND(S, T)                                                                               \
static int attend_avx512_##S(const float *qg, const T *kb, const T *vb, long first, long pos, long D, \
                             long G, float scale, float *p, long pstride, float *og) {             \
    if (D % 16 || D > 256 || G > 16) return 0;                                                     \
    long nd = D / 16, t = first;                                                                   \
    float kbuf[16 * 256];                                                                          \
    for (; t + 16 <= pos + 1; t += 16) {                                                           \
        const float *kf = keys16_##S(kb + t * D, D, kbuf);                                         \
        for (long g = 0; g < G; g++) {                                                             \
            __m512 qv[16], acc[4][4];                                                              \
            for (long c = 0; c < nd; c++) qv[c] = _mm512_loadu_ps(qg + g * D + 16 * c);            \
            for (int j = 0; j < 16; j++) {  /* key t + j: its sum lands in lane j */              \
                __m512 a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kf + j * D));                      \
                for (long c = 1; c < nd; c++) a = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kf + j * D + 16 * c), a); \
                acc[j % 4][j / 4] = a;                                                             \
            }                                                                                      \
            _mm512_storeu_ps(p + g * pstride + t, _mm512_mul_ps(reduce_4x4(acc), _mm512_set1_ps(scale))); \
        }                                                                                          \
    }                                                                                              \
    for (; t <= pos; t++)                                                                          \
        for (long g = 0; g < G; g++) {                                                             \
            __m512 a = _mm512_setzero_ps();                                                        \
            for (long c = 0; c < nd; c++)                                                          \
                a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + g * D + 16 * c), load16_##S(kb + t * D + 16 * c), a); \
            p[g * pstride + t] = _mm512_reduce_add_ps(a) * scale;                                  \
        }                                                                                          \
    float inv[16];                                                                                 \
    for (long g = 0; g < G; g++) inv[g] = 1.f / softmax_exp(p + g * pstride, first, pos);          \
    for (long c = 0; c < nd; c++) {                                                                \
        __m512 acc[16];                                                                            \
        for (long g = 0; g < G; g++) acc[g] = _mm512_setzero_ps();                                 \
        for (t = first; t <= pos; t++) {                                                           \
            __m512 v = load16_##S(vb + t * D + 16 * c);                                            \
            for (long g = 0; g < G; g++) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * pstride + t]), v, acc[g]); \
        }                                                                                          \
        for (long g = 0; g < G; g++) _mm512_storeu_ps(og + g * D + 16 * c, _mm512_mul_ps(acc[g], _mm512_set1_ps(inv[g]))); \
    }                                                                                              \
    return 1;                                                                                      \
}
ATTEND(f32, float)
ATTEND(bf16, uint16_t)
#define ATTEND_FAST_f32 attend_avx512_f32
#define ATTEND_FAST_bf16 attend_avx512_bf16

/* Attention of a run of R consecutive tokens of one cache row (part of a prompt, in a prefill; one
 * token, R = 1, in a decode step) for one key/value head, as two matrix products instead of R * G
 * vector ones: the scores of all R * G
 * queries against the row's keys by matvec_blocks (the keys as its weight rows: each key loaded
 * once per 4 queries, bf16 keys in vdpbf16ps dot products with the queries rounded to bf16, as
 * PyTorch's bf16 attention holds them), a softmax per query over its own keys (causal: the run's
 * later tokens see more; 0 for the others), then P V in 4 x 4 blocks of queries x 16 dimensions,
 * each value row loaded once per 4 queries. Per token, the vector kernel above re-read every key
 * and value for each query: a 1024-token bf16 prefill of `small` spent 48% of its time there (now
 * 1.37x faster in all). Decode steps gain too, from the bf16 dot products: batch 16 5% (fp32 3%).
 * q, att: the run's first token's q and output rows ([token][H][D]); s: R * G * (max_len + D)
 * floats of scratch. Keys from position kfirst (the sliding window's start for the first token). */
#define ATTEND_RUN(S, T, BF)                                                                       \
static int attend_run_##S(const float *q, long H, long kvh, const T *kb, const T *vb, long pos0,  \
                          long R, long window, long D, long G, float scale, float *s, float *att) { \
    if (D % 64 || (BF && !HAVE_DP_BF16)) return 0;                                                 \
    long n = R * G, plast = pos0 + R - 1, nd = D / 16;                                            \
    long kfirst = window_start(pos0, window), nk = plast - kfirst + 1;                             \
    float *qx = s + n * nk;                                                                        \
    for (long i = 0; i < n; i++) {  /* the queries, contiguous: row i = token i / G, head i % G */  \
        const float *src = q + ((i / G) * H + kvh * G + i % G) * D;                                \
        if (BF) for (long d = 0; d < D; d++) ((uint16_t *)qx)[i * D + d] = f2bf(src[d]);           \
        else memcpy(qx + i * D, src, D * sizeof(float));                                           \
    }                                                                                              \
    matvec_blocks(kb + kfirst * D, BF, qx, s, n, D, nk, 0, 0, 1);  /* s[i][j] = q_i . k_(kfirst+j) */ \
    for (long i = 0; i < n; i++) {                                                                 \
        long pos = pos0 + i / G, lo = window_start(pos, window) - kfirst, hi = pos - kfirst;     \
        float *p = s + i * nk;                                                                     \
        for (long t = lo; t <= hi; t++) p[t] *= scale;                                             \
        float inv = 1.f / softmax_exp(p, lo, hi);                                                  \
        for (long t = 0; t < lo; t++) p[t] = 0.f;                                                  \
        for (long t = lo; t <= hi; t++) p[t] *= inv;                                               \
        for (long t = hi + 1; t < nk; t++) p[t] = 0.f;                                             \
    }                                                                                              \
    for (long i0 = 0; i0 < n; i0 += 4) {                                                           \
        long last = i0 + 3 < n ? i0 + 3 : n - 1, tmax = pos0 + last / G - kfirst + 1;              \
        const float *pq[4];  /* a short last block repeats its last query (computed, not stored) */ \
        for (int j = 0; j < 4; j++) pq[j] = s + (i0 + j < n ? i0 + j : n - 1) * nk;                \
        for (long c0 = 0; c0 < nd; c0 += 4) {                                                      \
            __m512 acc[4][4];                                                                      \
            for (int j = 0; j < 4; j++)                                                            \
                for (int c = 0; c < 4; c++) acc[j][c] = _mm512_setzero_ps();                       \
            for (long t = 0; t < tmax; t++) {                                                      \
                const T *vrow = vb + (kfirst + t) * D + 16 * c0;                                   \
                __m512 v[4];                                                                       \
                for (int c = 0; c < 4; c++) v[c] = load16_##S(vrow + 16 * c);                      \
                for (int j = 0; j < 4; j++) {                                                      \
                    __m512 w = _mm512_set1_ps(pq[j][t]);                                           \
                    for (int c = 0; c < 4; c++) acc[j][c] = _mm512_fmadd_ps(w, v[c], acc[j][c]);   \
                }                                                                                  \
            }                                                                                      \
            for (int j = 0; j < 4 && i0 + j < n; j++) {                                            \
                long i = i0 + j;                                                                   \
                float *o = att + ((i / G) * H + kvh * G + i % G) * D + 16 * c0;                    \
                for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + 16 * c, acc[j][c]);               \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    return 1;                                                                                      \
}
ATTEND_RUN(f32, float, 0)
ATTEND_RUN(bf16, uint16_t, 1)
#define ATTEND_RUN_f32 attend_run_f32
#define ATTEND_RUN_bf16 attend_run_bf16
#else
#define MATVEC_FAST_bf16(W, x, y, B, in, out, add, xh, convert, tid, nt) 0
#define MATVEC_FAST_f32(W, x, y, B, in, out, add, xh, convert, tid, nt) 0
#define ATTEND_FAST_f32(qg, kb, vb, first, pos, D, G, scale, p, pstride, og) 0
#define ATTEND_FAST_bf16(qg, kb, vb, first, pos, D, G, scale, p, pstride, og) 0
#define ATTEND_RUN_f32(q, H, kvh, kb, vb, pos0, R, window, D, G, scale, s, att) 0
#define ATTEND_RUN_bf16(q, H, kvh, kb, vb, pos0, R, window, D, G, scale, s, att) 0
#endif
/* The most tokens of a prefill's run that attend together (attend_run): its scratch per thread is
 * RUN_MAX * G * (max_len + head_dim) floats. */
#define RUN_MAX 16


/* Model layout: the pointer table and sizes cpu_decode.py passes. */
enum { P_EMBED, P_NORM, P_HEAD, P_LAYERS };
enum { L_IN_NORM, L_Q, L_K, L_V, L_O, L_POST_NORM, L_GATE, L_UP, L_DOWN, L_KCACHE, L_VCACHE, L_N };
enum { D_LAYERS, D_HIDDEN, D_HEADS, D_KV, D_HEAD_DIM, D_INTER, D_VOCAB, D_MAX_LEN, D_WINDOW, D_N };

#define DECODE(S, T)                                                                               \
/* y[b, j] (+)= sum_i W[j, i] x[b, i], W [out, in], this thread's share of the outputs, then a     \
 * barrier if `sync` (matvecs of the same input, q/k/v and gate/up, need one after the last only). \
 * Blocks of 4 weight rows x 4 batch rows: 16 sums per pass, each weight element loaded once per   \
 * 4 batch rows; a short last block repeats its last row (computed, not stored). */                \
static void matvec_##S(const T *W, const float *x, float *y, long B, long in, long out, int add,    \
                       uint16_t *xh, int convert, int sync, int tid, int nt) {                     \
    if (MATVEC_FAST_##S(W, x, y, B, in, out, add, xh, convert, tid, nt)) {                         \
        if (sync) barrier(nt);                                                                     \
        return;                                                                                    \
    }                                                                                              \
    SHARE((out + 3) / 4, lo, hi);                                                                  \
    long chunk = chunk_rows(in * sizeof(float));                                                   \
    for (long c0 = 0; c0 < B; c0 += chunk)                                                         \
    for (long jb = lo; jb < hi; jb++) {                                                            \
        long j0 = jb * 4, c1 = c0 + chunk < B ? c0 + chunk : B;                                    \
        const T *w0 = W + j0 * in, *w1 = W + (j0 + 1 < out ? j0 + 1 : out - 1) * in;               \
        const T *w2 = W + (j0 + 2 < out ? j0 + 2 : out - 1) * in;                                  \
        const T *w3 = W + (j0 + 3 < out ? j0 + 3 : out - 1) * in;                                  \
        for (long b0 = c0; b0 < c1; b0 += 4) {                                                     \
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
    if (sync) barrier(nt);                                                                         \
}                                                                                                  \
                                                                                                   \
static void rmsnorm_rows_##S(const float *x, const T *w, float *y, long B, long n, float eps,       \
                             int tid, int nt) {                                                    \
    SHARE(B, lo, hi);                                                                              \
    for (long b = lo; b < hi; b++) {                                                               \
        const float *xb = x + b * n; float *yb = y + b * n;                                        \
        float ss = 0.f;                                                                            \
        _Pragma("omp simd reduction(+:ss)")  /* else a scalar loop: strict fp order */            \
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
/* B tokens, token b at position positions[b] of cache row rows[b]; cos/sin [max_len, head_dim]   \
 * tables by position; logits [n_out, vocab] out for the tokens out[0] < out[1] < ... (NULL: all  \
 * B); scratch: scratch_floats.                                                                    \
 * Cache buffers are [B_cache, KV, max_len, head_dim]. A decode step is one token per row; a       \
 * prefill is a row's whole prompt (its keys and values are all written before any attention).    */ \
typedef struct {                                                                                   \
    void **ptrs; const long *dims; float eps, scale; const int64_t *tokens, *positions, *rows;      \
    long B; const T *cos, *sin; const int64_t *out; long n_out; float *logits, *scratch;            \
    int runs;  /* some token follows the one before it in its row (a prefill) */                   \
} Step_##S;                                                                                        \
                                                                                                   \
/* Attention of one token's G query heads qg (outputs og) over its row's keys kb and values vb up  \
 * to `pos`, where attend_run does not apply: the vector kernel, or portable loops. probs: G *     \
 * max_len floats of scratch. */                                                                   \
static void attend_one_##S(const float *qg, float *og, const T *kb, const T *vb, long pos, long window, \
                           long D, long G, long M, float scale, float *probs) {                    \
    long first = window_start(pos, window);                                                        \
    if (ATTEND_FAST_##S(qg, kb, vb, first, pos, D, G, scale, probs, M, og)) return;                \
    for (long g = 0; g < G; g++) {                                                                 \
        const float *qh = qg + g * D;                                                              \
        float *p = probs;                                                                          \
        long t = first;                                                                            \
        for (; t + 4 <= pos + 1; t += 4) {  /* four keys per pass over q */                        \
            const T *k0 = kb + t * D, *k1 = k0 + D, *k2 = k1 + D, *k3 = k2 + D;                    \
            float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;                                          \
            _Pragma("omp simd reduction(+:d0, d1, d2, d3)")                                        \
            for (long i = 0; i < D; i++) {                                                         \
                float qi = qh[i];                                                                  \
                d0 += qi * LD_##S(k0, i); d1 += qi * LD_##S(k1, i);                                \
                d2 += qi * LD_##S(k2, i); d3 += qi * LD_##S(k3, i);                                \
            }                                                                                      \
            p[t] = d0 * scale; p[t + 1] = d1 * scale; p[t + 2] = d2 * scale; p[t + 3] = d3 * scale;\
        }                                                                                          \
        for (; t <= pos; t++) {                                                                    \
            float dot = 0.f;                                                                       \
            _Pragma("omp simd reduction(+:dot)")                                                   \
            for (long i = 0; i < D; i++) dot += qh[i] * LD_##S(kb + t * D, i);                     \
            p[t] = dot * scale;                                                                    \
        }                                                                                          \
        float sum = softmax_exp(p, first, pos);                                                    \
        float *o = og + g * D;                                                                     \
        for (long i = 0; i < D; i++) o[i] = 0.f;                                                   \
        for (long t = first; t <= pos; t++) {                                                      \
            float w = p[t] / sum;                                                                  \
            _Pragma("omp simd")                                                                    \
            for (long i = 0; i < D; i++) o[i] += w * LD_##S(vb + t * D, i);                        \
        }                                                                                          \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
static void step_body_##S(void *arg, int tid, int nt) {                                            \
    const Step_##S *a = arg;                                                                       \
    void **ptrs = a->ptrs;                                                                         \
    const long *dims = a->dims;                                                                    \
    const int64_t *tokens = a->tokens, *positions = a->positions, *rows = a->rows, *out = a->out;   \
    const T *cos = a->cos, *sin = a->sin;                                                          \
    float eps = a->eps, scale = a->scale, *logits = a->logits;                                     \
    long B = a->B, L = dims[D_LAYERS], Hd = dims[D_HIDDEN], H = dims[D_HEADS], KV = dims[D_KV];    \
    long D = dims[D_HEAD_DIM], I = dims[D_INTER], V = dims[D_VOCAB], M = dims[D_MAX_LEN];          \
    long window = dims[D_WINDOW], G = H / KV;                                                      \
    float *x = a->scratch, *xn = x + B * Hd, *q = xn + B * Hd, *k = q + B * H * D;                 \
    float *v = k + B * KV * D, *att = v + B * KV * D, *gate = att + B * H * D, *up = gate + B * I;  \
    long pn = RUN_MAX * G * (M + D);  /* per thread: attention weights (and a run's queries) */      \
    float *probs = up + B * I + tid * pn;                                                          \
    uint16_t *xh = (uint16_t *)(up + B * I + nt * pn);  /* a matvec's input in bf16 (bf16 weights) */ \
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
        matvec_##S((const T *)lp[L_Q], xn, q, B, Hd, H * D, 0, xh, 1, 0, tid, nt);                           \
        matvec_##S((const T *)lp[L_K], xn, k, B, Hd, KV * D, 0, xh, 0, 0, tid, nt);                          \
        matvec_##S((const T *)lp[L_V], xn, v, B, Hd, KV * D, 0, xh, 0, 1, tid, nt);                          \
        {   /* RoPE on q and k heads; k and v rounded into the cache at the row's position. */     \
            SHARE(B * (H + KV), lo, hi);                                                           \
            for (long bh = lo; bh < hi; bh++) {                                                    \
                long b = bh / (H + KV), h = bh % (H + KV);                                         \
                const T *c = cos + positions[b] * D, *s = sin + positions[b] * D;                  \
                if (h < H) { rope_head_##S(q + (b * H + h) * D, c, s, D); continue; }              \
                h -= H;                                                                            \
                float *kh = k + (b * KV + h) * D, *vh = v + (b * KV + h) * D;                      \
                rope_head_##S(kh, c, s, D);                                                        \
                long at = ((rows[b] * KV + h) * M + positions[b]) * D;                             \
                for (long i = 0; i < D; i++) { ST_##S(kc + at, i, kh[i]); ST_##S(vc + at, i, vh[i]); } \
            }                                                                                      \
            barrier(nt);                                                                           \
        }                                                                                          \
        {   /* Attention per key/value head of runs of consecutive tokens of a row - a prompt's, up \
             * to RUN_MAX at a time, in a prefill; single tokens in a decode step - dealt out in     \
             * turn (a prefill's later tokens attend to more). */                                   \
            long span = a->runs ? RUN_MAX : 1;                                                     \
            for (long it = tid; it < (B + span - 1) / span * KV; it += nt) {                       \
                long kvh = it % KV, b = it / KV * span, end = b + span < B ? b + span : B;         \
                while (b < end) {                                                                  \
                    long R = 1;                                                                    \
                    while (b + R < end && rows[b + R] == rows[b] && positions[b + R] == positions[b] + R) R++; \
                    const T *kb = kc + (rows[b] * KV + kvh) * M * D, *vb = vc + (rows[b] * KV + kvh) * M * D; \
                    if (!ATTEND_RUN_##S(q + b * H * D, H, kvh, kb, vb, positions[b], R, window, D, G, scale, \
                                        probs, att + b * H * D))                                   \
                        for (long e = b; e < b + R; e++)                                           \
                            attend_one_##S(q + (e * H + kvh * G) * D, att + (e * H + kvh * G) * D, kb, vb, \
                                           positions[e], window, D, G, M, scale, probs);           \
                    b += R;                                                                        \
                }                                                                                  \
            }                                                                                      \
            barrier(nt);                                                                           \
        }                                                                                          \
        matvec_##S((const T *)lp[L_O], att, x, B, H * D, Hd, 1, xh, 1, 1, tid, nt);  /* residual add */ \
        rmsnorm_rows_##S(x, (const T *)lp[L_POST_NORM], xn, B, Hd, eps, tid, nt);                  \
        matvec_##S((const T *)lp[L_GATE], xn, gate, B, Hd, I, 0, xh, 1, 0, tid, nt);                  \
        matvec_##S((const T *)lp[L_UP], xn, up, B, Hd, I, 0, xh, 0, 1, tid, nt);                      \
        {                                                                                          \
            SHARE(B * I, lo, hi);                                                                  \
            for (long i = lo; i < hi; i++) gate[i] = gate[i] / (1.f + exp_f(-gate[i])) * up[i];     \
            barrier(nt);                                                                           \
        }                                                                                          \
        matvec_##S((const T *)lp[L_DOWN], gate, x, B, I, Hd, 1, xh, 1, 1, tid, nt);  /* residual add */ \
    }                                                                                              \
    long n_out = B;                                                                                \
    if (out) {  /* the output tokens' rows to the front of x, in place, in order (out[i] >= i) */  \
        n_out = a->n_out;                                                                          \
        for (long i = 0; i < n_out && tid == 0; i++)                                               \
            if (out[i] != i) memcpy(x + i * Hd, x + out[i] * Hd, Hd * sizeof(float));              \
        barrier(nt);                                                                               \
    }                                                                                              \
    rmsnorm_rows_##S(x, (const T *)ptrs[P_NORM], xn, n_out, Hd, eps, tid, nt);                     \
    matvec_##S((const T *)ptrs[P_HEAD], xn, logits, n_out, Hd, V, 0, xh, 1, 1, tid, nt);              \
}                                                                                                  \
                                                                                                   \
void decode_step_##S(void **ptrs, const long *dims, float eps, float scale, const int64_t *tokens, \
                     const int64_t *positions, const int64_t *rows, long B, const T *cos,          \
                     const T *sin, const int64_t *out, long n_out, float *logits, float *scratch,  \
                     int nt) {                                                                     \
    int runs = 0;                                                                                  \
    for (long b = 1; b < B && !runs; b++) runs = rows[b] == rows[b - 1] && positions[b] == positions[b - 1] + 1; \
    Step_##S a = {ptrs, dims, eps, scale, tokens, positions, rows, B, cos, sin, out, n_out, logits, scratch, runs}; \
    run(step_body_##S, &a, nt);                                                                    \
}

DECODE(f32, float)
DECODE(bf16, uint16_t)

/* Whether the matvecs of fp32 (bf16 = 0) or bf16 weights over many rows are as fast as PyTorch's
 * matmuls: fp32 with AVX-512, bf16 with AVX512-BF16 (on AMX tiles where there are some). The
 * portable loops are not (2.5x PyTorch's time for 1024 fp32 prompt tokens). The bf16 dot products
 * without AMX beat oneDNN on AMD Zen 4 (`small`, 16 prompts of 64 tokens: 151 ms against 174); on
 * Intel, oneDNN's AMX was 5x faster than they, but there our own AMX path takes the prompts. */
int fast_matvec(int bf16) {  /* 0 no, 1 yes, 2 yes on AMX tiles */
#if defined(__AVX512F__)
    return bf16 ? (AMX_ROWS(AMX_MIN_ROWS) ? 2 : HAVE_DP_BF16) : 1;
#else
    (void)bf16;
    return 0;
#endif
}

/* 0 if every token id is in [0, vocab), row in [0, rows) and position in [0, max_len); else which
 * is not: 1 an id, 2 a row, 3 a position. */
int bad_input(long B, const int64_t *tokens, long vocab, const int64_t *rows, long n_rows, const int64_t *positions,
              long max_len) {
    for (long b = 0; b < B; b++) {
        if (tokens[b] < 0 || tokens[b] >= vocab) return 1;
        if (rows[b] < 0 || rows[b] >= n_rows) return 2;
        if (positions[b] < 0 || positions[b] >= max_len) return 3;
    }
    return 0;
}

/* Floats of scratch decode_step needs for B tokens and nt threads. */
long scratch_floats(const long *dims, long B, int nt) {
    long Hd = dims[D_HIDDEN], H = dims[D_HEADS], KV = dims[D_KV], D = dims[D_HEAD_DIM], I = dims[D_INTER];
    long widest = Hd > H * D ? Hd : H * D;  /* the longest matvec input, for xh */
    widest = widest > I ? widest : I;
    long padded = (B + 15) / 16 * 16;  /* xh packed for AMX: whole blocks of 16 rows */
    return B * (2 * Hd + 2 * H * D + 2 * KV * D + 2 * I) + (long)nt * RUN_MAX * (H / KV) * (dims[D_MAX_LEN] + D)
           + (padded * widest + 1) / 2;
}
