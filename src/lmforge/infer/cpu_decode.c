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
 * threads as cores makes libgomp fall back to sleeping at every barrier (BENCHMARKS.md).
 *
 * Weights and cache are fp32 or bf16 (uint16_t bits), one `bf16` flag for both; activations are
 * fp32 throughout, so in bf16 the logits are slightly more exact than PyTorch's, which rounds every
 * intermediate to bf16. A quantised model (quantize.py's QuantLinear layers) has int8 or int4
 * projections and output matrix, each a QMat ("quantised weights" below), the rest fp32.
 *
 * The interface with cpu_decode.py: `decode_layout()` names the pointer table's slots and the
 * `dims` array's entries in order, with DECODE_ABI; cpu_decode.py compares it with its own when it
 * loads this file and refuses a difference. Bump DECODE_ABI whenever an exported function's
 * arguments change.
 */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../model/cpu_common.h"

#define DECODE_ABI 3

/* A function of a `bf16` flag (fp32 or bf16 weights and cache) is always inlined where the flag is
 * a constant: into its typed instances, `name_f32` and `name_bf16`, each compiled to loops with no
 * test of the flag inside (as a macro per type did), while compiler errors and debuggers see one
 * real line per statement. */
#define INLINE static inline __attribute__((always_inline))

/* Element i of a weight, cache or RoPE table: fp32, or bf16 bits. */
INLINE float ld(const void *p, long i, int bf16) {
    return bf16 ? bf2f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
INLINE void st(void *p, long i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = f2bf(v);
    else ((float *)p)[i] = v;
}
/* The address of element i. */
INLINE void *at(const void *p, long i, int bf16) { return (char *)p + i * (bf16 ? 2 : 4); }

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
#define SPIN_WAIT 20000  /* pauses a worker spins before it sleeps: longer than the Engine's work between steps */
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

/* The start of thread tid's share of n iterations (static schedule): [part(n, tid), part(n, tid + 1)). */
INLINE long part(long n, int tid, int nt) { return n * tid / nt; }

/* The first cached position a token at `pos` attends to: the sliding window's start (0: no window). */
INLINE long window_start(long pos, long window) {
    return window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0;
}

/* p[first..pos] = exp(p - max), returning their sum: three loops, each vectorised (one loop with
 * the exp and the sum stays scalar). */
INLINE float softmax_exp(float *p, long first, long pos) {
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
 * CHUNK_BYTES, so that they stay in L2 (a prefill has hundreds). A multiple of 4, the batch rows
 * of a block. */
#ifndef CHUNK_BYTES
#define CHUNK_BYTES (512 * 1024)
#endif
static long chunk_rows(long row_bytes) {
    long rows = CHUNK_BYTES / row_bytes / 4 * 4;
    return rows < 16 ? 16 : rows;
}

/* The most tokens of a prefill's run that attend together (attend_run): its scratch per thread is
 * RUN_MAX * G * (max_len + head_dim) floats. */
#define RUN_MAX 16

/* With AVX-512 the matvecs are written in intrinsics, for two reasons.
 * - Prefetch: at batch 16 each block of 4 weight rows serves 4 passes over 4 batch rows; left to
 *   the hardware prefetcher, the first pass waits on memory and the other three leave it idle.
 *   Each pass here also prefetches its share of the next block's cache lines (prefetches never
 *   fault, so the last block may run past its matrix).
 * - bf16: with AVX512-BF16 (Intel Sapphire Rapids, AMD Zen 4 and later) a bf16 matvec rounds x to
 *   bf16 (as PyTorch's bf16 path holds its activations) and multiplies pairs of bf16 with
 *   vdpbf16ps, accumulating in fp32: twice the multiply-adds per instruction, no conversion of
 *   the weights. */
#if defined(__AVX512F__)
#include <immintrin.h>

INLINE void prefetch_lines(uintptr_t pf, int q) {
    for (int e = 0; e < q; e++) _mm_prefetch((const char *)pf + 64 * e, _MM_HINT_T0);
}

INLINE void fma_block(const float *w[4], const float *xb[4], const int NB, long in, uintptr_t pf, int q,
                      __m512 acc[4][4]) {
    for (int r = 0; r < 4; r++)  /* all 16, with NB = 1 too: see reduce_4x4 */
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (long i = 0; i < in; i += 16, pf += 64 * q) {  /* one cache line of each weight row */
        prefetch_lines(pf, q);
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
INLINE void dp_block(const uint16_t *w[4], const uint16_t *xb[4], const int NB, long in, uintptr_t pf, int q,
                     __m512 acc[4][4]) {
    for (int r = 0; r < 4; r++)  /* all 16, with NB = 1 too: see reduce_4x4 */
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (long i = 0; i < in; i += 32, pf += 64 * q) {
        prefetch_lines(pf, q);
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
INLINE void dp_block(const uint16_t *w[4], const uint16_t *xb[4], const int NB, long in, uintptr_t pf, int q,
                     __m512 acc[4][4]) {  /* never called: the bf16 matvecs check HAVE_DP_BF16 first */
    (void)w; (void)xb; (void)NB; (void)in; (void)pf; (void)q; (void)acc;
}
#endif

/* The 16 sums of acc[r][c] (each over its 16 lanes) as one vector, lane 4c + r: a tree of
 * in-lane unpacks and cross-lane shuffles, 30 shuffles for all 16 where one reduction each took 64.
 * Batch 1 (its other 12 sums zero) goes through it too: each sum's lanes are added in the same order
 * whatever the batch, so a token's outputs are bitwise the same alone, beside other rows and in a
 * prefill (batching and the Engine's prefix cache change no result), at no measured cost. */
INLINE __m512 reduce_4x4(__m512 acc[4][4]) {
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
    long lo = part((out + 3) / 4, tid, nt), hi = part((out + 3) / 4, tid + 1, nt);
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
INLINE int amx_rows(long B) { return B >= AMX_MIN_ROWS && amx_usable(); }

typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } TileConfig;

/* x [B, in] -> xp: per 16 batch rows (the last padded with zeros), in/2 rows of 16 x (2 bf16). */
static void amx_pack(const float *x, uint16_t *xp, long B, long in, int tid, int nt) {
    /* A thread's share is whole 1 KB blocks (16 rows x 32 inputs), built on the stack and copied
     * out: rows split between threads would share every cache line (BENCHMARKS.md). */
    long chunks = in / 32;
    long lo = part((B + 15) / 16 * chunks, tid, nt), hi = part((B + 15) / 16 * chunks, tid + 1, nt);
    for (long u = lo; u < hi; u++) {
        long m0 = u / chunks * 16, i0 = u % chunks * 32;
        uint32_t block[16][16];  /* [pair][row]: inputs i0 + 2j, i0 + 2j + 1 of row m0 + r */
        for (long r = 0; r < 16; r++) {
            const float *xb = x + (m0 + r < B ? m0 + r : 0) * in + i0;
            int real = m0 + r < B;
#pragma omp simd
            for (int j = 0; j < 16; j++)
                block[j][r] = real ? f2bf(xb[2 * j]) | (uint32_t)f2bf(xb[2 * j + 1]) << 16 : 0;
        }
        memcpy(xp + m0 * in + i0 * 16, block, sizeof block);
    }
}

/* Where the tile of weight rows n0..n0+15 at inputs k0..k0+31 is read from, its row stride in
 * bytes set in *stride: W itself, or for a last block of fewer rows `tail`, the rows copied and
 * padded with zeros. (The tile number of _tile_loadd must be a literal, hence no load here.) */
INLINE const uint16_t *weight_tile(const uint16_t *W, long n0, long k0, long in, long out, uint16_t *tail,
                                   long *stride) {
    if (n0 + 16 <= out) {
        *stride = in * 2;
        return W + n0 * in + k0;
    }
    for (long r = 0; r < 16; r++)
        for (int i = 0; i < 32; i++) tail[r * 32 + i] = n0 + r < out ? W[(n0 + r) * in + k0 + i] : 0;
    *stride = 64;
    return tail;
}

/* Blocks of 2 x 16 weight rows times 2 x 16 batch rows: four accumulator tiles (0-3), two of weights
 * (4, 5) and two of x (6, 7), one tile load per multiply (one block of batch rows: two loads per
 * multiply, as a decode step of up to 16 rows has; a prefill of 64 rows is faster so). */
static void matvec_amx(const uint16_t *W, const uint16_t *xp, float *y, long B, long in, long out, int add,
                       int tid, int nt) {
    TileConfig cfg = {0};
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);  /* per call: PyTorch's oneDNN may have set its own on this thread */
    float c[4][16][16];  /* [nb + 2 mb][n][m] */
    uint16_t tail[16 * 32];
    long lo = part((out + 15) / 16, tid, nt), hi = part((out + 15) / 16, tid + 1, nt);
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
                long stride;
                _tile_loadd(6, x0 + k0 * 16, 64);
                if (mblocks == 2) _tile_loadd(7, x1 + k0 * 16, 64);
                const uint16_t *w0 = weight_tile(W, n0, k0, in, out, tail, &stride);
                _tile_loadd(4, w0, stride);
                _tile_dpbf16ps(0, 4, 6);
                if (mblocks == 2) _tile_dpbf16ps(2, 4, 7);
                if (nblocks == 2) {
                    const uint16_t *w1 = weight_tile(W, n1, k0, in, out, tail, &stride);
                    _tile_loadd(5, w1, stride);
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
#else
#define AMX_MIN_ROWS 0
INLINE int amx_rows(long B) { (void)B; return 0; }
static void amx_pack(const float *x, uint16_t *xp, long B, long in, int tid, int nt) {
    (void)x; (void)xp; (void)B; (void)in; (void)tid; (void)nt;
}
static void matvec_amx(const uint16_t *W, const uint16_t *xp, float *y, long B, long in, long out, int add,
                       int tid, int nt) {
    (void)W; (void)xp; (void)y; (void)B; (void)in; (void)out; (void)add; (void)tid; (void)nt;
}
#endif

/* xh: x in bf16 (packed for AMX when the tiles take it), shared by the threads; `convert` fills it
 * (a split job, then a barrier), the matvecs that follow on the same x (k and v after q, up after
 * gate) reuse it. */
static int matvec_avx512_bf16(const uint16_t *W, const float *x, float *y, long B, long in, long out, int add,
                              uint16_t *xh, int convert, int tid, int nt) {
    if (!HAVE_DP_BF16 || in % 32) return 0;
    if (amx_rows(B)) {  /* xh holds x packed for AMX: which layout depends on B and `in` alone */
        if (convert) {
            amx_pack(x, xh, B, in, tid, nt);
            barrier(nt);
        }
        matvec_amx(W, xh, y, B, in, out, add, tid, nt);
        return 1;
    }
    if (convert) {
        long lo = part(B * in, tid, nt), hi = part(B * in, tid + 1, nt);
        for (long i = lo; i < hi; i++) xh[i] = f2bf(x[i]);
        barrier(nt);
    }
    matvec_blocks(W, 1, xh, y, B, in, out, add, tid, nt);
    return 1;
}

static int matvec_avx512_f32(const float *W, const float *x, float *y, long B, long in, long out, int add,
                             int tid, int nt) {
    if (in % 16) return 0;
    matvec_blocks(W, 0, x, y, B, in, out, add, tid, nt);
    return 1;
}

/* The matvec in intrinsics where its sizes allow (1), else 0 and nothing done. */
INLINE int matvec_fast(const void *W, const float *x, float *y, long B, long in, long out, int add, uint16_t *xh,
                       int convert, int tid, int nt, int bf16) {
    return bf16 ? matvec_avx512_bf16(W, x, y, B, in, out, add, xh, convert, tid, nt)
                : matvec_avx512_f32(W, x, y, B, in, out, add, tid, nt);
}

/* Attention of the G query heads that share one key/value head, in intrinsics: for each head g,
 * o_g = softmax(scale * K q_g) V over positions first..pos of a row's cache. Keys 16 at a time
 * (bf16 converted to fp32 once for all G heads), their sums gathered by reduce_4x4; then each value
 * row is loaded once for all G heads. (The portable per-head loops below reduce each key's sum
 * lane by lane and convert the cache once per head, which is slower.) p: G rows of `pstride`
 * scores. */
INLINE __m512 load16(const void *p, long i, int bf16) {  /* elements i..i+15 as fp32 */
    if (!bf16) return _mm512_loadu_ps((const float *)p + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
INLINE const float *keys16(const void *k, long D, float *buf, int bf16) {  /* 16 keys as fp32 */
    if (!bf16) return k;
    for (long i = 0; i < 16 * D; i += 16) _mm512_storeu_ps(buf + i, load16(k, i, 1));
    return buf;
}
INLINE int attend_fast(const float *qg, const void *kb, const void *vb, long first, long pos, long D, long G,
                       float scale, float *p, long pstride, float *og, int bf16) {
    if (D % 16 || D > 256 || G > 16) return 0;
    long nd = D / 16, t = first;
    float kbuf[16 * 256];
    for (; t + 16 <= pos + 1; t += 16) {
        const float *kf = keys16(at(kb, t * D, bf16), D, kbuf, bf16);
        for (long g = 0; g < G; g++) {
            __m512 qv[16], acc[4][4];
            for (long c = 0; c < nd; c++) qv[c] = _mm512_loadu_ps(qg + g * D + 16 * c);
            for (int j = 0; j < 16; j++) {  /* key t + j: its sum lands in lane j */
                __m512 a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kf + j * D));
                for (long c = 1; c < nd; c++) a = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kf + j * D + 16 * c), a);
                acc[j % 4][j / 4] = a;
            }
            _mm512_storeu_ps(p + g * pstride + t, _mm512_mul_ps(reduce_4x4(acc), _mm512_set1_ps(scale)));
        }
    }
    for (; t <= pos; t++)
        for (long g = 0; g < G; g++) {
            __m512 a = _mm512_setzero_ps();
            for (long c = 0; c < nd; c++)
                a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + g * D + 16 * c), load16(kb, t * D + 16 * c, bf16), a);
            p[g * pstride + t] = _mm512_reduce_add_ps(a) * scale;
        }
    float inv[16];
    for (long g = 0; g < G; g++) inv[g] = 1.f / softmax_exp(p + g * pstride, first, pos);
    for (long c = 0; c < nd; c++) {
        __m512 acc[16];
        for (long g = 0; g < G; g++) acc[g] = _mm512_setzero_ps();
        for (t = first; t <= pos; t++) {
            __m512 v = load16(vb, t * D + 16 * c, bf16);
            for (long g = 0; g < G; g++) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * pstride + t]), v, acc[g]);
        }
        for (long g = 0; g < G; g++) _mm512_storeu_ps(og + g * D + 16 * c, _mm512_mul_ps(acc[g], _mm512_set1_ps(inv[g])));
    }
    return 1;
}

/* Attention of a run of R consecutive tokens of one cache row (part of a prompt, in a prefill; one
 * token, R = 1, in a decode step) for one key/value head, as two matrix products instead of R * G
 * vector ones: the scores of all R * G queries against the row's keys by matvec_blocks (the keys as
 * its weight rows: each key loaded once per 4 queries, bf16 keys in vdpbf16ps dot products with the
 * queries rounded to bf16, as PyTorch's bf16 attention holds them), a softmax per query over its
 * own keys (causal: the run's later tokens see more; 0 for the others), then P V in 4 x 4 blocks of
 * queries x 16 dimensions, each value row loaded once per 4 queries. Per token, the vector kernel
 * above re-reads every key and value for each query. Decode steps use it too, for the bf16 dot
 * products. q, att: the run's first token's q and output rows ([token][H][D]); s: R * G *
 * (max_len + D) floats of scratch. Keys from position kfirst (the sliding window's start for the
 * first token). */
INLINE int attend_run(const float *q, long H, long kvh, const void *kb, const void *vb, long pos0, long R,
                      long window, long D, long G, float scale, float *s, float *att, int bf16) {
    if (D % 64 || (bf16 && !HAVE_DP_BF16)) return 0;
    long n = R * G, plast = pos0 + R - 1, nd = D / 16;
    long kfirst = window_start(pos0, window), nk = plast - kfirst + 1;
    float *qx = s + n * nk;
    for (long i = 0; i < n; i++) {  /* the queries, contiguous: row i = token i / G, head i % G */
        const float *src = q + ((i / G) * H + kvh * G + i % G) * D;
        if (bf16) for (long d = 0; d < D; d++) ((uint16_t *)qx)[i * D + d] = f2bf(src[d]);
        else memcpy(qx + i * D, src, D * sizeof(float));
    }
    matvec_blocks(at(kb, kfirst * D, bf16), bf16, qx, s, n, D, nk, 0, 0, 1);  /* s[i][j] = q_i . k_(kfirst+j) */
    for (long i = 0; i < n; i++) {
        long pos = pos0 + i / G, lo = window_start(pos, window) - kfirst, hi = pos - kfirst;
        float *p = s + i * nk;
        for (long t = lo; t <= hi; t++) p[t] *= scale;
        float inv = 1.f / softmax_exp(p, lo, hi);
        for (long t = 0; t < lo; t++) p[t] = 0.f;
        for (long t = lo; t <= hi; t++) p[t] *= inv;
        for (long t = hi + 1; t < nk; t++) p[t] = 0.f;
    }
    for (long i0 = 0; i0 < n; i0 += 4) {
        long last = i0 + 3 < n ? i0 + 3 : n - 1, tmax = pos0 + last / G - kfirst + 1;
        const float *pq[4];  /* a short last block repeats its last query (computed, not stored) */
        for (int j = 0; j < 4; j++) pq[j] = s + (i0 + j < n ? i0 + j : n - 1) * nk;
        for (long c0 = 0; c0 < nd; c0 += 4) {
            __m512 acc[4][4];
            for (int j = 0; j < 4; j++)
                for (int c = 0; c < 4; c++) acc[j][c] = _mm512_setzero_ps();
            for (long t = 0; t < tmax; t++) {
                long row = (kfirst + t) * D + 16 * c0;
                __m512 v[4];
                for (int c = 0; c < 4; c++) v[c] = load16(vb, row + 16 * c, bf16);
                for (int j = 0; j < 4; j++) {
                    __m512 w = _mm512_set1_ps(pq[j][t]);
                    for (int c = 0; c < 4; c++) acc[j][c] = _mm512_fmadd_ps(w, v[c], acc[j][c]);
                }
            }
            for (int j = 0; j < 4 && i0 + j < n; j++) {
                long i = i0 + j;
                float *o = att + ((i / G) * H + kvh * G + i % G) * D + 16 * c0;
                for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + 16 * c, acc[j][c]);
            }
        }
    }
    return 1;
}
#else
/* Without AVX-512: no intrinsics, the portable loops below do it all. */
INLINE int matvec_fast(const void *W, const float *x, float *y, long B, long in, long out, int add, uint16_t *xh,
                       int convert, int tid, int nt, int bf16) {
    (void)W; (void)x; (void)y; (void)B; (void)in; (void)out; (void)add; (void)xh; (void)convert; (void)tid;
    (void)nt; (void)bf16;
    return 0;
}
INLINE int attend_fast(const float *qg, const void *kb, const void *vb, long first, long pos, long D, long G,
                       float scale, float *p, long pstride, float *og, int bf16) {
    (void)qg; (void)kb; (void)vb; (void)first; (void)pos; (void)D; (void)G; (void)scale; (void)p; (void)pstride;
    (void)og; (void)bf16;
    return 0;
}
INLINE int attend_run(const float *q, long H, long kvh, const void *kb, const void *vb, long pos0, long R,
                      long window, long D, long G, float scale, float *s, float *att, int bf16) {
    (void)q; (void)H; (void)kvh; (void)kb; (void)vb; (void)pos0; (void)R; (void)window; (void)D; (void)G;
    (void)scale; (void)s; (void)att; (void)bf16;
    return 0;
}
#endif


/* -- the model's layout ------------------------------------------------------------------------
 * The pointer table: the model's slots, then each layer's; `dims`: one long per entry. Each list is
 * written once, here: it gives the enum below and decode_layout()'s names, which cpu_decode.py
 * checks against the order it builds the table and dims in. */
#define MODEL_SLOTS(X) X(embed) X(norm) X(head)
#define LAYER_SLOTS(X) X(in_norm) X(q) X(k) X(v) X(o) X(post_norm) X(gate) X(up) X(down) X(k_cache) X(v_cache)
#define DIMS(X) X(layers) X(hidden) X(heads) X(kv_heads) X(head_dim) X(inter) X(vocab) X(max_len) X(window)
#define QMAT_FIELDS(X) X(w) X(scale) X(offset) X(group) X(bits)  /* a quantised matrix: QMat, 8 bytes a field */
#define AS_MODEL_SLOT(name) P_##name,
#define AS_LAYER_SLOT(name) L_##name,
#define AS_DIM(name) D_##name,
#define AS_WORD(name) " " #name
#define AS_STRING(x) #x
#define STRING_OF(x) AS_STRING(x)
enum { MODEL_SLOTS(AS_MODEL_SLOT) P_LAYERS };
enum { LAYER_SLOTS(AS_LAYER_SLOT) L_N };
enum { DIMS(AS_DIM) D_N };

const char *decode_layout(void) {
    return "abi " STRING_OF(DECODE_ABI) "; model:" MODEL_SLOTS(AS_WORD) "; layer:" LAYER_SLOTS(AS_WORD)
           "; dims:" DIMS(AS_WORD) "; qmat:" QMAT_FIELDS(AS_WORD);
}


/* -- the step ---------------------------------------------------------------------------------- */

/* y[b, j] (+)= sum_i W[j, i] x[b, i], W [out, in], this thread's share of the outputs, then a
 * barrier if `sync` (matvecs of the same input, q/k/v and gate/up, need one after the last only).
 * Where the intrinsics do not apply, blocks of 4 weight rows x 4 batch rows: 16 sums per pass, each
 * weight element loaded once per 4 batch rows; a short last block repeats its last row (computed,
 * not stored). */
INLINE void matvec_any(const void *W, const float *x, float *y, long B, long in, long out, int add, uint16_t *xh,
                       int convert, int sync, int tid, int nt, int bf16) {
    if (matvec_fast(W, x, y, B, in, out, add, xh, convert, tid, nt, bf16)) {
        if (sync) barrier(nt);
        return;
    }
    long lo = part((out + 3) / 4, tid, nt), hi = part((out + 3) / 4, tid + 1, nt);
    long chunk = chunk_rows(in * sizeof(float));
    for (long c0 = 0; c0 < B; c0 += chunk)
    for (long jb = lo; jb < hi; jb++) {
        long j0 = jb * 4, c1 = c0 + chunk < B ? c0 + chunk : B;
        const void *w0 = at(W, j0 * in, bf16), *w1 = at(W, (j0 + 1 < out ? j0 + 1 : out - 1) * in, bf16);
        const void *w2 = at(W, (j0 + 2 < out ? j0 + 2 : out - 1) * in, bf16);
        const void *w3 = at(W, (j0 + 3 < out ? j0 + 3 : out - 1) * in, bf16);
        for (long b0 = c0; b0 < c1; b0 += 4) {
            const float *x0 = x + b0 * in, *x1 = x + (b0 + 1 < B ? b0 + 1 : B - 1) * in;
            const float *x2 = x + (b0 + 2 < B ? b0 + 2 : B - 1) * in;
            const float *x3 = x + (b0 + 3 < B ? b0 + 3 : B - 1) * in;
            float a[16] = {0};
            float a00 = 0, a01 = 0, a02 = 0, a03 = 0, a10 = 0, a11 = 0, a12 = 0, a13 = 0;
            float a20 = 0, a21 = 0, a22 = 0, a23 = 0, a30 = 0, a31 = 0, a32 = 0, a33 = 0;
            if (B == 1) {  /* batch 1: one x row, the other three sums unused */
#pragma omp simd reduction(+:a00, a10, a20, a30)
                for (long i = 0; i < in; i++) {
                    float v = x0[i];
                    a00 += ld(w0, i, bf16) * v; a10 += ld(w1, i, bf16) * v;
                    a20 += ld(w2, i, bf16) * v; a30 += ld(w3, i, bf16) * v;
                }
            } else {
#pragma omp simd reduction(+:a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33)
                for (long i = 0; i < in; i++) {
                    float u0 = ld(w0, i, bf16), u1 = ld(w1, i, bf16), u2 = ld(w2, i, bf16), u3 = ld(w3, i, bf16);
                    float v0 = x0[i], v1 = x1[i], v2 = x2[i], v3 = x3[i];
                    a00 += u0 * v0; a01 += u0 * v1; a02 += u0 * v2; a03 += u0 * v3;
                    a10 += u1 * v0; a11 += u1 * v1; a12 += u1 * v2; a13 += u1 * v3;
                    a20 += u2 * v0; a21 += u2 * v1; a22 += u2 * v2; a23 += u2 * v3;
                    a30 += u3 * v0; a31 += u3 * v1; a32 += u3 * v2; a33 += u3 * v3;
                }
            }
            a[0] = a00; a[1] = a01; a[2] = a02; a[3] = a03; a[4] = a10; a[5] = a11; a[6] = a12;
            a[7] = a13; a[8] = a20; a[9] = a21; a[10] = a22; a[11] = a23; a[12] = a30; a[13] = a31;
            a[14] = a32; a[15] = a33;
            for (int r = 0; r < 4 && j0 + r < out; r++)
                for (int c = 0; c < 4 && b0 + c < B; c++) {
                    float *dst = y + (b0 + c) * out + j0 + r;
                    *dst = add ? *dst + a[r * 4 + c] : a[r * 4 + c];
                }
        }
    }
    if (sync) barrier(nt);
}
/* Its typed instances, and the call of the one for `bf16`: the larger functions a step calls are
 * compiled once per type, as separate functions (inlined into the step at every call, they would
 * double the file's compile time). */
static void matvec_f32(const void *W, const float *x, float *y, long B, long in, long out, int add, uint16_t *xh,
                       int convert, int sync, int tid, int nt) {
    matvec_any(W, x, y, B, in, out, add, xh, convert, sync, tid, nt, 0);
}
static void matvec_bf16(const void *W, const float *x, float *y, long B, long in, long out, int add, uint16_t *xh,
                        int convert, int sync, int tid, int nt) {
    matvec_any(W, x, y, B, in, out, add, xh, convert, sync, tid, nt, 1);
}
INLINE void matvec(const void *W, const float *x, float *y, long B, long in, long out, int add, uint16_t *xh,
                   int convert, int sync, int tid, int nt, int bf16) {
    if (bf16) matvec_bf16(W, x, y, B, in, out, add, xh, convert, sync, tid, nt);
    else matvec_f32(W, x, y, B, in, out, add, xh, convert, sync, tid, nt);
}

/* -- quantised weights ----------------------------------------------------------------------------
 * QuantLinear layers (quantize.py) run here as they are stored: int8 or int4 values with a float
 * scale per group of `group` inputs of a row (group = in: one a row) and, for asymmetric weights, an
 * offset per group: w = (stored - offset) * scale. The matvec's input rows are rounded to int8 per
 * block of 32 (x ~ xq * xs, xs = max|x| / 127 over the block, llama.cpp's q8_0 rounding of the
 * activations for its dot products), so that a block's dot product is exact integer arithmetic:
 *     sum over a block of w x = scale * xs * (sum of stored * xq - offset * sum of xq)
 * on AVX512-VNNI's vpdpbusd (u8 x s8 products, 64 an instruction, summed in 4s into int32 lanes),
 * elsewhere in portable loops. Weights are read at 1 or 0.5 bytes each instead of fp32's 4.
 * What cpu_decode.py hands over, a QMat (prepared once, when the decoder is made):
 * - bits 8: the QuantLinear's int8 q [out, in] itself (stored = q; offset: the zero point, or none);
 * - bits 4: u = q + 8 in 0..15, two a byte, in this file's own layout: per 64 inputs of a row 32
 *   bytes, byte j holding input j in its low half and input j + 32 in its high one (a last 32
 *   inputs: 16 bytes, j and j + 16), so one 32-byte load, shifted and masked, gives the 64 inputs in
 *   order (stored = u; offset 8, or 8 + the zero point);
 * - scale, offset: fp32 [out, in / group]; offset NULL: symmetric (0 for int8, 8 for int4). */
typedef struct { const void *w; const float *scale, *offset; int64_t group, bits; } QMat;  /* QMAT_FIELDS */
#define QBLOCK 32  /* inputs per activation scale */

/* x [B, in] -> xq [B, in] int8 and xs [B, ceil(in / 32)] scales, this thread's share in units of
 * 64 inputs (two blocks: a cache line of xq, so threads never write the same line). */
static void quantize_rows(const float *x, int8_t *xq, float *xs, long B, long in, int tid, int nt) {
    long units = (in + 63) / 64, nblk = (in + QBLOCK - 1) / QBLOCK;
    long lo = part(B * units, tid, nt), hi = part(B * units, tid + 1, nt);
    for (long u = lo; u < hi; u++) {
        long b = u / units;
        for (long k0 = u % units * 64; k0 < in && k0 < u % units * 64 + 64; k0 += QBLOCK) {
            long n = in - k0 < QBLOCK ? in - k0 : QBLOCK;
            const float *xb = x + b * in + k0;
            int8_t *qb = xq + b * in + k0;
            float amax = 0.f;
#pragma omp simd reduction(max:amax)
            for (long i = 0; i < n; i++) amax = fabsf(xb[i]) > amax ? fabsf(xb[i]) : amax;
            float inv = amax > 0.f ? 127.f / amax : 0.f;
#pragma omp simd
            for (long i = 0; i < n; i++) qb[i] = (int8_t)lrintf(xb[i] * inv);
            xs[b * nblk + k0 / QBLOCK] = amax / 127.f;
        }
    }
}

/* Row r of m times one quantised input row, portable: per block of 32, the integer dot product and
 * the sum of xq, then the block's float scales. */
static float qdot_portable(const QMat *m, long r, const int8_t *xq, const float *xs, long in) {
    long groups = in / m->group;
    const float *scale = m->scale + r * groups, *offset = m->offset ? m->offset + r * groups : NULL;
    float fixed = m->bits == 4 ? 8.f : 0.f, acc = 0.f;
    for (long k0 = 0; k0 < in; k0 += QBLOCK) {
        long n = in - k0 < QBLOCK ? in - k0 : QBLOCK;
        int32_t dot = 0, sum = 0;
#pragma omp simd reduction(+:sum)
        for (long i = 0; i < n; i++) sum += xq[k0 + i];
        if (m->bits == 8) {
            const int8_t *w = (const int8_t *)m->w + r * in + k0;
#pragma omp simd reduction(+:dot)
            for (long i = 0; i < n; i++) dot += w[i] * xq[k0 + i];
        } else {  /* in % 32 == 0 (cpu_decode.unsupported): whole blocks of 32 */
            long c0 = k0 / 64 * 64;
            const uint8_t *bytes = (const uint8_t *)m->w + r * in / 2 + c0 / 2;
            if (in - c0 >= 64) {  /* the low halves of 32 bytes, or their high halves */
                int shift = k0 == c0 ? 0 : 4;
#pragma omp simd reduction(+:dot)
                for (long i = 0; i < 32; i++) dot += ((bytes[i] >> shift) & 15) * xq[k0 + i];
            } else {  /* a last 32: 16 bytes, low halves then high halves */
#pragma omp simd reduction(+:dot)
                for (long i = 0; i < 16; i++) dot += (bytes[i] & 15) * xq[k0 + i] + (bytes[i] >> 4) * xq[k0 + 16 + i];
            }
        }
        long g = k0 / m->group;
        acc += scale[g] * xs[k0 / QBLOCK] * ((float)dot - (offset ? offset[g] : fixed) * (float)sum);
    }
    return acc;
}

/* Where rows[r] of m starts: its stored values, its scales and its offsets (NULL: symmetric). */
INLINE void qmat_rows(const QMat *m, const long rows[4], long in, const uint8_t *w[4], const float *scale[4],
                      const float *offset[4]) {
    long groups = in / m->group;
    for (int r = 0; r < 4; r++) {
        w[r] = (const uint8_t *)m->w + rows[r] * in * m->bits / 8;
        scale[r] = m->scale + rows[r] * groups;
        offset[r] = m->offset ? m->offset + rows[r] * groups : NULL;
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HAVE_VNNI 1
/* Lanes of the 64 inputs from k0: vpdpbusd leaves the dot products of inputs 4l..4l+3 in lane l, so
 * lanes 0-7 are the first block of 32, lanes 8-15 the second. A per-block (or per-group) value as
 * those lanes: [p[0] x 8, p[1] x 8] for blocks of 32, one broadcast for a group of 64 or more. */
INLINE __m512 pair_lanes(const float *p) {
    __m512 v = _mm512_castps128_ps512(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)p)));
    return _mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0), v);
}
INLINE __m512 group_lanes(const float *p, long k0, long group) {
    return group == QBLOCK ? pair_lanes(p + k0 / QBLOCK) : _mm512_set1_ps(p[k0 / group]);
}
INLINE __m512i nibbles64(const uint8_t *p) {  /* 32 bytes of the int4 layout -> the 64 values, in order */
    __m256i b = _mm256_loadu_si256((const __m256i *)p);
    __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 4), 1);
    return _mm512_and_si512(v, _mm512_set1_epi8(15));
}

/* 4 weight rows x NB input rows, as fma_block: acc[r][c] lanes sum to row r . input c (less the
 * per-row scale when group = in, applied after the reduction). int8: the weights are the signed
 * operand, x + 128 (xq ^ 0x80) the unsigned one, and -128 * sum(w) (one vpdpbusd per weight
 * vector) starts the sum; int4: the unsigned weights times the signed xq, started at -8 * sum(xq)
 * when symmetric; asymmetric: minus offset * sum(xq) in fp32. */
INLINE void qdot_block(const QMat *m, const long rows[4], const int8_t *xq[4], const float *xs[4], const int NB,
                       long in, uintptr_t pf, int q, __m512 acc[4][4], const int bits, const int offsets) {
    long group = m->group;
    int per_row = group == in;
    const __m512i zero = _mm512_setzero_si512();
    const uint8_t *w[4];
    const float *scale[4], *offset[4];
    qmat_rows(m, rows, in, w, scale, offset);
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (long k0 = 0; k0 < in; k0 += 64, pf += 64 * q) {
        prefetch_lines(pf, q);
        __m512i xv[4], start[4];
        __m512 xsv[4], xsum[4];
        for (int c = 0; c < NB; c++) {
            __m512i v = _mm512_loadu_si512(xq[c] + k0);
            xsv[c] = pair_lanes(xs[c] + k0 / QBLOCK);
            xv[c] = bits == 8 ? _mm512_xor_si512(v, _mm512_set1_epi8((char)0x80)) : v;
            if (offsets) xsum[c] = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, _mm512_set1_epi8(1), v));
            else if (bits == 4) start[c] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(8), v));
        }
        for (int r = 0; r < 4; r++) {
            __m512i wv = bits == 8 ? _mm512_loadu_si512(w[r] + k0) : nibbles64(w[r] + k0 / 2);
            __m512 s = per_row ? _mm512_setzero_ps() : group_lanes(scale[r], k0, group);
            __m512 off = offsets ? group_lanes(offset[r], k0, group) : _mm512_setzero_ps();
            __m512i wstart = zero;
            if (bits == 8) wstart = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8((char)0x80), wv));
            for (int c = 0; c < NB; c++) {
                __m512i d = bits == 8 ? _mm512_dpbusd_epi32(wstart, xv[c], wv)
                                      : _mm512_dpbusd_epi32(offsets ? zero : start[c], wv, xv[c]);
                __m512 f = _mm512_cvtepi32_ps(d);
                if (offsets) f = _mm512_fnmadd_ps(off, xsum[c], f);
                acc[r][c] = _mm512_fmadd_ps(f, per_row ? xsv[c] : _mm512_mul_ps(s, xsv[c]), acc[r][c]);
            }
        }
    }
}

/* The 16 sums of 4 weight rows x NB input rows (sums[4c + r]: row r . input c, less the per-row scale
 * when group = in): qdot_block in its constant-argument instances, its lanes through reduce_4x4. */
static void qblock_sums(const QMat *m, const long rows[4], const int8_t *xb[4], const float *sb[4], int NB, long in,
                        uintptr_t pf, int q, float sums[16]) {
    __m512 acc[4][4];
    int bits = (int)m->bits, offsets = m->offset != NULL;
    if (bits == 8 && !offsets) {
        if (NB == 1) qdot_block(m, rows, xb, sb, 1, in, pf, q, acc, 8, 0);
        else qdot_block(m, rows, xb, sb, 4, in, pf, q, acc, 8, 0);
    } else if (bits == 8) {
        if (NB == 1) qdot_block(m, rows, xb, sb, 1, in, pf, q, acc, 8, 1);
        else qdot_block(m, rows, xb, sb, 4, in, pf, q, acc, 8, 1);
    } else if (!offsets) {
        if (NB == 1) qdot_block(m, rows, xb, sb, 1, in, pf, q, acc, 4, 0);
        else qdot_block(m, rows, xb, sb, 4, in, pf, q, acc, 4, 0);
    } else {
        if (NB == 1) qdot_block(m, rows, xb, sb, 1, in, pf, q, acc, 4, 1);
        else qdot_block(m, rows, xb, sb, 4, in, pf, q, acc, 4, 1);
    }
    _mm512_storeu_ps(sums, reduce_4x4(acc));
}
INLINE int qblocks_fit(const QMat *m, long in) { return in % 64 == 0 && (m->group == QBLOCK || m->group % 64 == 0); }

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_VNNI 0
/* Without VNNI (AMD Zen 3, Intel before Ice Lake), llama.cpp's AVX2 way, one block of 32 inputs a
 * vector: vpmaddubsw multiplies u8 by s8 into int16 pairs, vpmaddwd by ones sums them into 8 int32
 * lanes. The pairs must stay below 2^15: int4's 0..15 are the unsigned operand as they are; int8
 * weights (-128 included) become |w| times x with w's sign moved onto x (|x| <= 127). */
INLINE __m256i dot32(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
INLINE __m256i nibbles32(const uint8_t *row, long k0, long in) {  /* inputs k0..k0+31 of the int4 layout */
    long c0 = k0 / 64 * 64;
    __m256i mask = _mm256_set1_epi8(15);
    if (in - c0 >= 64) {
        __m256i b = _mm256_loadu_si256((const __m256i *)(row + c0 / 2));
        return _mm256_and_si256(k0 == c0 ? b : _mm256_srli_epi16(b, 4), mask);
    }
    __m128i b = _mm_loadu_si128((const __m128i *)(row + c0 / 2));  /* a last 32: low halves, then high */
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), mask);
}
INLINE void qdot_block_avx2(const QMat *m, const long rows[4], const int8_t *xq[4], const float *xs[4], const int NB,
                            long in, __m256 acc[4][4], const int bits, const int offsets) {
    long group = m->group;
    int per_row = group == in;
    const uint8_t *w[4];
    const float *scale[4], *offset[4];
    qmat_rows(m, rows, in, w, scale, offset);
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm256_setzero_ps();
    for (long k0 = 0; k0 < in; k0 += QBLOCK) {
        __m256i xv[4], start[4];
        __m256 xsv[4], xsum[4];
        for (int c = 0; c < NB; c++) {
            xv[c] = _mm256_loadu_si256((const __m256i *)(xq[c] + k0));
            xsv[c] = _mm256_set1_ps(xs[c][k0 / QBLOCK]);
            if (offsets) xsum[c] = _mm256_cvtepi32_ps(dot32(_mm256_set1_epi8(1), xv[c]));
            else if (bits == 4) start[c] = dot32(_mm256_set1_epi8(8), xv[c]);
        }
        for (int r = 0; r < 4; r++) {
            __m256i wv = bits == 8 ? _mm256_loadu_si256((const __m256i *)(w[r] + k0)) : nibbles32(w[r], k0, in);
            __m256i wabs = bits == 8 ? _mm256_abs_epi8(wv) : wv;
            __m256 s = _mm256_set1_ps(per_row ? 1.f : scale[r][k0 / group]);
            __m256 off = _mm256_set1_ps(offsets ? offset[r][k0 / group] : 0.f);
            for (int c = 0; c < NB; c++) {
                __m256i d = bits == 8 ? dot32(wabs, _mm256_sign_epi8(xv[c], wv)) : dot32(wv, xv[c]);
                if (bits == 4 && !offsets) d = _mm256_sub_epi32(d, start[c]);
                __m256 f = _mm256_cvtepi32_ps(d);
                if (offsets) f = _mm256_fnmadd_ps(off, xsum[c], f);
                acc[r][c] = _mm256_fmadd_ps(f, _mm256_mul_ps(s, xsv[c]), acc[r][c]);
            }
        }
    }
}
static void qblock_sums(const QMat *m, const long rows[4], const int8_t *xb[4], const float *sb[4], int NB, long in,
                        uintptr_t pf, int q, float sums[16]) {
    (void)pf; (void)q;  /* the hardware prefetcher, measured enough here */
    __m256 acc[4][4];
    int bits = (int)m->bits, offsets = m->offset != NULL;
    if (bits == 8 && !offsets) {
        if (NB == 1) qdot_block_avx2(m, rows, xb, sb, 1, in, acc, 8, 0);
        else qdot_block_avx2(m, rows, xb, sb, 4, in, acc, 8, 0);
    } else if (bits == 8) {
        if (NB == 1) qdot_block_avx2(m, rows, xb, sb, 1, in, acc, 8, 1);
        else qdot_block_avx2(m, rows, xb, sb, 4, in, acc, 8, 1);
    } else if (!offsets) {
        if (NB == 1) qdot_block_avx2(m, rows, xb, sb, 1, in, acc, 4, 0);
        else qdot_block_avx2(m, rows, xb, sb, 4, in, acc, 4, 0);
    } else {
        if (NB == 1) qdot_block_avx2(m, rows, xb, sb, 1, in, acc, 4, 1);
        else qdot_block_avx2(m, rows, xb, sb, 4, in, acc, 4, 1);
    }
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) {
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r][c]), _mm256_extractf128_ps(acc[r][c], 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            sums[4 * c + r] = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
        }
}
INLINE int qblocks_fit(const QMat *m, long in) { (void)m; return in % QBLOCK == 0; }
#else
#define HAVE_VNNI 0
#define NO_QBLOCKS
#endif

#ifndef NO_QBLOCKS
/* matvec_blocks for a QMat: blocks of 4 weight rows x 4 input rows (chunks of them staying in L2),
 * prefetching the next block's weights (bits / 2 cache lines per 64 inputs, spread over the passes). */
static void matvec_q_blocks(const QMat *m, const int8_t *xq, const float *xs, float *y, long B, long in, long out,
                            int add, int tid, int nt) {
    long nblk = (in + QBLOCK - 1) / QBLOCK, row_bytes = in * m->bits / 8, chunk = chunk_rows(in);
    int per_row = m->group == in;
    long lo = part((out + 3) / 4, tid, nt), hi = part((out + 3) / 4, tid + 1, nt);
    for (long c0 = 0; c0 < B; c0 += chunk)
    for (long jb = lo; jb < hi; jb++) {
        long j0 = jb * 4, c1 = c0 + chunk < B ? c0 + chunk : B, passes = (c1 - c0 + 3) / 4;
        int q = m->bits / 2 / passes > 0 ? (int)(m->bits / 2 / passes) : 1;
        long rows[4];
        for (int r = 0; r < 4; r++) rows[r] = j0 + r < out ? j0 + r : out - 1;
        for (long p = 0; p < passes; p++) {
            long b0 = c0 + p * 4;
            const int8_t *xb[4];
            const float *sb[4];
            for (int c = 0; c < 4; c++) {
                long b = b0 + c < B ? b0 + c : B - 1;
                xb[c] = xq + b * in;
                sb[c] = xs + b * nblk;
            }
            uintptr_t pf = (uintptr_t)m->w + (uintptr_t)((j0 + 4) * row_bytes + p * (in / 64) * q * 64);
            float sums[16];  /* sums[4c + r] = y[b0 + c, j0 + r] */
            qblock_sums(m, rows, xb, sb, B == 1 ? 1 : 4, in, pf, q, sums);
            for (int c = 0; c < 4 && b0 + c < B; c++) {
                float *dst = y + (b0 + c) * out + j0;
                for (int r = 0; r < 4 && j0 + r < out; r++) {
                    float v = per_row ? sums[4 * c + r] * m->scale[j0 + r] : sums[4 * c + r];
                    dst[r] = add ? dst[r] + v : v;
                }
            }
        }
    }
}
#endif

/* The matvec in intrinsics where its sizes allow (1), else 0 and nothing done. */
INLINE int matvec_q_fast(const QMat *m, const int8_t *xq, const float *xs, float *y, long B, long in, long out,
                         int add, int tid, int nt) {
#ifndef NO_QBLOCKS
    if (!qblocks_fit(m, in)) return 0;
    matvec_q_blocks(m, xq, xs, y, B, in, out, add, tid, nt);
    return 1;
#else
    (void)m; (void)xq; (void)xs; (void)y; (void)B; (void)in; (void)out; (void)add; (void)tid; (void)nt;
    return 0;
#endif
}

/* y[b, j] (+)= row j of m . x[b] for this thread's share of the outputs, as matvec; `convert`
 * quantises x into xbuf first (a split job, then a barrier), the matvecs that follow on the same x
 * reuse it. */
static void matvec_q(const QMat *m, const float *x, float *y, long B, long in, long out, int add, void *xbuf,
                     int convert, int sync, int tid, int nt) {
    int8_t *xq = xbuf;
    float *xs = (float *)(xq + (B * in + 63) / 64 * 64);
    if (convert) {
        quantize_rows(x, xq, xs, B, in, tid, nt);
        barrier(nt);
    }
    if (!matvec_q_fast(m, xq, xs, y, B, in, out, add, tid, nt)) {
        long nblk = (in + QBLOCK - 1) / QBLOCK, lo = part(out, tid, nt), hi = part(out, tid + 1, nt);
        for (long b = 0; b < B; b++)
            for (long j = lo; j < hi; j++) {
                float v = qdot_portable(m, j, xq + b * in, xs + b * nblk, in);
                y[b * out + j] = add ? y[b * out + j] + v : v;
            }
    }
    if (sync) barrier(nt);
}

/* A projection of the step: plain weights (fp32 or bf16), or quantised (a QMat). */
INLINE void project(const void *W, const float *x, float *y, long B, long in, long out, int add, uint16_t *xh,
                    int convert, int sync, int tid, int nt, int bf16, int quant) {
    if (quant) matvec_q(W, x, y, B, in, out, add, xh, convert, sync, tid, nt);
    else matvec(W, x, y, B, in, out, add, xh, convert, sync, tid, nt, bf16);
}

INLINE void rmsnorm_rows_any(const float *x, const void *w, float *y, long B, long n, float eps, int tid, int nt,
                             int bf16) {
    long lo = part(B, tid, nt), hi = part(B, tid + 1, nt);
    for (long b = lo; b < hi; b++) {
        const float *xb = x + b * n; float *yb = y + b * n;
        float ss = 0.f;
#pragma omp simd reduction(+:ss)  /* else a scalar loop: strict fp order */
        for (long i = 0; i < n; i++) ss += xb[i] * xb[i];
        float s = 1.f / sqrtf(ss / (float)n + eps);
        for (long i = 0; i < n; i++) yb[i] = xb[i] * s * ld(w, i, bf16);
    }
    barrier(nt);
}
static void rmsnorm_rows_f32(const float *x, const void *w, float *y, long B, long n, float eps, int tid, int nt) {
    rmsnorm_rows_any(x, w, y, B, n, eps, tid, nt, 0);
}
static void rmsnorm_rows_bf16(const float *x, const void *w, float *y, long B, long n, float eps, int tid, int nt) {
    rmsnorm_rows_any(x, w, y, B, n, eps, tid, nt, 1);
}
INLINE void rmsnorm_rows(const float *x, const void *w, float *y, long B, long n, float eps, int tid, int nt,
                         int bf16) {
    if (bf16) rmsnorm_rows_bf16(x, w, y, B, n, eps, tid, nt);
    else rmsnorm_rows_f32(x, w, y, B, n, eps, tid, nt);
}

/* Rotate-half RoPE of one head in place; c/s the row's cos/sin (repeating across the halves). */
INLINE void rope_head(float *x, const void *c, const void *s, long D, int bf16) {
    long half = D / 2;
    for (long i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * ld(c, i, bf16) - b * ld(s, i, bf16);
        x[i + half] = b * ld(c, i + half, bf16) + a * ld(s, i + half, bf16);
    }
}

/* Attention of one token's G query heads qg (outputs og) over its row's keys kb and values vb up
 * to `pos`, where attend_run does not apply: the vector kernel, or portable loops. probs: G *
 * max_len floats of scratch. */
INLINE void attend_one(const float *qg, float *og, const void *kb, const void *vb, long pos, long window, long D,
                       long G, long M, float scale, float *probs, int bf16) {
    long first = window_start(pos, window);
    if (attend_fast(qg, kb, vb, first, pos, D, G, scale, probs, M, og, bf16)) return;
    for (long g = 0; g < G; g++) {
        const float *qh = qg + g * D;
        float *p = probs;
        long t = first;
        for (; t + 4 <= pos + 1; t += 4) {  /* four keys per pass over q */
            const void *k0 = at(kb, t * D, bf16), *k1 = at(k0, D, bf16), *k2 = at(k1, D, bf16), *k3 = at(k2, D, bf16);
            float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
#pragma omp simd reduction(+:d0, d1, d2, d3)
            for (long i = 0; i < D; i++) {
                float qi = qh[i];
                d0 += qi * ld(k0, i, bf16); d1 += qi * ld(k1, i, bf16);
                d2 += qi * ld(k2, i, bf16); d3 += qi * ld(k3, i, bf16);
            }
            p[t] = d0 * scale; p[t + 1] = d1 * scale; p[t + 2] = d2 * scale; p[t + 3] = d3 * scale;
        }
        for (; t <= pos; t++) {
            float dot = 0.f;
#pragma omp simd reduction(+:dot)
            for (long i = 0; i < D; i++) dot += qh[i] * ld(kb, t * D + i, bf16);
            p[t] = dot * scale;
        }
        float sum = softmax_exp(p, first, pos);
        float *o = og + g * D;
        for (long i = 0; i < D; i++) o[i] = 0.f;
        for (long t = first; t <= pos; t++) {
            float w = p[t] / sum;
#pragma omp simd
            for (long i = 0; i < D; i++) o[i] += w * ld(vb, t * D + i, bf16);
        }
    }
}

/* Attention of R consecutive tokens of one cache row for key/value head kvh (q, att: the first
 * token's rows; positions: its position first): as one run where attend_run applies, else token by
 * token. */
INLINE void attend_tokens_any(const float *q, float *att, const void *kb, const void *vb, const int64_t *positions,
                              long R, long H, long kvh, long window, long D, long G, long M, float scale, float *probs,
                              int bf16) {
    if (attend_run(q, H, kvh, kb, vb, positions[0], R, window, D, G, scale, probs, att, bf16)) return;
    for (long e = 0; e < R; e++)
        attend_one(q + (e * H + kvh * G) * D, att + (e * H + kvh * G) * D, kb, vb, positions[e], window, D, G, M,
                   scale, probs, bf16);
}
static void attend_tokens_f32(const float *q, float *att, const void *kb, const void *vb, const int64_t *positions,
                              long R, long H, long kvh, long window, long D, long G, long M, float scale, float *probs) {
    attend_tokens_any(q, att, kb, vb, positions, R, H, kvh, window, D, G, M, scale, probs, 0);
}
static void attend_tokens_bf16(const float *q, float *att, const void *kb, const void *vb, const int64_t *positions,
                               long R, long H, long kvh, long window, long D, long G, long M, float scale, float *probs) {
    attend_tokens_any(q, att, kb, vb, positions, R, H, kvh, window, D, G, M, scale, probs, 1);
}

/* B tokens, token b at position positions[b] of cache row rows[b]; cos/sin [max_len, head_dim]
 * tables by position; logits [n_out, vocab] out for the tokens out[0] < out[1] < ... (NULL: all
 * B); scratch: scratch_floats.
 * Cache buffers are [B_cache, KV, max_len, head_dim]. A decode step is one token per row; a
 * prefill is a row's whole prompt (its keys and values are all written before any attention). */
typedef struct {
    void **ptrs; const long *dims; float eps, scale; const int64_t *tokens, *positions, *rows;
    long B; const void *cos, *sin; const int64_t *out; long n_out; float *logits, *scratch;
    int runs;  /* some token follows the one before it in its row (a prefill) */
} Step;

INLINE void step_body(const Step *a, int tid, int nt, int bf16, int quant) {
    void **ptrs = a->ptrs;
    const long *dims = a->dims;
    const int64_t *tokens = a->tokens, *positions = a->positions, *rows = a->rows, *out = a->out;
    float eps = a->eps, scale = a->scale, *logits = a->logits;
    long B = a->B, L = dims[D_layers], Hd = dims[D_hidden], H = dims[D_heads], KV = dims[D_kv_heads];
    long D = dims[D_head_dim], I = dims[D_inter], V = dims[D_vocab], M = dims[D_max_len];
    long window = dims[D_window], G = H / KV;
    float *x = a->scratch, *xn = x + B * Hd, *q = xn + B * Hd, *k = q + B * H * D;
    float *v = k + B * KV * D, *att = v + B * KV * D, *gate = att + B * H * D, *up = gate + B * I;
    long pn = RUN_MAX * G * (M + D);  /* per thread: attention weights (and a run's queries) */
    float *probs = up + B * I + tid * pn;
    uint16_t *xh = (uint16_t *)(up + B * I + nt * pn);  /* a matvec's input in bf16 (bf16 weights) */
    {
        long lo = part(B, tid, nt), hi = part(B, tid + 1, nt);
        for (long b = lo; b < hi; b++)
            for (long i = 0; i < Hd; i++) x[b * Hd + i] = ld(ptrs[P_embed], tokens[b] * Hd + i, bf16);
        barrier(nt);
    }
    for (long l = 0; l < L; l++) {
        void **lp = ptrs + P_LAYERS + l * L_N;
        void *kc = lp[L_k_cache], *vc = lp[L_v_cache];
        rmsnorm_rows(x, lp[L_in_norm], xn, B, Hd, eps, tid, nt, bf16);
        project(lp[L_q], xn, q, B, Hd, H * D, 0, xh, 1, 0, tid, nt, bf16, quant);
        project(lp[L_k], xn, k, B, Hd, KV * D, 0, xh, 0, 0, tid, nt, bf16, quant);
        project(lp[L_v], xn, v, B, Hd, KV * D, 0, xh, 0, 1, tid, nt, bf16, quant);
        {   /* RoPE on q and k heads; k and v rounded into the cache at the row's position. */
            long lo = part(B * (H + KV), tid, nt), hi = part(B * (H + KV), tid + 1, nt);
            for (long bh = lo; bh < hi; bh++) {
                long b = bh / (H + KV), h = bh % (H + KV);
                const void *c = at(a->cos, positions[b] * D, bf16), *s = at(a->sin, positions[b] * D, bf16);
                if (h < H) { rope_head(q + (b * H + h) * D, c, s, D, bf16); continue; }
                h -= H;
                float *kh = k + (b * KV + h) * D, *vh = v + (b * KV + h) * D;
                rope_head(kh, c, s, D, bf16);
                long where = ((rows[b] * KV + h) * M + positions[b]) * D;
                for (long i = 0; i < D; i++) { st(kc, where + i, kh[i], bf16); st(vc, where + i, vh[i], bf16); }
            }
            barrier(nt);
        }
        {   /* Attention per key/value head of runs of consecutive tokens of a row - a prompt's, up to
             * RUN_MAX at a time, in a prefill; single tokens in a decode step - dealt out in turn (a
             * prefill's later tokens attend to more). */
            long span = a->runs ? RUN_MAX : 1;
            for (long it = tid; it < (B + span - 1) / span * KV; it += nt) {
                long kvh = it % KV, b = it / KV * span, end = b + span < B ? b + span : B;
                while (b < end) {
                    long R = 1;
                    while (b + R < end && rows[b + R] == rows[b] && positions[b + R] == positions[b] + R) R++;
                    const void *kb = at(kc, (rows[b] * KV + kvh) * M * D, bf16);
                    const void *vb = at(vc, (rows[b] * KV + kvh) * M * D, bf16);
                    (bf16 ? attend_tokens_bf16 : attend_tokens_f32)(q + b * H * D, att + b * H * D, kb, vb,
                                                                    positions + b, R, H, kvh, window, D, G, M, scale,
                                                                    probs);
                    b += R;
                }
            }
            barrier(nt);
        }
        project(lp[L_o], att, x, B, H * D, Hd, 1, xh, 1, 1, tid, nt, bf16, quant);  /* residual add */
        rmsnorm_rows(x, lp[L_post_norm], xn, B, Hd, eps, tid, nt, bf16);
        project(lp[L_gate], xn, gate, B, Hd, I, 0, xh, 1, 0, tid, nt, bf16, quant);
        project(lp[L_up], xn, up, B, Hd, I, 0, xh, 0, 1, tid, nt, bf16, quant);
        {
            long lo = part(B * I, tid, nt), hi = part(B * I, tid + 1, nt);
            for (long i = lo; i < hi; i++) gate[i] = gate[i] / (1.f + exp_f(-gate[i])) * up[i];
            barrier(nt);
        }
        project(lp[L_down], gate, x, B, I, Hd, 1, xh, 1, 1, tid, nt, bf16, quant);  /* residual add */
    }
    long n_out = B;
    if (out) {  /* the output tokens' rows to the front of x, in place, in order (out[i] >= i) */
        n_out = a->n_out;
        for (long i = 0; i < n_out && tid == 0; i++)
            if (out[i] != i) memcpy(x + i * Hd, x + out[i] * Hd, Hd * sizeof(float));
        barrier(nt);
    }
    rmsnorm_rows(x, ptrs[P_norm], xn, n_out, Hd, eps, tid, nt, bf16);
    project(ptrs[P_head], xn, logits, n_out, Hd, V, 0, xh, 1, 1, tid, nt, bf16, quant);
}
/* The step's typed instances, the jobs the thread pool runs. */
static void step_body_f32(void *arg, int tid, int nt) { step_body(arg, tid, nt, 0, 0); }
static void step_body_bf16(void *arg, int tid, int nt) { step_body(arg, tid, nt, 1, 0); }
static void step_body_quant(void *arg, int tid, int nt) { step_body(arg, tid, nt, 0, 1); }

/* One step (see Step) on nt threads. kind 0: weights, cache and cos/sin of fp32; 1: of bf16; 2: the
 * projections' slots (q, k, v, o, gate, up, down and the output matrix) point to QMats, the rest is
 * fp32. */
void decode_step(void **ptrs, const long *dims, float eps, float scale, const int64_t *tokens,
                 const int64_t *positions, const int64_t *rows, long B, const void *cos, const void *sin,
                 const int64_t *out, long n_out, float *logits, float *scratch, int kind, int nt) {
    int runs = 0;
    for (long b = 1; b < B && !runs; b++) runs = rows[b] == rows[b - 1] && positions[b] == positions[b - 1] + 1;
    Step a = {ptrs, dims, eps, scale, tokens, positions, rows, B, cos, sin, out, n_out, logits, scratch, runs};
    run(kind == 2 ? step_body_quant : kind == 1 ? step_body_bf16 : step_body_f32, &a, nt);
}

/* The vector instructions this build has: 2 AVX-512, 1 AVX2 with FMA (the portable loops
 * vectorised for it), 0 neither (aarch64, x86 before AVX2). CPUDecoder.create uses this file only
 * where it was measured faster than PyTorch, eager or compiled: 1 and 2 (BENCHMARKS.md, "Decode
 * paths"). */
int vector_isa(void) {
#if defined(__AVX512F__)
    return 2;
#elif defined(__AVX2__) && defined(__FMA__)
    return 1;
#else
    return 0;
#endif
}

/* Whether the matvecs of weights of `kind` (decode_step's) over many rows are as fast as PyTorch's
 * matmuls: fp32 with AVX-512, bf16 with AVX512-BF16 (on AMX tiles where there are some), quantised
 * with AVX512-VNNI. The portable loops are not (BENCHMARKS.md). The bf16 dot products without AMX
 * beat oneDNN on AMD Zen 4; on Intel oneDNN's AMX beats them, but there our own AMX path takes the
 * prompts. */
int fast_matvec(int kind) {  /* 0 no, 1 yes, 2 yes on AMX tiles */
#if defined(__AVX512F__)
    return kind == 2 ? HAVE_VNNI : kind == 1 ? (amx_rows(AMX_MIN_ROWS) ? 2 : HAVE_DP_BF16) : 1;
#else
    (void)kind;
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
    long Hd = dims[D_hidden], H = dims[D_heads], KV = dims[D_kv_heads], D = dims[D_head_dim], I = dims[D_inter];
    long widest = Hd > H * D ? Hd : H * D;  /* the longest matvec input, for xh */
    widest = widest > I ? widest : I;
    long padded = (B + 15) / 16 * 16;  /* xh packed for AMX: whole blocks of 16 rows (it also holds a quantised
                                        * model's int8 rows and their scales, 1.125 bytes an input) */
    return B * (2 * Hd + 2 * H * D + 2 * KV * D + 2 * I) + (long)nt * RUN_MAX * (H / KV) * (dims[D_max_len] + D)
           + (padded * widest + 1) / 2;
}
