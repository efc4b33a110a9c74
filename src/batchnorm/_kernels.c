/* Fused CPU kernels for Batch Normalization, compiled on first use by batchnorm._jit.
 *
 * A tensor is seen as (N, C, S): N examples, C channels, S spatial positions.
 *   rows layout (cl == 0): element (n, c, s) at (n * C + c) * S + s   (NCHW contiguous)
 *   channels-innermost (cl == 1): element (n, c, s) at (n * S + s) * C + c   (channels_last,
 *   and (N, C) matrices with S == 1)
 *
 * Whole training steps (bn_train_fwd, bn_train_bwd), one call each way for one statistics
 * group: plain BN, ghost batches (one call per group) and Batch Renormalization (r and d
 * computed inside). In the rows layout they work one channel at a time, so that the second
 * pass over a channel finds it in cache. Masked statistics for (N, C, L) rows have their own
 * pair (bn_masked_fwd, bn_masked_bwd). Single passes, for paths whose statistics must leave
 * the process between passes (SyncBatchNorm):
 *   stats   one read of x            -> per-channel mean and biased variance
 *   affine  one read, one write      -> y = a[c] * x + b[c]
 *   sums    one read of dy and x     -> sum dy and sum dy * (x - mean[c])
 *   dx      two reads, one write     -> dx = alpha[c] * dy + beta[c] * x + gamma[c]
 * BN + an activation (+ a residual), for batchnorm.act: bn_act_fwd, bn_act_sums, bn_act_dx
 * (their section below says what each reads and writes), and a training step's forward and
 * backward each as one call of them with the per-channel work between (bn_act_train_fwd,
 * bn_act_train_bwd), for the piecewise-linear
 * activations and the smooth ones (elu, silu, gelu), whose exp, expm1, log1p and normal cdf
 * are written here as polynomials that vectorize (no libm call inside the loops).
 * Two small per-channel helpers: bn_check_stats checks statistics computed elsewhere (torch's
 * kernel); bn_lerp moves two buffers toward two targets by one weight (torch's lerp formula)
 * and increments a counter, the arithmetic of batchnorm._stats.update_running_stats, the one
 * running update: it decides whether a batch is folded in and with which weight, and is the
 * only caller.
 *
 * Each entry point takes one argument struct (declared below, mirrored by ctypes Structures
 * in batchnorm._jit) and exists as bn_<kind>_f32 and bn_<kind>_f64; the tensors' pointers
 * are `void *` there, so that one struct serves both. The bodies are written once for both
 * element types (the DEFINE_* macros below instantiate the static helpers for float and
 * double); the exported functions are spelled out at the end of the file.
 *
 * Statistics are shifted sums: each channel's values minus one of its own samples (its first
 * value), accumulated in float lanes over at most about a thousand values each and in double
 * beyond, so neither a large common offset nor a long float accumulation costs accuracy; the
 * variance is sum (x - K)^2 / m - (mean - K)^2 with |mean - K| of the order of the spread.
 * NaN and Inf propagate into the statistics (the caller's guard relies on it).
 *
 * Large float32 outputs are written with non-temporal stores (no read-for-ownership of
 * lines about to be overwritten): a tensor much larger than the caches would be evicted
 * before anyone read it from there anyway.
 *
 * Instruction sets: the float32 reductions have AVX-512 versions (row_sums_avx512,
 * cl_rows*), AVX2+FMA versions (row_sums_avx2, cl_sums_avx2_f32) and portable loops that the
 * compiler vectorizes (every other build, float64, and widths the vector versions do not
 * take); which one a build uses follows from -march. batchnorm._jit builds one library per
 * x86-64 level and loads the best one the CPU supports (x86-64-v4: AVX-512, x86-64-v3:
 * AVX2+FMA, x86-64 and x86-64-v2: portable); bn_build_info says which paths a build has.
 */
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

/* What this build carries, for batchnorm.kernels_status(): the instruction set its vector
 * code paths were compiled for, and the thread runtime. */
const char *bn_build_info(void) {
    return
#if defined(__AVX512F__)
        "AVX-512"
#elif defined(__AVX2__) && defined(__FMA__)
        "AVX2+FMA"
#else
        "portable loops"
#endif
#ifdef _OPENMP
        ", OpenMP";
#else
        ", pthread pool";
#endif
}

/* ---------------------------------------------------------------------------------------
 * Argument structs, one per entry point. A tensor is seen as (n, c, s) with layout cl (0:
 * rows, 1: channels-innermost, see above); nt is the number of threads to run on. Per-channel
 * vectors hold c elements of the input's type unless said otherwise; "stats" is one block of
 * three rows of c: mean, invstd = 1 / sqrt(var + eps), and a variance. batchnorm._jit checks
 * at load time that its ctypes mirrors have exactly these layouts (bn_layout_* below).
 * ------------------------------------------------------------------------------------- */
struct bn_stats_args {
    const void *x;
    void *mean, *var;          /* out: c doubles each (the biased variance) */
    int64_t n, c, s;
    int32_t cl, nt;
};

struct bn_affine_args {         /* y = scale[c] * x + shift[c] */
    const void *x;
    void *y;                   /* laid out like x */
    const void *scale, *shift;
    int64_t n, c, s;
    int32_t cl, nt;
};

struct bn_sums_args {           /* sum dy and sum dy * (x - mean[c]), per channel */
    const void *dy, *x;        /* dy laid out like x */
    const void *mean;
    void *sum_dy, *sum_dy_xmu; /* out: c doubles each */
    int64_t n, c, s;
    int32_t cl, nt;
};

struct bn_dx_args {             /* dx = alpha[c] * dy + beta[c] * x + gamma[c] */
    const void *dy, *x;
    void *dx;
    const void *alpha, *beta, *gamma;
    int64_t n, c, s;
    int32_t cl, nt;
};

struct bn_lerp_args {
    void *a, *b;               /* the buffers, updated in place: a += w * (ta - a), b likewise */
    const void *ta, *tb;       /* their targets */
    int64_t *counter;          /* incremented by one, or NULL */
    int64_t c;                 /* elements of each */
    double w;                  /* the weight, in [0, 1] */
};

struct bn_train_fwd_args {
    const void *x;
    void *y;
    const void *weight, *bias; /* or NULL (1 and 0) */
    void *stats;               /* out: mean, invstd, var_scale * biased variance */
    /* Batch Renormalization when rd != NULL: r and d from the running statistics ren_mean,
     * ren_var (only read) and the limits r_max, d_max; rd receives r then d (c each). */
    const void *ren_mean, *ren_var;
    void *rd;
    /* A running update (batchnorm._stats.prepare_update), or NULL: applied from the rows mean
     * and variance of stats (its targets, whatever ta and tb say) when all three rows are
     * finite, else not at all: the guard. */
    const struct bn_lerp_args *update;
    int64_t n, c, s;
    double eps, var_scale, r_max, d_max;
    int32_t cl, nt;
};

struct bn_train_bwd_args {
    const void *dy, *x;
    void *dx;                  /* or NULL: not needed */
    const void *weight;        /* or NULL */
    const void *stats;         /* rows mean and invstd (the third row is not read) */
    const void *rd;            /* Batch Renormalization's r then d, or NULL */
    void *dweight, *dbias;     /* or NULL: not needed */
    int64_t n, c, s;
    int32_t cl, nt;
};

struct bn_check_stats_args {
    const void *mean, *invstd;
    int64_t c, m;              /* channels; values per channel the statistics came from */
    double threshold, unit;    /* the offset-risk test (threshold 0: not tested) */
};

struct bn_masked_fwd_args {
    const void *x;             /* (n, c, l) rows */
    const void *mask;          /* (n, l) bytes, 0 or 1 */
    void *y;
    const void *weight, *bias;
    void *stats;               /* out: mean, invstd, biased variance */
    int64_t n, c, l;
    double eps;
    int32_t nt;
};

struct bn_masked_bwd_args {
    const void *dy, *x, *mask;
    void *dx;                  /* or NULL */
    const void *weight;
    const void *stats;         /* rows mean and invstd */
    void *dweight, *dbias;     /* or NULL */
    int64_t n, c, l, count;    /* count: the valid positions bn_masked_fwd_* returned */
    int32_t nt;
};

#define BLOCK 256          /* rows per float block in the channels-innermost reductions */
#define FLUSH 1024         /* values per float lane before it is added into a double */
#define STREAM_MIN (8L << 20) /* bytes of output from which stores are non-temporal */
#define ROWS_IMAGES 8 /* images per sweep over a thread's channels in the NCHW reductions */
#define ROWS_GROUP_BYTES (512L << 10) /* bytes of input per group of channels in the rows tasks */
#define ROWS_GROUP_MAX 64 /* channels per group at most */

/* Channels per group for the NCHW training kernels: as many as keep a group's values of
 * ``arrays`` tensors within ROWS_GROUP_BYTES (at least 1, at most ROWS_GROUP_MAX). */
static inline int64_t rows_group(int64_t N, int64_t S, size_t size, int arrays) {
    const double per = (double)N * (double)S * (double)size * arrays;
    const double g = (double)ROWS_GROUP_BYTES / (per > 0 ? per : 1.0);
    return g < 1.0 ? 1 : g > ROWS_GROUP_MAX ? ROWS_GROUP_MAX : (int64_t)g;
}

typedef void (*task_fn)(void *arg, int t, int nt);

#ifdef _OPENMP
/* Built with -fopenmp: the parallel regions run on the OpenMP runtime torch itself loaded
 * (libgomp.so.1, shared by soname), so our threads are torch's threads: no second pool
 * competing for the cores, and workers still warm from the previous torch operation. */
#include <omp.h>
#define MAX_THREADS 256

static void run_parallel(task_fn fn, void *arg, int nt) {
    if (nt > MAX_THREADS) nt = MAX_THREADS;
    if (nt <= 1) {
        fn(arg, 0, 1);
        return;
    }
#pragma omp parallel num_threads(nt)
    fn(arg, omp_get_thread_num(), omp_get_num_threads());
}

#else

/* A persistent pool: starting threads per call costs tens of microseconds, more than a
 * whole small BN layer. Workers spin briefly for the next task, then sleep on a condition
 * variable; a call hands out shares 1..nt-1 and runs share 0 itself. Calls are serialized
 * by a mutex (callers from several threads take turns; nested calls do not happen). */
#define MAX_THREADS 64
#define SPIN 2000

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

static pthread_mutex_t pool_call = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static int pool_size = 0;                 /* workers started */
static volatile long pool_gen = 0;        /* task generation */
static volatile int pool_left = 0;        /* shares still running */
static task_fn pool_fn;
static void *pool_arg;
static int pool_nt;

static void *pool_worker(void *p) {
    int me = (int)(intptr_t)p; /* share index, 1-based */
    long seen = 0;
    for (;;) {
        int spins = 0;
        while (__atomic_load_n(&pool_gen, __ATOMIC_ACQUIRE) == seen && spins < SPIN) {
            spins++;
            CPU_RELAX();
        }
        if (__atomic_load_n(&pool_gen, __ATOMIC_ACQUIRE) == seen) {
            pthread_mutex_lock(&pool_mu);
            while (pool_gen == seen) pthread_cond_wait(&pool_cv, &pool_mu);
            pthread_mutex_unlock(&pool_mu);
        }
        seen = __atomic_load_n(&pool_gen, __ATOMIC_ACQUIRE);
        if (me < pool_nt) {
            pool_fn(pool_arg, me, pool_nt);
            __atomic_sub_fetch(&pool_left, 1, __ATOMIC_ACQ_REL);
        }
    }
    return NULL;
}

/* A forked child has none of the parent's workers: start over. */
static void pool_after_fork(void) {
    pthread_mutex_t m0 = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c0 = PTHREAD_COND_INITIALIZER;
    pool_call = m0;
    pool_mu = m0;
    pool_cv = c0;
    pool_size = 0;
    pool_gen = 0;
    pool_left = 0;
}

/* Run fn(arg, t, nt) for t = 0..nt-1, t = 0 on the calling thread. */
static void run_parallel(task_fn fn, void *arg, int nt) {
    if (nt > MAX_THREADS) nt = MAX_THREADS;
    if (nt <= 1) {
        fn(arg, 0, 1);
        return;
    }
    static int registered = 0;
    pthread_mutex_lock(&pool_call);
    if (!registered) registered = pthread_atfork(NULL, NULL, pool_after_fork) == 0;
    while (pool_size < nt - 1) {
        pthread_t th;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        int ok = pthread_create(&th, &at, pool_worker, (void *)(intptr_t)(pool_size + 1)) == 0;
        pthread_attr_destroy(&at);
        if (!ok) break;
        pool_size++;
    }
    if (nt > pool_size + 1) nt = pool_size + 1; /* could not start more: fewer shares */
    if (nt <= 1) {
        pthread_mutex_unlock(&pool_call);
        fn(arg, 0, 1);
        return;
    }
    pool_fn = fn;
    pool_arg = arg;
    pool_nt = nt;
    __atomic_store_n(&pool_left, nt - 1, __ATOMIC_RELEASE);
    pthread_mutex_lock(&pool_mu);
    __atomic_add_fetch(&pool_gen, 1, __ATOMIC_ACQ_REL);
    pthread_cond_broadcast(&pool_cv);
    pthread_mutex_unlock(&pool_mu);
    fn(arg, 0, nt);
    while (__atomic_load_n(&pool_left, __ATOMIC_ACQUIRE) > 0) CPU_RELAX();
    pthread_mutex_unlock(&pool_call);
}

#endif /* _OPENMP */

static inline void split(int64_t n, int t, int nt, int64_t *lo, int64_t *hi) {
    *lo = n * t / nt;
    *hi = n * (t + 1) / nt;
}

static inline void fence(int streamed) {
#if defined(__AVX512F__) || defined(__AVX__)
    if (streamed) _mm_sfence();
#else
    (void)streamed;
#endif
}

/* o[i] = a * x[i] + b and o[i] = al * dy[i] + be * x[i] + ga over a row, float, optionally
 * with non-temporal stores on the aligned middle part. */
static inline void affine_row_f32(const float *restrict x, float *restrict o, int64_t n, float a, float b,
                                  int stream) {
    int64_t i = 0;
#if defined(__AVX512F__)
    if (stream) {
        for (; i < n && ((uintptr_t)(o + i) & 63); i++) o[i] = x[i] * a + b;
        const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
        for (; i + 16 <= n; i += 16) _mm512_stream_ps(o + i, _mm512_fmadd_ps(_mm512_loadu_ps(x + i), va, vb));
    }
#elif defined(__AVX__)
    if (stream) {
        for (; i < n && ((uintptr_t)(o + i) & 31); i++) o[i] = x[i] * a + b;
        const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
        for (; i + 8 <= n; i += 8)
            _mm256_stream_ps(o + i, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), va), vb));
    }
#else
    (void)stream;
#endif
#pragma omp simd
    for (int64_t j = i; j < n; j++) o[j] = x[j] * a + b;
}

static inline void dx_row_f32(const float *restrict dy, const float *restrict x, float *restrict o, int64_t n,
                              float al, float be, float ga, int stream) {
    int64_t i = 0;
#if defined(__AVX512F__)
    if (stream) {
        for (; i < n && ((uintptr_t)(o + i) & 63); i++) o[i] = al * dy[i] + be * x[i] + ga;
        const __m512 va = _mm512_set1_ps(al), vb = _mm512_set1_ps(be), vg = _mm512_set1_ps(ga);
        for (; i + 16 <= n; i += 16)
            _mm512_stream_ps(o + i, _mm512_fmadd_ps(_mm512_loadu_ps(dy + i), va,
                                                    _mm512_fmadd_ps(_mm512_loadu_ps(x + i), vb, vg)));
    }
#elif defined(__AVX__)
    if (stream) {
        for (; i < n && ((uintptr_t)(o + i) & 31); i++) o[i] = al * dy[i] + be * x[i] + ga;
        const __m256 va = _mm256_set1_ps(al), vb = _mm256_set1_ps(be), vg = _mm256_set1_ps(ga);
        for (; i + 8 <= n; i += 8)
            _mm256_stream_ps(o + i, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(dy + i), va),
                                                  _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vb), vg)));
    }
#else
    (void)stream;
#endif
#pragma omp simd
    for (int64_t j = i; j < n; j++) o[j] = al * dy[j] + be * x[j] + ga;
}

static inline void affine_vec_f32(const float *restrict x, float *restrict o, int64_t n, const float *restrict a,
                                  const float *restrict b, int stream) {
    int64_t i = 0;
#if defined(__AVX512F__)
    if (stream && !((uintptr_t)o & 63))
        for (; i + 16 <= n; i += 16)
            _mm512_stream_ps(o + i, _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(a + i),
                                                    _mm512_loadu_ps(b + i)));
#elif defined(__AVX__)
    if (stream && !((uintptr_t)o & 31))
        for (; i + 8 <= n; i += 8)
            _mm256_stream_ps(o + i, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(a + i)),
                                                  _mm256_loadu_ps(b + i)));
#else
    (void)stream;
#endif
#pragma omp simd
    for (int64_t j = i; j < n; j++) o[j] = x[j] * a[j] + b[j];
}

static inline void dx_vec_f32(const float *restrict dy, const float *restrict x, float *restrict o, int64_t n,
                              const float *restrict al, const float *restrict be, const float *restrict ga,
                              int stream) {
    int64_t i = 0;
#if defined(__AVX512F__)
    if (stream && !((uintptr_t)o & 63))
        for (; i + 16 <= n; i += 16)
            _mm512_stream_ps(o + i, _mm512_fmadd_ps(_mm512_loadu_ps(dy + i), _mm512_loadu_ps(al + i),
                                                    _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(be + i),
                                                                    _mm512_loadu_ps(ga + i))));
#elif defined(__AVX__)
    if (stream && !((uintptr_t)o & 31))
        for (; i + 8 <= n; i += 8)
            _mm256_stream_ps(o + i, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(dy + i), _mm256_loadu_ps(al + i)),
                                                  _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i),
                                                                              _mm256_loadu_ps(be + i)),
                                                                _mm256_loadu_ps(ga + i))));
#else
    (void)stream;
#endif
#pragma omp simd
    for (int64_t j = i; j < n; j++) o[j] = al[j] * dy[j] + be[j] * x[j] + ga[j];
}

/* double: plain stores (the float path is the one that matters for speed) */
static inline void affine_row_f64(const double *restrict x, double *restrict o, int64_t n, double a, double b,
                                  int stream) {
    (void)stream;
#pragma omp simd
    for (int64_t j = 0; j < n; j++) o[j] = x[j] * a + b;
}
static inline void dx_row_f64(const double *restrict dy, const double *restrict x, double *restrict o, int64_t n,
                              double al, double be, double ga, int stream) {
    (void)stream;
#pragma omp simd
    for (int64_t j = 0; j < n; j++) o[j] = al * dy[j] + be * x[j] + ga;
}
static inline void affine_vec_f64(const double *restrict x, double *restrict o, int64_t n,
                                  const double *restrict a, const double *restrict b, int stream) {
    (void)stream;
#pragma omp simd
    for (int64_t j = 0; j < n; j++) o[j] = x[j] * a[j] + b[j];
}
static inline void dx_vec_f64(const double *restrict dy, const double *restrict x, double *restrict o, int64_t n,
                              const double *restrict al, const double *restrict be, const double *restrict ga,
                              int stream) {
    (void)stream;
#pragma omp simd
    for (int64_t j = 0; j < n; j++) o[j] = al[j] * dy[j] + be[j] * x[j] + ga[j];
}

/* Channels-innermost float outputs with non-temporal stores when a row is not a whole
 * number of vectors (C % 16 != 0): row starts are then not aligned, and affine_vec/dx_vec
 * would store most rows plainly. Instead the (rows * C) elements are taken as one flat
 * array, and the per-channel coefficients as "tapes" of P = lcm(C, 16) values (tape[i] =
 * coef[i % C]), so that every aligned block of 16 outputs has its 16 coefficients side by
 * side at tape offset (i % P). Returns 0 (not handled) without a vector unit or an aligned
 * output. */
#if defined(__AVX512F__) || defined(__AVX__)
struct tape_job {
    const float *dy, *x; float *out; int64_t n, P; const float *t0, *t1, *t2;
};

static void tape_task(void *p, int t, int nt) {
    const struct tape_job *j = (const struct tape_job *)p;
    int64_t lo, hi;
    split(j->n / 16, t, nt, &lo, &hi);
    lo *= 16;
    hi = t == nt - 1 ? j->n : hi * 16;
    int64_t i = lo, q = lo % j->P;
#if defined(__AVX512F__)
    for (; i + 16 <= hi; i += 16) {
        __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(j->x + i), _mm512_loadu_ps(j->t1 + q), _mm512_loadu_ps(j->t2 + q));
        if (j->dy) v = _mm512_fmadd_ps(_mm512_loadu_ps(j->dy + i), _mm512_loadu_ps(j->t0 + q), v);
        _mm512_stream_ps(j->out + i, v);
        q += 16;
        if (q == j->P) q = 0;
    }
#elif defined(__AVX__)
    for (; i + 16 <= hi; i += 16) {
        for (int h = 0; h < 16; h += 8) {
            __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(j->x + i + h), _mm256_loadu_ps(j->t1 + q + h)),
                                     _mm256_loadu_ps(j->t2 + q + h));
            if (j->dy) v = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(j->dy + i + h), _mm256_loadu_ps(j->t0 + q + h)), v);
            _mm256_stream_ps(j->out + i + h, v);
        }
        q += 16;
        if (q == j->P) q = 0;
    }
#endif
    for (; i < hi; i++) {
        const int64_t c = i % j->P;
        j->out[i] = j->dy ? j->t0[c] * j->dy[i] + j->t1[c] * j->x[i] + j->t2[c] : j->x[i] * j->t1[c] + j->t2[c];
    }
    _mm_sfence();
}
#endif

static int ew_tape_f32(const float *dy, const float *x, float *out, int64_t n, int64_t C, const float *c0,
                       const float *c1, const float *c2, int nt) {
#if defined(__AVX512F__) || defined(__AVX__)
    if ((uintptr_t)out & 63) return 0;
    int64_t g = C, h = 16;
    while (h) { const int64_t r = g % h; g = h; h = r; }
    const int64_t P = C / g * 16;
    float *tapes = (float *)malloc((size_t)(3 * P) * sizeof(float));
    if (!tapes) return 0;
    for (int64_t i = 0; i < P; i++) {
        tapes[i] = dy ? c0[i % C] : 0.0f;
        tapes[P + i] = c1[i % C];
        tapes[2 * P + i] = c2[i % C];
    }
    struct tape_job j = {dy, x, out, n, P, tapes, tapes + P, tapes + 2 * P};
    run_parallel(tape_task, &j, nt);
    free(tapes);
    return 1;
#else
    (void)dy; (void)x; (void)out; (void)n; (void)C; (void)c0; (void)c1; (void)c2; (void)nt;
    return 0;
#endif
}

static int ew_tape_f64(const double *dy, const double *x, double *out, int64_t n, int64_t C, const double *c0,
                       const double *c1, const double *c2, int nt) {
    (void)dy; (void)x; (void)out; (void)n; (void)C; (void)c0; (void)c1; (void)c2; (void)nt;
    return 0;
}

static inline double clamp_var(double v) { return v > 0.0 ? v : (v == v ? 0.0 : v); /* keeps NaN */ }

static void channel_sums_f32(const float *x, const float *dy, int64_t N, int64_t C, int64_t S, int64_t c,
                             float k, double *s1, double *s2);
static void channel_sums_f64(const double *x, const double *dy, int64_t N, int64_t C, int64_t S, int64_t c,
                             double k, double *s1, double *s2);
static int cl_sums_fast_f32(const float *x, const float *dy, int64_t C, int64_t lo, int64_t hi, const float *k,
                            double *s1, double *s2, float *scratch);
static int cl_sums_fast_f64(const double *x, const double *dy, int64_t C, int64_t lo, int64_t hi, const double *k,
                            double *s1, double *s2, double *scratch);

/* The running update's arithmetic (batchnorm._stats.update_running_stats decides whether and
 * with which weight): a = lerp(a, ta, w), b likewise, torch's lerp formula; counter += 1.
 * finish_fwd: the end of every training forward: 1 if a statistic is NaN/Inf (then no
 * update: the guard), else 0 with the caller's update applied from rows 0 and 2 of st (-2,
 * nothing updated, for an update of another channel count). */
#define DEFINE_LERP(T, SUF, FMA)                                                                 \
    static void lerp_##SUF(const struct bn_lerp_args *q) {                                       \
        T *a = (T *)q->a, *b = (T *)q->b;                                                        \
        const T *ta = (const T *)q->ta, *tb = (const T *)q->tb;                                  \
        const T w = (T)q->w;                                                                     \
        const int small = fabs(q->w) < 0.5;                                                      \
        const T k = small ? w : w - (T)1;                                                        \
        for (int64_t i = 0; i < q->c; i++) {                                                     \
            a[i] = FMA(k, ta[i] - a[i], small ? a[i] : ta[i]);                                   \
            b[i] = FMA(k, tb[i] - b[i], small ? b[i] : tb[i]);                                   \
        }                                                                                        \
        if (q->counter) *q->counter += 1;                                                        \
    }                                                                                            \
    static int finish_fwd_##SUF(const T *st, int64_t C, const struct bn_lerp_args *u) {          \
        for (int64_t i = 0; i < 3 * C; i++)                                                      \
            if (!isfinite((double)st[i])) return 1;                                              \
        if (u) {                                                                                 \
            if (u->c != C) return -2;                                                            \
            struct bn_lerp_args v = *u;                                                          \
            v.ta = st;                                                                           \
            v.tb = st + 2 * C;                                                                   \
            lerp_##SUF(&v);                                                                      \
        }                                                                                        \
        return 0;                                                                                \
    }
DEFINE_LERP(float, f32, fmaf)
DEFINE_LERP(double, f64, fma)
#undef DEFINE_LERP

#define DEFINE_KERNELS(T, SUF, L)                                                                \
                                                                                                 \
/* Lane accumulators over one channel's rows: a1 += x - k, a2 += (x - k)^2 (stats), or           \
 * a1 += dy, a2 += dy * (x - k) (sums, when dy != NULL). Double totals in s1, s2. */             \
__attribute__((unused)) static void channel_sums_generic_##SUF(const T *x, const T *dy, int64_t N, int64_t C, int64_t S,         \
                               int64_t c, T k, double *s1, double *s2) {                         \
    T a1[L], a2[L];                                                                              \
    double t1 = 0.0, t2 = 0.0;                                                                   \
    int64_t since = 0;                                                                           \
    for (int l = 0; l < L; l++) { a1[l] = 0; a2[l] = 0; }                                        \
    for (int64_t n = 0; n < N; n++) {                                                            \
        const T *restrict xr = x + (n * C + c) * S;                                              \
        const T *restrict gr = dy ? dy + (n * C + c) * S : NULL;                                 \
        int64_t s = 0;                                                                           \
        if (gr) {                                                                                \
            for (; s + L <= S; s += L)                                                           \
                for (int l = 0; l < L; l++) {                                                    \
                    a1[l] += gr[s + l];                                                          \
                    a2[l] += gr[s + l] * (xr[s + l] - k);                                        \
                }                                                                                \
            for (int l = 0; s < S; s++, l++) { a1[l] += gr[s]; a2[l] += gr[s] * (xr[s] - k); }   \
        } else {                                                                                 \
            for (; s + L <= S; s += L)                                                           \
                for (int l = 0; l < L; l++) {                                                    \
                    const T d = xr[s + l] - k;                                                   \
                    a1[l] += d;                                                                  \
                    a2[l] += d * d;                                                              \
                }                                                                                \
            for (int l = 0; s < S; s++, l++) { const T d = xr[s] - k; a1[l] += d; a2[l] += d * d; } \
        }                                                                                        \
        since += S / L + 1;                                                                      \
        if (since >= FLUSH || n == N - 1) {                                                      \
            for (int l = 0; l < L; l++) { t1 += a1[l]; t2 += a2[l]; a1[l] = 0; a2[l] = 0; }      \
            since = 0;                                                                           \
        }                                                                                        \
    }                                                                                            \
    *s1 = t1;                                                                                    \
    *s2 = t2;                                                                                    \
}                                                                                                \
                                                                                                 \
/* Channels-innermost: rows [lo, hi) of (M, C) into double totals s1[C], s2[C]; b is 2*C         \
 * float scratch. dy == NULL: stats of x - k[c]; else sums dy, dy * (x - k[c]). */               \
static void cl_sums_##SUF(const T *x, const T *dy, int64_t C, int64_t lo, int64_t hi,            \
                          const T *restrict k, double *restrict s1, double *restrict s2,         \
                          T *restrict b) {                                                       \
    T *restrict b1 = b, *restrict b2 = b + C;                                                    \
    for (int64_t c = 0; c < C; c++) { s1[c] = 0.0; s2[c] = 0.0; }                                \
    for (int64_t r0 = lo; r0 < hi; r0 += BLOCK) {                                                \
        const int64_t r1 = r0 + BLOCK < hi ? r0 + BLOCK : hi;                                    \
        for (int64_t c = 0; c < C; c++) { b1[c] = 0; b2[c] = 0; }                                \
        for (int64_t r = r0; r < r1; r++) {                                                      \
            const T *restrict xr = x + r * C;                                                    \
            if (dy) {                                                                            \
                const T *restrict gr = dy + r * C;                                               \
                _Pragma("omp simd")                                                              \
                for (int64_t c = 0; c < C; c++) { b1[c] += gr[c]; b2[c] += gr[c] * (xr[c] - k[c]); } \
            } else {                                                                             \
                _Pragma("omp simd")                                                              \
                for (int64_t c = 0; c < C; c++) {                                                \
                    const T d = xr[c] - k[c];                                                    \
                    b1[c] += d;                                                                  \
                    b2[c] += d * d;                                                              \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        for (int64_t c = 0; c < C; c++) { s1[c] += b1[c]; s2[c] += b2[c]; }                      \
    }                                                                                            \
}                                                                                                \
                                                                                                 \
/* One task type for every kernel: what each pass needs. */                                      \
struct job_##SUF {                                                                               \
    const T *x, *dy; T *out; int64_t N, C, S; int stream;                                        \
    const T *k;            /* per-channel shift (stats) or mean (sums) */                        \
    double *s1, *s2;       /* totals: C (rows) or nt * C (channels-innermost) */                 \
    T *scratch;            /* 2 * C floats per thread (channels-innermost) */                    \
    const T *c0, *c1, *c2; /* per-channel coefficients of the elementwise pass */                \
    /* whole steps */                                                                            \
    const T *w, *b; double eps, var_scale; T *mean, *invstd, *var, *dw, *db;                     \
    /* Batch Renormalization (rd != NULL): r and d from the running statistics ren_mean,         \
     * ren_var (only read) and the limits; rd holds r then d (C each). */                        \
    const T *ren_mean, *ren_var; double r_max, d_max; T *rd;                                     \
};                                                                                               \
                                                                                                 \
/* The thread's channels, ROWS_IMAGES images at a time: every channel's spans of those images,   \
 * then the next images. One channel over all N images would jump a whole image between spans    \
 * of S values (prefetchers and the TLB serve that badly for small maps); this way there are     \
 * ROWS_IMAGES sequential streams, each moving on by S values from one channel to the next. */   \
static void rows_sums_task_##SUF(void *p, int t, int nt) {                                       \
    struct job_##SUF *j = (struct job_##SUF *)p;                                                 \
    int64_t lo, hi;                                                                              \
    split(j->C, t, nt, &lo, &hi);                                                                \
    for (int64_t c = lo; c < hi; c++) { j->s1[c] = 0.0; j->s2[c] = 0.0; }                        \
    for (int64_t n0 = 0; n0 < j->N; n0 += ROWS_IMAGES) {                                         \
        const int64_t nb = j->N - n0 < ROWS_IMAGES ? j->N - n0 : ROWS_IMAGES;                    \
        const int64_t o = n0 * j->C * j->S;                                                      \
        for (int64_t c = lo; c < hi; c++) {                                                      \
            const T k = j->dy ? j->k[c] : j->x[c * j->S];                                        \
            double p1, p2;                                                                       \
            channel_sums_##SUF(j->x + o, j->dy ? j->dy + o : NULL, nb, j->C, j->S, c, k, &p1,    \
                               &p2);                                                             \
            j->s1[c] += p1;                                                                      \
            j->s2[c] += p2;                                                                      \
        }                                                                                        \
    }                                                                                            \
}                                                                                                \
                                                                                                 \
static void cl_sums_task_##SUF(void *p, int t, int nt) {                                         \
    struct job_##SUF *j = (struct job_##SUF *)p;                                                 \
    int64_t lo, hi;                                                                              \
    split(j->N * j->S, t, nt, &lo, &hi);                                                         \
    if (!cl_sums_fast_##SUF(j->x, j->dy, j->C, lo, hi, j->k, j->s1 + (int64_t)t * j->C,          \
                            j->s2 + (int64_t)t * j->C, j->scratch + (int64_t)t * 2 * j->C))      \
        cl_sums_##SUF(j->x, j->dy, j->C, lo, hi, j->k, j->s1 + (int64_t)t * j->C,                \
                      j->s2 + (int64_t)t * j->C, j->scratch + (int64_t)t * 2 * j->C);            \
}                                                                                                \
                                                                                                 \
/* out = c0[c] * dy + c1[c] * x + c2[c] (dy == NULL: out = c1[c] * x + c2[c]) */                 \
static void ew_task_##SUF(void *p, int t, int nt) {                                              \
    struct job_##SUF *j = (struct job_##SUF *)p;                                                 \
    const int64_t C = j->C, S = j->S;                                                            \
    int64_t lo, hi;                                                                              \
    if (j->scratch == NULL) { /* rows */                                                         \
        split(j->N * C, t, nt, &lo, &hi);                                                        \
        for (int64_t r = lo; r < hi; r++) {                                                      \
            const int64_t c = r % C;                                                             \
            if (j->dy)                                                                           \
                dx_row_##SUF(j->dy + r * S, j->x + r * S, j->out + r * S, S, j->c0[c], j->c1[c], \
                             j->c2[c], j->stream);                                               \
            else                                                                                 \
                affine_row_##SUF(j->x + r * S, j->out + r * S, S, j->c1[c], j->c2[c], j->stream); \
        }                                                                                        \
    } else {                                                                                     \
        split(j->N * S, t, nt, &lo, &hi);                                                        \
        for (int64_t r = lo; r < hi; r++) {                                                      \
            if (j->dy)                                                                           \
                dx_vec_##SUF(j->dy + r * C, j->x + r * C, j->out + r * C, C, j->c0, j->c1, j->c2,  \
                             j->stream);                                                         \
            else                                                                                 \
                affine_vec_##SUF(j->x + r * C, j->out + r * C, C, j->c1, j->c2, j->stream);      \
        }                                                                                        \
    }                                                                                            \
    fence(j->stream);                                                                            \
}                                                                                                \
                                                                                                 \
/* Totals s1, s2 per channel (C doubles each): rows or channels-innermost, x - shift stats       \
 * (dy == NULL, shift = first value of each channel) or dy sums around k. 0 or -1 (memory). */   \
static int totals_##SUF(const T *x, const T *dy, int64_t N, int64_t C, int64_t S, int cl,        \
                        const T *k, double *s1, double *s2, int nt) {                            \
    struct job_##SUF j;                                                                          \
    memset(&j, 0, sizeof j);                                                                     \
    j.x = x; j.dy = dy; j.N = N; j.C = C; j.S = S; j.k = k;                                      \
    if (!cl) {                                                                                   \
        j.s1 = s1; j.s2 = s2;                                                                    \
        run_parallel(rows_sums_task_##SUF, &j, nt);                                              \
        return 0;                                                                                \
    }                                                                                            \
    if (nt > MAX_THREADS) nt = MAX_THREADS;                                                      \
    double *s = (double *)malloc((size_t)(2 * nt) * C * sizeof(double));                         \
    T *scr = (T *)malloc((size_t)(2 * nt) * C * sizeof(T) + 64);                                 \
    if (!s || !scr) { free(s); free(scr); return -1; }                                           \
    for (int tt = 0; tt < 2 * nt; tt++) memset(s + tt * C, 0, (size_t)C * sizeof(double));       \
    j.s1 = s; j.s2 = s + (int64_t)nt * C; j.scratch = scr;                                       \
    if (!dy) j.k = x; /* the first row is one sample of every channel */                         \
    run_parallel(cl_sums_task_##SUF, &j, nt);                                                    \
    for (int64_t c = 0; c < C; c++) {                                                            \
        double u = 0.0, q = 0.0;                                                                 \
        for (int tt = 0; tt < nt; tt++) { u += j.s1[tt * C + c]; q += j.s2[tt * C + c]; }        \
        s1[c] = u;                                                                               \
        s2[c] = q;                                                                               \
    }                                                                                            \
    free(s); free(scr);                                                                          \
    return 0;                                                                                    \
}                                                                                                \
                                                                                                 \
static int stream_ok_##SUF(int64_t N, int64_t C, int64_t S) {                                    \
    return (double)N * C * S * sizeof(T) >= (double)STREAM_MIN;                                  \
}                                                                                                \
                                                                                                 \
static void elementwise_##SUF(const T *dy, const T *x, T *out, int64_t N, int64_t C, int64_t S,  \
                              int cl, const T *c0, const T *c1, const T *c2, int nt) {           \
    struct job_##SUF j;                                                                          \
    memset(&j, 0, sizeof j);                                                                     \
    T dummy;                                                                                     \
    j.x = x; j.dy = dy; j.out = out; j.N = N; j.C = C; j.S = S;                                  \
    j.stream = stream_ok_##SUF(N, C, S);                                                         \
    j.c0 = c0; j.c1 = c1; j.c2 = c2;                                                             \
    j.scratch = cl ? &dummy : NULL;                                                              \
    if (cl && j.stream && C % 16 && ew_tape_##SUF(dy, x, out, N * S * C, C, c0, c1, c2, nt)) return; \
    run_parallel(ew_task_##SUF, &j, nt);                                                         \
}                                                                                                \
                                                                                                 \
/* Per-channel forward coefficients from the totals of x - k: mean, invstd, var_scale * var,     \
 * and the output's scale and shift; with Batch Renormalization (j->rd) also r and d:            \
 * y = w * (r * (x - mu) * invstd + d) + b, r = clip(sigma_B / sigma, 1/r_max, r_max),           \
 * d = clip((mu - running_mean) / sigma, -d_max, d_max), sigma = sqrt(running_var + eps). */     \
/* (coef_body: the one definition; hr, hw, hb: Batch Renormalization, weight, bias, constants    \
 * where inlined into fwd_coefs' loops, which the compiler then vectorizes across channels;      \
 * fwd_coef, one channel, noinline: inlined into the grouped rows tasks it made the whole        \
 * file take about 40 % longer to compile) */                                                    \
static inline __attribute__((always_inline)) void coef_body_##SUF(const struct job_##SUF *j,     \
        double s1, double s2, double m, double k, int64_t c, T *mean, T *invstd, T *var,         \
        T *scale, T *shift, const int hr, const int hw, const int hb) {                          \
    const double d = s1 / m, v = clamp_var(s2 / m - d * d), mu = k + d;                          \
    const double is = 1.0 / sqrt(v + j->eps);                                                    \
    double r = 1.0, dd = 0.0;                                                                    \
    if (hr) {                                                                                    \
        const double sigma = sqrt((double)j->ren_var[c] + j->eps);                               \
        r = sqrt(v + j->eps) / sigma;                                                            \
        r = r < 1.0 / j->r_max ? 1.0 / j->r_max : (r > j->r_max ? j->r_max : r);                 \
        dd = (mu - (double)j->ren_mean[c]) / sigma;                                              \
        dd = dd < -j->d_max ? -j->d_max : (dd > j->d_max ? j->d_max : dd);                       \
        j->rd[c] = (T)r; j->rd[j->C + c] = (T)dd;                                                \
    }                                                                                            \
    const double w = hw ? (double)j->w[c] : 1.0;                                                 \
    const double sc = is * r * w;                                                                \
    *mean = (T)mu; *invstd = (T)is; *var = (T)(j->var_scale * v);                                \
    *scale = (T)sc;                                                                              \
    *shift = (T)((hb ? (double)j->b[c] : 0.0) + w * dd - mu * sc);                               \
}                                                                                                \
static __attribute__((noinline)) void fwd_coef_##SUF(const struct job_##SUF *j, double s1,       \
                                                     double s2, double m, double k,              \
                                                     int64_t c, T *scale, T *shift) {            \
    coef_body_##SUF(j, s1, s2, m, k, c, &j->mean[c], &j->invstd[c], &j->var[c], scale, shift,    \
                    j->rd != NULL, j->w != NULL, j->b != NULL);                                  \
}                                                                                                \
static inline __attribute__((always_inline)) void coef_loop_##SUF(const struct job_##SUF *j,     \
        const double *restrict s, double m, const T *restrict k, int64_t ks, T *restrict co,     \
        const int hw, const int hb) {                                                            \
    const int64_t C = j->C;                                                                      \
    T *restrict mean = j->mean, *restrict invstd = j->invstd, *restrict var = j->var;            \
    T *restrict scale = co, *restrict shift = co + C;                                            \
    for (int64_t c = 0; c < C; c++)                                                              \
        coef_body_##SUF(j, s[c], s[C + c], m, (double)k[c * ks], c, &mean[c], &invstd[c],        \
                        &var[c], &scale[c], &shift[c], 0, hw, hb);                               \
}                                                                                                \
/* Every channel's coefficients into co (scales, then shifts), from the totals s (C of s1,       \
 * then C of s2) and the shifts k[c * ks]: one vectorized loop (a call per channel cost          \
 * about 56 instructions and a scalar sqrt and division each, 3 % of a (256, 1024) step). */     \
static void fwd_coefs_##SUF(const struct job_##SUF *j, const double *s, double m, const T *k,    \
                            int64_t ks, T *co) {                                                 \
    const int64_t C = j->C;                                                                      \
    if (j->rd) {                                                                                 \
        for (int64_t c = 0; c < C; c++)                                                          \
            fwd_coef_##SUF(j, s[c], s[C + c], m, (double)k[c * ks], c, &co[c], &co[C + c]);      \
    } else if (j->w && j->b) {                                                                   \
        coef_loop_##SUF(j, s, m, k, ks, co, 1, 1);                                               \
    } else if (j->w) {                                                                           \
        coef_loop_##SUF(j, s, m, k, ks, co, 1, 0);                                               \
    } else if (j->b) {                                                                           \
        coef_loop_##SUF(j, s, m, k, ks, co, 0, 1);                                               \
    } else {                                                                                     \
        coef_loop_##SUF(j, s, m, k, ks, co, 0, 0);                                               \
    }                                                                                            \
}                                                                                                \
                                                                                                 \
/* Per-channel backward: dweight, dbias, and dx = al * dy + be * x + ga (Section 3); rd:         \
 * Batch Renormalization's r then d (constants of the backward), or NULL. */                     \
static inline __attribute__((always_inline)) void bwd_body_##SUF(double sdy, double sdyx,        \
        double m, const T *w, int64_t c, T mean, T invstd, T *dw, T *db, T *al, T *be, T *ga,    \
        const T *rd, int64_t C) {                                                                \
    const double is = (double)invstd;                                                            \
    const double r = rd ? (double)rd[c] : 1.0, dd = rd ? (double)rd[C + c] : 0.0;                \
    if (db) db[c] = (T)sdy;                                                                      \
    if (dw) dw[c] = (T)(r * sdyx * is + dd * sdy);                                               \
    const double k = (w ? is * (double)w[c] : is) * r;                                           \
    const double bb = k * sdyx * is * is / m, aa = k * sdy / m;                                  \
    *al = (T)k; *be = (T)(-bb); *ga = (T)(bb * (double)mean - aa);                               \
}                                                                                                \
static __attribute__((noinline)) void bwd_coef_##SUF(double sdy, double sdyx, double m,          \
                                                     const T *w, int64_t c, T mean,              \
                                                     T invstd, T *dw, T *db, T *al, T *be,       \
                                                     T *ga, const T *rd, int64_t C) {            \
    bwd_body_##SUF(sdy, sdyx, m, w, c, mean, invstd, dw, db, al, be, ga, rd, C);                 \
}                                                                                                \
/* Every channel's at once into co (al, be, ga rows): for the usual case (weight, both its       \
 * gradients, no Batch Renormalization) one loop that vectorizes, as fwd_coefs. */               \
static void bwd_coefs_##SUF(const double *restrict s, double m, const T *restrict w,             \
                            const T *restrict mean, const T *restrict invstd, T *restrict dw,    \
                            T *restrict db, T *restrict co, const T *rd, int64_t C) {            \
    if (w && dw && db && !rd) {                                                                  \
        T *restrict al = co, *restrict be = co + C, *restrict ga = co + 2 * C;                   \
        for (int64_t c = 0; c < C; c++)                                                          \
            bwd_body_##SUF(s[c], s[C + c], m, w, c, mean[c], invstd[c], dw, db, &al[c], &be[c],  \
                           &ga[c], NULL, C);                                                     \
        return;                                                                                  \
    }                                                                                            \
    for (int64_t c = 0; c < C; c++)                                                              \
        bwd_coef_##SUF(s[c], s[C + c], m, w, c, mean[c], invstd[c], dw, db, &co[c], &co[C + c],  \
                       &co[2 * C + c], rd, C);                                                   \
}                                                                                                \
                                                                                                 \
/* The training kernels on rows (NCHW): a group of G consecutive channels at a time, small       \
 * enough (rows_group) that its values are still in L2 when the second pass reads them: the      \
 * sums over the group, ROWS_IMAGES images at a time as rows_sums_task, then the coefficients,   \
 * then the elementwise pass over the group an image at a time (G spans next to each other). */  \
static void fwd_rows_task_##SUF(void *p, int t, int nt) {                                        \
    struct job_##SUF *j = (struct job_##SUF *)p;                                                 \
    const int64_t N = j->N, C = j->C, S = j->S, G = rows_group(N, S, sizeof(T), 1);              \
    int64_t lo, hi;                                                                              \
    split(C, t, nt, &lo, &hi);                                                                   \
    for (int64_t c0 = lo; c0 < hi; c0 += G) {                                                    \
        const int64_t c1 = c0 + G < hi ? c0 + G : hi;                                            \
        double s1[ROWS_GROUP_MAX], s2[ROWS_GROUP_MAX];                                           \
        T scale[ROWS_GROUP_MAX], shift[ROWS_GROUP_MAX];                                          \
        for (int64_t c = c0; c < c1; c++) { s1[c - c0] = 0.0; s2[c - c0] = 0.0; }                \
        for (int64_t n0 = 0; n0 < N; n0 += ROWS_IMAGES) {                                        \
            const int64_t nb = N - n0 < ROWS_IMAGES ? N - n0 : ROWS_IMAGES, o = n0 * C * S;      \
            for (int64_t c = c0; c < c1; c++) {                                                  \
                double p1, p2;                                                                   \
                channel_sums_##SUF(j->x + o, NULL, nb, C, S, c, j->x[c * S], &p1, &p2);          \
                s1[c - c0] += p1;                                                                \
                s2[c - c0] += p2;                                                                \
            }                                                                                    \
        }                                                                                        \
        for (int64_t c = c0; c < c1; c++)                                                        \
            fwd_coef_##SUF(j, s1[c - c0], s2[c - c0], (double)(N * S), (double)j->x[c * S], c,   \
                           &scale[c - c0], &shift[c - c0]);                                      \
        for (int64_t n = 0; n < N; n++)                                                          \
            for (int64_t c = c0; c < c1; c++)                                                    \
                affine_row_##SUF(j->x + (n * C + c) * S, j->out + (n * C + c) * S, S,            \
                                 scale[c - c0], shift[c - c0], j->stream);                       \
    }                                                                                            \
    fence(j->stream);                                                                            \
}                                                                                                \
                                                                                                 \
static void bwd_rows_task_##SUF(void *p, int t, int nt) {                                        \
    struct job_##SUF *j = (struct job_##SUF *)p;                                                 \
    const int64_t N = j->N, C = j->C, S = j->S, G = rows_group(N, S, sizeof(T), 2);              \
    int64_t lo, hi;                                                                              \
    split(C, t, nt, &lo, &hi);                                                                   \
    for (int64_t c0 = lo; c0 < hi; c0 += G) {                                                    \
        const int64_t c1 = c0 + G < hi ? c0 + G : hi;                                            \
        double s1[ROWS_GROUP_MAX], s2[ROWS_GROUP_MAX];                                           \
        T al[ROWS_GROUP_MAX], be[ROWS_GROUP_MAX], ga[ROWS_GROUP_MAX];                            \
        for (int64_t c = c0; c < c1; c++) { s1[c - c0] = 0.0; s2[c - c0] = 0.0; }                \
        for (int64_t n0 = 0; n0 < N; n0 += ROWS_IMAGES) {                                        \
            const int64_t nb = N - n0 < ROWS_IMAGES ? N - n0 : ROWS_IMAGES, o = n0 * C * S;      \
            for (int64_t c = c0; c < c1; c++) {                                                  \
                double p1, p2;                                                                   \
                channel_sums_##SUF(j->x + o, j->dy + o, nb, C, S, c, j->mean[c], &p1, &p2);      \
                s1[c - c0] += p1;                                                                \
                s2[c - c0] += p2;                                                                \
            }                                                                                    \
        }                                                                                        \
        for (int64_t c = c0; c < c1; c++)                                                        \
            bwd_coef_##SUF(s1[c - c0], s2[c - c0], (double)(N * S), j->w, c, j->mean[c],         \
                           j->invstd[c], j->dw, j->db, &al[c - c0], &be[c - c0], &ga[c - c0],    \
                           j->rd, C);                                                            \
        if (!j->out) continue;                                                                   \
        for (int64_t n = 0; n < N; n++)                                                          \
            for (int64_t c = c0; c < c1; c++) {                                                  \
                const int64_t o = (n * C + c) * S;                                               \
                dx_row_##SUF(j->dy + o, j->x + o, j->out + o, S, al[c - c0], be[c - c0],         \
                             ga[c - c0], j->stream);                                             \
            }                                                                                    \
    }                                                                                            \
    fence(j->stream);                                                                            \
}                                                                                                \
/* The bodies of the entry points (bn_<kind>_f32/_f64 at the end of the file call them). */      \
                                                                                                 \
/* 0, or -1 (out of memory). */                                                                  \
static int stats_##SUF(const struct bn_stats_args *a) {                                          \
    const T *x = (const T *)a->x;                                                                \
    const int64_t C = a->c, S = a->s;                                                            \
    double *mean = (double *)a->mean, *var = (double *)a->var;                                   \
    double *s = (double *)malloc((size_t)(2 * C) * sizeof(double));                              \
    if (!s) return -1;                                                                           \
    if (totals_##SUF(x, NULL, a->n, C, S, a->cl, NULL, s, s + C, a->nt)) { free(s); return -1; } \
    const double m = (double)(a->n * S);                                                         \
    for (int64_t c = 0; c < C; c++) {                                                            \
        const double d = s[c] / m;                                                               \
        mean[c] = (double)(a->cl ? x[c] : x[c * S]) + d;                                         \
        var[c] = clamp_var(s[C + c] / m - d * d);                                                \
    }                                                                                            \
    free(s);                                                                                     \
    return 0;                                                                                    \
}                                                                                                \
                                                                                                 \
static void affine_##SUF(const struct bn_affine_args *a) {                                       \
    elementwise_##SUF(NULL, (const T *)a->x, (T *)a->y, a->n, a->c, a->s, a->cl, NULL,           \
                      (const T *)a->scale, (const T *)a->shift, a->nt);                          \
}                                                                                                \
                                                                                                 \
/* 0, or -1 (out of memory). */                                                                  \
static int sums_##SUF(const struct bn_sums_args *a) {                                            \
    return totals_##SUF((const T *)a->x, (const T *)a->dy, a->n, a->c, a->s, a->cl, (const T *)a->mean, \
                        (double *)a->sum_dy, (double *)a->sum_dy_xmu, a->nt);                    \
}                                                                                                \
                                                                                                 \
static void dx_##SUF(const struct bn_dx_args *a) {                                               \
    elementwise_##SUF((const T *)a->dy, (const T *)a->x, (T *)a->dx, a->n, a->c, a->s, a->cl,    \
                      (const T *)a->alpha, (const T *)a->beta, (const T *)a->gamma, a->nt);      \
}                                                                                                \
                                                                                                 \
/* 1 if a statistic is NaN/Inf, 0 if not, -1 (out of memory). */                                 \
static int train_fwd_##SUF(const struct bn_train_fwd_args *a) {                                  \
    const T *x = (const T *)a->x;                                                                \
    T *y = (T *)a->y, *st = (T *)a->stats;                                                       \
    const int64_t N = a->n, C = a->c, S = a->s;                                                  \
    struct job_##SUF j;                                                                          \
    memset(&j, 0, sizeof j);                                                                     \
    j.x = x; j.out = y; j.N = N; j.C = C; j.S = S; j.stream = stream_ok_##SUF(N, C, S);          \
    j.w = (const T *)a->weight; j.b = (const T *)a->bias; j.eps = a->eps; j.var_scale = a->var_scale; \
    j.mean = st; j.invstd = st + C; j.var = st + 2 * C;                                          \
    if (a->rd && a->ren_mean && a->ren_var) {                                                    \
        j.ren_mean = (const T *)a->ren_mean; j.ren_var = (const T *)a->ren_var;                  \
        j.r_max = a->r_max; j.d_max = a->d_max; j.rd = (T *)a->rd;                               \
    }                                                                                            \
    if (!a->cl) {                                                                                \
        run_parallel(fwd_rows_task_##SUF, &j, a->nt);                                            \
    } else {                                                                                     \
        double *s = (double *)malloc((size_t)(2 * C) * sizeof(double));                          \
        T *co = (T *)malloc((size_t)(2 * C) * sizeof(T));                                        \
        if (!s || !co || totals_##SUF(x, NULL, N, C, S, 1, NULL, s, s + C, a->nt)) {             \
            free(s); free(co); return -1;                                                        \
        }                                                                                        \
        fwd_coefs_##SUF(&j, s, (double)(N * S), x, 1, co);                                       \
        elementwise_##SUF(NULL, x, y, N, C, S, 1, NULL, co, co + C, a->nt);                      \
        free(s); free(co);                                                                       \
    }                                                                                            \
    return finish_fwd_##SUF(st, C, a->update);                                                   \
}                                                                                                \
                                                                                                 \
/* 0, or -1 (out of memory). */                                                                  \
static int train_bwd_##SUF(const struct bn_train_bwd_args *a) {                                  \
    const T *dy = (const T *)a->dy, *x = (const T *)a->x, *w = (const T *)a->weight;             \
    const T *mean = (const T *)a->stats, *rd = (const T *)a->rd;                                 \
    T *dx = (T *)a->dx, *dw = (T *)a->dweight, *db = (T *)a->dbias;                              \
    const int64_t N = a->n, C = a->c, S = a->s;                                                  \
    const T *invstd = mean + C;                                                                  \
    if (!a->cl) {                                                                                \
        struct job_##SUF j;                                                                      \
        memset(&j, 0, sizeof j);                                                                 \
        j.x = x; j.dy = dy; j.out = dx; j.N = N; j.C = C; j.S = S;                               \
        j.stream = stream_ok_##SUF(N, C, S);                                                     \
        j.w = w; j.mean = (T *)mean; j.invstd = (T *)invstd; j.dw = dw; j.db = db;               \
        j.rd = (T *)rd;                                                                          \
        run_parallel(bwd_rows_task_##SUF, &j, a->nt);                                            \
        return 0;                                                                                \
    }                                                                                            \
    double *s = (double *)malloc((size_t)(2 * C) * sizeof(double));                              \
    T *co = (T *)malloc((size_t)(3 * C) * sizeof(T));                                            \
    if (!s || !co || totals_##SUF(x, dy, N, C, S, 1, mean, s, s + C, a->nt)) {                   \
        free(s); free(co); return -1;                                                            \
    }                                                                                            \
    bwd_coefs_##SUF(s, (double)(N * S), w, mean, invstd, dw, db, co, rd, C);                     \
    if (dx) elementwise_##SUF(dy, x, dx, N, C, S, 1, co, co + C, co + 2 * C, a->nt);             \
    free(s); free(co);                                                                           \
    return 0;                                                                                    \
}


DEFINE_KERNELS(float, f32, 16)
DEFINE_KERNELS(double, f64, 8)

/* float32 channel sums with vector accumulators held across rows (short rows would
 * otherwise pay a horizontal reduction each): a1 += d, a2 += d * d with d = x - k (stats), or
 * a1 += dy, a2 += dy * d (sums, dy != NULL). With w8 (an (N, S) 0/1 byte mask; needs AVX-512
 * BW/VL, the caller checks) only masked-in positions count. */
#if defined(__AVX512F__)
static void row_sums_avx512(const float *x, const float *dy, const uint8_t *w8, int64_t N, int64_t C, int64_t S,
                            int64_t c, float k, double *s1, double *s2) {
    __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
    const __m512 vk = _mm512_set1_ps(k);
    double t1 = 0.0, t2 = 0.0;
    int64_t since = 0;
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + (n * C + c) * S;
        const float *gr = dy ? dy + (n * C + c) * S : NULL;
        for (int64_t s = 0; s < S; s += 16) {
            __mmask16 m = S - s >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (S - s)) - 1u);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
            if (w8) {
                const __m128i mb = _mm_maskz_loadu_epi8(m, w8 + n * S + s);
                m = _mm_test_epi8_mask(mb, mb);
            }
#endif
            const __m512 d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, xr + s), vk);
            if (gr) {
                const __m512 g = _mm512_maskz_loadu_ps(m, gr + s);
                a1 = _mm512_add_ps(a1, g);
                a2 = _mm512_fmadd_ps(g, d, a2);
            } else {
                a1 = _mm512_add_ps(a1, d);
                a2 = _mm512_fmadd_ps(d, d, a2);
            }
        }
        since += S / 16 + 1;
        if (since >= FLUSH || n == N - 1) {
            t1 += (double)_mm512_reduce_add_ps(a1);
            t2 += (double)_mm512_reduce_add_ps(a2);
            a1 = _mm512_setzero_ps();
            a2 = _mm512_setzero_ps();
            since = 0;
        }
    }
    *s1 = t1;
    *s2 = t2;
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
/* row_sums_avx512's way in AVX2: two pairs of accumulators, the row's tail through a masked
 * load (zero outside the row, d masked to zero too). */
static void row_sums_avx2(const float *x, const float *dy, int64_t N, int64_t C, int64_t S, int64_t c, float k,
                          double *s1, double *s2) {
    __m256 a1 = _mm256_setzero_ps(), a2 = a1, b1 = a1, b2 = a1;
    const __m256 vk = _mm256_set1_ps(k);
    const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(S % 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const int64_t body = S - S % 8;
    double t1 = 0.0, t2 = 0.0;
    float h1[8], h2[8];
    int64_t since = 0;
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + (n * C + c) * S;
        const float *gr = dy ? dy + (n * C + c) * S : NULL;
        int64_t s = 0;
        if (gr) {
            for (; s + 16 <= body; s += 16) {
                const __m256 g0 = _mm256_loadu_ps(gr + s), g1 = _mm256_loadu_ps(gr + s + 8);
                a1 = _mm256_add_ps(a1, g0);
                b1 = _mm256_add_ps(b1, g1);
                a2 = _mm256_fmadd_ps(g0, _mm256_sub_ps(_mm256_loadu_ps(xr + s), vk), a2);
                b2 = _mm256_fmadd_ps(g1, _mm256_sub_ps(_mm256_loadu_ps(xr + s + 8), vk), b2);
            }
            for (; s < body; s += 8) {
                const __m256 g0 = _mm256_loadu_ps(gr + s);
                a1 = _mm256_add_ps(a1, g0);
                a2 = _mm256_fmadd_ps(g0, _mm256_sub_ps(_mm256_loadu_ps(xr + s), vk), a2);
            }
            if (S % 8) {
                const __m256 g0 = _mm256_maskload_ps(gr + s, tail);  /* zero outside the row */
                b1 = _mm256_add_ps(b1, g0);
                b2 = _mm256_fmadd_ps(g0, _mm256_sub_ps(_mm256_maskload_ps(xr + s, tail), vk), b2);
            }
        } else {
            for (; s + 16 <= body; s += 16) {
                const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(xr + s), vk);
                const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(xr + s + 8), vk);
                a1 = _mm256_add_ps(a1, d0);
                b1 = _mm256_add_ps(b1, d1);
                a2 = _mm256_fmadd_ps(d0, d0, a2);
                b2 = _mm256_fmadd_ps(d1, d1, b2);
            }
            for (; s < body; s += 8) {
                const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(xr + s), vk);
                a1 = _mm256_add_ps(a1, d0);
                a2 = _mm256_fmadd_ps(d0, d0, a2);
            }
            if (S % 8) {
                const __m256 d0 = _mm256_and_ps(_mm256_sub_ps(_mm256_maskload_ps(xr + s, tail), vk),
                                                _mm256_castsi256_ps(tail));
                b1 = _mm256_add_ps(b1, d0);
                b2 = _mm256_fmadd_ps(d0, d0, b2);
            }
        }
        since += S / 8 + 1;
        if (since >= FLUSH || n == N - 1) {
            _mm256_storeu_ps(h1, _mm256_add_ps(a1, b1));
            _mm256_storeu_ps(h2, _mm256_add_ps(a2, b2));
            for (int l = 0; l < 8; l++) { t1 += h1[l]; t2 += h2[l]; }
            a1 = a2 = b1 = b2 = _mm256_setzero_ps();
            since = 0;
        }
    }
    *s1 = t1;
    *s2 = t2;
}
#endif

static void channel_sums_f32(const float *x, const float *dy, int64_t N, int64_t C, int64_t S, int64_t c,
                             float k, double *s1, double *s2) {
#if defined(__AVX512F__)
    row_sums_avx512(x, dy, NULL, N, C, S, c, k, s1, s2);
#elif defined(__AVX2__) && defined(__FMA__)
    row_sums_avx2(x, dy, N, C, S, c, k, s1, s2);
#else
    channel_sums_generic_f32(x, dy, N, C, S, c, k, s1, s2);
#endif
}

static void channel_sums_f64(const double *x, const double *dy, int64_t N, int64_t C, int64_t S, int64_t c,
                             double k, double *s1, double *s2) {
    channel_sums_generic_f64(x, dy, N, C, S, c, k, s1, s2);
}

/* Channels-innermost float sums on AVX-512, row by row: each call covers W vectors (16 W
 * channels, the last one masked when C % 16 != 0) of every row in [lo, hi), with the row's
 * accumulators in registers (the first 15 vectors' two sums fill 30 of the 32 registers; a
 * 16th vector's go through an L1 scratch), so that a row of up to 256 channels is read
 * front to back in one go and the memory sees one sequential stream per tensor. Used for
 * C <= 256; float lanes over at most BLOCK rows, then double totals, as everywhere. (Timings
 * of this and the other channels-innermost ways: benchmarks/RESULTS.md, "_kernels.c".) */
#if defined(__AVX512F__)
/* The row's last vector, masked to the channels that exist (tail = all ones when C % 16 ==
 * 0); `last` is a constant once the loops over v are unrolled. */
static inline __m512 ld_row(const float *p, int last, __mmask16 tail) {
    return last ? _mm512_maskz_loadu_ps(tail, p) : _mm512_loadu_ps(p);
}
/* the v-th vector of a row, inside DEFINE_ROWS (its loops over v, its WV = W) */
#define LDV(p) ld_row((p) + 16 * v, masked && v == WV - 1, tail)
#define DEFINE_ROWS(W)                                                                           \
static inline __attribute__((always_inline)) void cl_rows_body##W(                               \
        const float *x, const float *dy, int64_t C, int64_t lo, int64_t hi, const float *k,      \
        double *s1, double *s2, const int masked, __mmask16 tail) {                              \
    enum { NR = W < 15 ? W : 15, WV = W };                                                       \
    float t1[16 * W], t2[16 * W];                                                                \
    for (int64_t r0 = lo; r0 < hi; r0 += BLOCK) {                                                \
        const int64_t r1 = r0 + BLOCK < hi ? r0 + BLOCK : hi;                                    \
        __m512 a[NR], b[NR];                                                                     \
        for (int v = 0; v < NR; v++) { a[v] = _mm512_setzero_ps(); b[v] = a[v]; }                \
        for (int l = 16 * NR; l < 16 * W; l++) { t1[l] = 0; t2[l] = 0; }                         \
        for (int64_t r = r0; r < r1; r++) {                                                      \
            const float *xr = x + r * C;                                                         \
            if (dy) {                                                                            \
                const float *g = dy + r * C;                                                     \
                for (int v = 0; v < NR; v++) {                                                   \
                    const __m512 gv = LDV(g);                                                    \
                    const __m512 d = _mm512_sub_ps(LDV(xr), LDV(k));                             \
                    a[v] = _mm512_add_ps(a[v], gv);                                              \
                    b[v] = _mm512_fmadd_ps(d, gv, b[v]);                                         \
                }                                                                                \
                for (int v = NR; v < W; v++) {                                                   \
                    const __m512 gv = LDV(g);                                                    \
                    const __m512 d = _mm512_sub_ps(LDV(xr), LDV(k));                             \
                    _mm512_storeu_ps(t1 + 16 * v, _mm512_add_ps(_mm512_loadu_ps(t1 + 16 * v), gv)); \
                    _mm512_storeu_ps(t2 + 16 * v, _mm512_fmadd_ps(d, gv, _mm512_loadu_ps(t2 + 16 * v))); \
                }                                                                                \
            } else {                                                                             \
                for (int v = 0; v < NR; v++) {                                                   \
                    const __m512 d = _mm512_sub_ps(LDV(xr), LDV(k));                             \
                    a[v] = _mm512_add_ps(a[v], d);                                               \
                    b[v] = _mm512_fmadd_ps(d, d, b[v]);                                          \
                }                                                                                \
                for (int v = NR; v < W; v++) {                                                   \
                    const __m512 d = _mm512_sub_ps(LDV(xr), LDV(k));                             \
                    _mm512_storeu_ps(t1 + 16 * v, _mm512_add_ps(_mm512_loadu_ps(t1 + 16 * v), d)); \
                    _mm512_storeu_ps(t2 + 16 * v, _mm512_fmadd_ps(d, d, _mm512_loadu_ps(t2 + 16 * v))); \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        for (int v = 0; v < NR; v++) { _mm512_storeu_ps(t1 + 16 * v, a[v]); _mm512_storeu_ps(t2 + 16 * v, b[v]); } \
        for (int64_t l = 0; l < (masked ? C : 16 * W); l++) { s1[l] += t1[l]; s2[l] += t2[l]; }  \
    }                                                                                            \
}                                                                                                \
/* Two functions: plain loads throughout for C % 16 == 0, the last vector masked otherwise       \
 * (one function holding both was slower on the unmasked widths). */                             \
static void cl_rows##W(const float *x, const float *dy, int64_t C, int64_t lo, int64_t hi,       \
                       const float *k, double *s1, double *s2, __mmask16 tail) {                 \
    cl_rows_body##W(x, dy, C, lo, hi, k, s1, s2, 0, tail);                                       \
}                                                                                                \
static void cl_rows_m##W(const float *x, const float *dy, int64_t C, int64_t lo, int64_t hi,     \
                         const float *k, double *s1, double *s2, __mmask16 tail) {               \
    cl_rows_body##W(x, dy, C, lo, hi, k, s1, s2, 1, tail);                                       \
}
DEFINE_ROWS(1) DEFINE_ROWS(2) DEFINE_ROWS(3) DEFINE_ROWS(4) DEFINE_ROWS(5) DEFINE_ROWS(6) DEFINE_ROWS(7)
DEFINE_ROWS(8) DEFINE_ROWS(9) DEFINE_ROWS(10) DEFINE_ROWS(11) DEFINE_ROWS(12) DEFINE_ROWS(13)
DEFINE_ROWS(14) DEFINE_ROWS(15) DEFINE_ROWS(16)
typedef void (*rows_fn)(const float *, const float *, int64_t, int64_t, int64_t, const float *, double *,
                        double *, __mmask16);
static const rows_fn cl_rows[17] = {NULL, cl_rows1, cl_rows2, cl_rows3, cl_rows4, cl_rows5, cl_rows6,
                                    cl_rows7, cl_rows8, cl_rows9, cl_rows10, cl_rows11, cl_rows12, cl_rows13,
                                    cl_rows14, cl_rows15, cl_rows16};
static const rows_fn cl_rows_m[17] = {NULL, cl_rows_m1, cl_rows_m2, cl_rows_m3, cl_rows_m4, cl_rows_m5, cl_rows_m6,
                                      cl_rows_m7, cl_rows_m8, cl_rows_m9, cl_rows_m10, cl_rows_m11, cl_rows_m12,
                                      cl_rows_m13, cl_rows_m14, cl_rows_m15, cl_rows_m16};
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
/* AVX2 builds (16 vector registers: too few for a row's accumulators): accumulators in an
 * L1 scratch (2 C floats), updated once per group of four consecutive rows, whose sums are
 * formed in registers first. Four adjacent narrow rows are one short contiguous stretch, so
 * each tensor is still read front to back. Wider rows (where the group's four rows become
 * four streams; limits below) and C % 8 != 0 return 0: the portable loop. */
static int cl_sums_avx2_f32(const float *x, const float *dy, int64_t C, int64_t lo, int64_t hi, const float *k,
                            double *s1, double *s2, float *scratch) {
    if (C % 8) return 0;
    /* Groups of four rows beat the portable loop up to 48 channels with dy, 128 without
     * (benchmarks/RESULTS.md, "_kernels.c"). */
    if (C > (dy ? 48 : 128)) return 0;
    float *a1 = scratch, *a2 = scratch + C;
    for (int64_t c = 0; c < C; c++) { s1[c] = 0.0; s2[c] = 0.0; }
    for (int64_t r0 = lo; r0 < hi; r0 += BLOCK) {
        const int64_t r1 = r0 + BLOCK < hi ? r0 + BLOCK : hi;
        memset(scratch, 0, (size_t)(2 * C) * sizeof(float));
        int64_t r = r0;
        for (; r + 4 <= r1; r += 4) {
            const float *xr = x + r * C, *g = dy ? dy + r * C : NULL;
            for (int64_t c = 0; c < C; c += 8) {
                const __m256 kv = _mm256_loadu_ps(k + c);
#define D(i) _mm256_sub_ps(_mm256_loadu_ps(xr + (i) * C + c), kv)
#define G(i) _mm256_loadu_ps(g + (i) * C + c)
                __m256 u, q;
                if (g) {
                    const __m256 g0 = G(0), g1 = G(1), g2 = G(2), g3 = G(3);
                    u = _mm256_add_ps(_mm256_add_ps(g0, g1), _mm256_add_ps(g2, g3));
                    q = _mm256_fmadd_ps(g0, D(0), _mm256_mul_ps(g1, D(1)));
                    q = _mm256_fmadd_ps(g2, D(2), _mm256_fmadd_ps(g3, D(3), q));
                } else {
                    const __m256 d0 = D(0), d1 = D(1), d2 = D(2), d3 = D(3);
                    u = _mm256_add_ps(_mm256_add_ps(d0, d1), _mm256_add_ps(d2, d3));
                    q = _mm256_fmadd_ps(d0, d0, _mm256_mul_ps(d1, d1));
                    q = _mm256_fmadd_ps(d2, d2, _mm256_fmadd_ps(d3, d3, q));
                }
#undef D
#undef G
                _mm256_storeu_ps(a1 + c, _mm256_add_ps(_mm256_loadu_ps(a1 + c), u));
                _mm256_storeu_ps(a2 + c, _mm256_add_ps(_mm256_loadu_ps(a2 + c), q));
            }
        }
        for (; r < r1; r++) {
            const float *xr = x + r * C, *g = dy ? dy + r * C : NULL;
            for (int64_t c = 0; c < C; c++) {
                const float d = xr[c] - k[c];
                a1[c] += g ? g[c] : d;
                a2[c] += g ? g[c] * d : d * d;
            }
        }
        for (int64_t c = 0; c < C; c++) { s1[c] += a1[c]; s2[c] += a2[c]; }
    }
    return 1;
}
#endif

/* Channels-innermost float sums (AVX-512), three ways, chosen by width (the timings behind
 * the choice: benchmarks/RESULTS.md, "_kernels.c"):
 * - C <= 256: whole rows, cl_rows above, each row read front to back. The two ways below
 *   read a row of more than 64 channels in strided pieces (or stream it through scratch
 *   accumulators), which the hardware prefetchers follow poorly.
 * - C > 256, statistics (dy == NULL): accumulators in registers, 64 channels (four vectors)
 *   at a time, then 16 at a time, over blocks of rows that stay in L1/L2 while each column
 *   chunk re-reads them (faster than whole rows cut into 256-channel chunks).
 * - C > 256, gradient sums: each row streamed once, accumulators in an L1 scratch (2 C
 *   floats); with two tensors to read, the chunked ways were slower.
 * Widths over 256 need C % 16 == 0; returns 0 (not handled) otherwise. */
static int cl_sums_fast_f32(const float *x, const float *dy, int64_t C, int64_t lo, int64_t hi, const float *k,
                            double *s1, double *s2, float *scratch) {
#if defined(__AVX512F__)
    if (C <= 256) {
        for (int64_t c = 0; c < C; c++) { s1[c] = 0.0; s2[c] = 0.0; }
        const __mmask16 tail = C % 16 ? (__mmask16)((1u << (C % 16)) - 1u) : (__mmask16)0xFFFF;
        (C % 16 ? cl_rows_m : cl_rows)[(C + 15) / 16](x, dy, C, lo, hi, k, s1, s2, tail);
        return 1;
    }
    if (C % 16) return 0;
    for (int64_t c = 0; c < C; c++) { s1[c] = 0.0; s2[c] = 0.0; }
    if (dy) {
        float *a1 = scratch, *a2 = scratch + C;
        for (int64_t r0 = lo; r0 < hi; r0 += BLOCK) {
            const int64_t r1 = r0 + BLOCK < hi ? r0 + BLOCK : hi;
            memset(scratch, 0, (size_t)(2 * C) * sizeof(float));
            for (int64_t r = r0; r < r1; r++) {
                const float *xr = x + r * C, *g = dy + r * C;
                for (int64_t c = 0; c < C; c += 16) {
                    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(xr + c), _mm512_loadu_ps(k + c));
                    const __m512 v = _mm512_loadu_ps(g + c);
                    _mm512_storeu_ps(a1 + c, _mm512_add_ps(_mm512_loadu_ps(a1 + c), v));
                    _mm512_storeu_ps(a2 + c, _mm512_fmadd_ps(v, d, _mm512_loadu_ps(a2 + c)));
                }
            }
            for (int64_t c = 0; c < C; c++) { s1[c] += a1[c]; s2[c] += a2[c]; }
        }
        return 1;
    }
    /* Statistics for C > 256: column chunks over blocks of rows. */
    float t1[64], t2[64];
    /* Rows per block: the block is re-read once per 64-channel chunk, so keep it near L1's
     * size (8192 floats = 32 KiB), between 16 and BLOCK rows. */
    int64_t block = 8192 / C;
    block = block < 16 ? 16 : (block > BLOCK ? BLOCK : block);
    for (int64_t r0 = lo; r0 < hi; r0 += block) {
        const int64_t r1 = r0 + block < hi ? r0 + block : hi;
        int64_t c0 = 0;
        for (; c0 + 64 <= C; c0 += 64) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            const __m512 k0 = _mm512_loadu_ps(k + c0), k1 = _mm512_loadu_ps(k + c0 + 16),
                         k2 = _mm512_loadu_ps(k + c0 + 32), k3 = _mm512_loadu_ps(k + c0 + 48);
            for (int64_t r = r0; r < r1; r++) {
                const float *xr = x + r * C + c0;
                __m512 d0 = _mm512_sub_ps(_mm512_loadu_ps(xr), k0), d1 = _mm512_sub_ps(_mm512_loadu_ps(xr + 16), k1),
                       d2 = _mm512_sub_ps(_mm512_loadu_ps(xr + 32), k2),
                       d3 = _mm512_sub_ps(_mm512_loadu_ps(xr + 48), k3);
                a0 = _mm512_add_ps(a0, d0); a1 = _mm512_add_ps(a1, d1);
                a2 = _mm512_add_ps(a2, d2); a3 = _mm512_add_ps(a3, d3);
                b0 = _mm512_fmadd_ps(d0, d0, b0); b1 = _mm512_fmadd_ps(d1, d1, b1);
                b2 = _mm512_fmadd_ps(d2, d2, b2); b3 = _mm512_fmadd_ps(d3, d3, b3);
            }
            _mm512_storeu_ps(t1, a0); _mm512_storeu_ps(t1 + 16, a1); _mm512_storeu_ps(t1 + 32, a2);
            _mm512_storeu_ps(t1 + 48, a3);
            _mm512_storeu_ps(t2, b0); _mm512_storeu_ps(t2 + 16, b1); _mm512_storeu_ps(t2 + 32, b2);
            _mm512_storeu_ps(t2 + 48, b3);
            for (int l = 0; l < 64; l++) { s1[c0 + l] += t1[l]; s2[c0 + l] += t2[l]; }
        }
        for (; c0 < C; c0 += 16) {
            __m512 a = _mm512_setzero_ps(), b = a;
            const __m512 kv = _mm512_loadu_ps(k + c0);
            for (int64_t r = r0; r < r1; r++) {
                const __m512 xv = _mm512_sub_ps(_mm512_loadu_ps(x + r * C + c0), kv);
                a = _mm512_add_ps(a, xv);
                b = _mm512_fmadd_ps(xv, xv, b);
            }
            _mm512_storeu_ps(t1, a);
            _mm512_storeu_ps(t2, b);
            for (int l = 0; l < 16; l++) { s1[c0 + l] += t1[l]; s2[c0 + l] += t2[l]; }
        }
    }
    return 1;
#elif defined(__AVX2__) && defined(__FMA__)
    return cl_sums_avx2_f32(x, dy, C, lo, hi, k, s1, s2, scratch);
#else
    (void)x; (void)dy; (void)C; (void)lo; (void)hi; (void)k; (void)s1; (void)s2; (void)scratch;
    return 0;
#endif
}

static int cl_sums_fast_f64(const double *x, const double *dy, int64_t C, int64_t lo, int64_t hi, const double *k,
                            double *s1, double *s2, double *scratch) {
    (void)x; (void)dy; (void)C; (void)lo; (void)hi; (void)k; (void)s1; (void)s2; (void)scratch;
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * Masked statistics, rows layout (N, C, L) with a (N, L) mask of 0/1 bytes: the statistics
 * see only valid positions, every position is normalized, and (Section 3 with the mask)
 * dx = k dy - w (b (x - mu) + a), the two sums running over every position.
 * ------------------------------------------------------------------------------------- */
/* float32 masked channel sums (see row_sums_avx512); returns 0 where AVX-512 BW/VL is not
 * available (then the portable loop runs). */
static int masked_sums_fast_f32(const float *x, const uint8_t *w8, int64_t N, int64_t C, int64_t L, int64_t c,
                                float k, double *s1, double *s2) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    row_sums_avx512(x, NULL, w8, N, C, L, c, k, s1, s2);
    return 1;
#else
    (void)x; (void)w8; (void)N; (void)C; (void)L; (void)c; (void)k; (void)s1; (void)s2;
    return 0;
#endif
}

/* stream: non-temporal stores for whole, 64-byte aligned vectors (as in the plain kernels) */
static int masked_dx_fast_f32(const float *gr, const float *xr, const uint8_t *wr, float *o, int64_t L, float al,
                              float be, float ga, int stream) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    const __m512 va = _mm512_set1_ps(al), vb = _mm512_set1_ps(be), vg = _mm512_set1_ps(ga);
    for (int64_t l = 0; l < L; l += 16) {
        const __mmask16 in = L - l >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (L - l)) - 1u);
        const __m128i mb = _mm_maskz_loadu_epi8(in, wr + l);
        const __mmask16 m = _mm_test_epi8_mask(mb, mb);
        const __m512 corr = _mm512_maskz_fmadd_ps(m, _mm512_maskz_loadu_ps(m, xr + l), vb, vg);
        const __m512 v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(in, gr + l), va, corr);
        if (stream && in == (__mmask16)0xFFFF && !((uintptr_t)(o + l) & 63))
            _mm512_stream_ps(o + l, v);
        else
            _mm512_mask_storeu_ps(o + l, in, v);
    }
    return 1;
#else
    (void)gr; (void)xr; (void)wr; (void)o; (void)L; (void)al; (void)be; (void)ga; (void)stream;
    return 0;
#endif
}

static int masked_dx_fast_f64(const double *gr, const double *xr, const uint8_t *wr, double *o, int64_t L, double al,
                              double be, double ga, int stream) {
    (void)gr; (void)xr; (void)wr; (void)o; (void)L; (void)al; (void)be; (void)ga; (void)stream;
    return 0;
}

static int masked_sums_fast_f64(const double *x, const uint8_t *w8, int64_t N, int64_t C, int64_t L, int64_t c,
                                double k, double *s1, double *s2) {
    (void)x; (void)w8; (void)N; (void)C; (void)L; (void)c; (void)k; (void)s1; (void)s2;
    return 0;
}

#define DEFINE_MASKED(T, SUF)                                                                    \
struct masked_##SUF {                                                                            \
    const T *x, *dy; T *out; const uint8_t *w8; int64_t N, C, L, n0, l0; double m, eps;          \
    int stream;                                                                                  \
    const T *w, *b; T *mean, *invstd, *var, *dw, *db;                                            \
};                                                                                               \
                                                                                                 \
static void masked_fwd_task_##SUF(void *p, int t, int nt) {                                      \
    struct masked_##SUF *a = (struct masked_##SUF *)p;                                           \
    const int64_t N = a->N, C = a->C, L = a->L;                                                  \
    int64_t lo, hi;                                                                              \
    split(C, t, nt, &lo, &hi);                                                                   \
    for (int64_t c = lo; c < hi; c++) {                                                          \
        const T k = a->x[(a->n0 * C + c) * L + a->l0]; /* a valid sample of the channel */       \
        double s1 = 0.0, s2 = 0.0;                                                               \
        if (!masked_sums_fast_##SUF(a->x, a->w8, N, C, L, c, k, &s1, &s2)) {                     \
            for (int64_t n = 0; n < N; n++) {                                                    \
                const T *restrict xr = a->x + (n * C + c) * L;                                   \
                const uint8_t *restrict wr = a->w8 + n * L;                                      \
                T b1 = 0, b2 = 0;                                                                \
                _Pragma("omp simd reduction(+:b1,b2)")                                           \
                for (int64_t l = 0; l < L; l++) {                                                \
                    const T d = wr[l] ? xr[l] - k : (T)0;                                        \
                    b1 += d;                                                                     \
                    b2 += d * d;                                                                 \
                }                                                                                \
                s1 += b1;                                                                        \
                s2 += b2;                                                                        \
            }                                                                                    \
        }                                                                                        \
        const double d = s1 / a->m, v = clamp_var(s2 / a->m - d * d), mu = (double)k + d;        \
        const double is = 1.0 / sqrt(v + a->eps), sc = a->w ? is * (double)a->w[c] : is;         \
        const T scale = (T)sc, shift = (T)((a->b ? (double)a->b[c] : 0.0) - mu * sc);            \
        a->mean[c] = (T)mu; a->invstd[c] = (T)is; a->var[c] = (T)v;                              \
        for (int64_t n = 0; n < N; n++)                                                          \
            affine_row_##SUF(a->x + (n * C + c) * L, a->out + (n * C + c) * L, L, scale, shift,  \
                             a->stream);                                                         \
    }                                                                                            \
    fence(a->stream);                                                                            \
}                                                                                                \
                                                                                                 \
/* Returns the number of valid positions (the statistics' m); 0 leaves everything untouched. */  \
static int64_t masked_fwd_##SUF(const struct bn_masked_fwd_args *a) {                            \
    const uint8_t *mask = (const uint8_t *)a->mask;                                              \
    const int64_t N = a->n, C = a->c, L = a->l;                                                  \
    int64_t count = 0, first = -1;                                                               \
    for (int64_t i = 0; i < N * L; i++)                                                          \
        if (mask[i]) { count++; if (first < 0) first = i; }                                      \
    if (count == 0) return 0;                                                                    \
    T *st = (T *)a->stats;                                                                       \
    struct masked_##SUF j;                                                                       \
    memset(&j, 0, sizeof j);                                                                     \
    j.x = (const T *)a->x; j.out = (T *)a->y; j.w8 = mask; j.N = N; j.C = C; j.L = L; j.n0 = first / L; \
    j.l0 = first % L; j.m = (double)count; j.eps = a->eps; j.w = (const T *)a->weight;           \
    j.b = (const T *)a->bias; j.mean = st; j.invstd = st + C; j.var = st + 2 * C;                \
    j.stream = stream_ok_##SUF(N, C, L);                                                         \
    run_parallel(masked_fwd_task_##SUF, &j, a->nt);                                              \
    return count;                                                                                \
}                                                                                                \
                                                                                                 \
                                                                                                 \
static void masked_bwd_task_##SUF(void *p, int t, int nt) {                                      \
    struct masked_##SUF *a = (struct masked_##SUF *)p;                                           \
    const int64_t N = a->N, C = a->C, L = a->L;                                                  \
    int64_t lo, hi;                                                                              \
    split(C, t, nt, &lo, &hi);                                                                   \
    for (int64_t c = lo; c < hi; c++) {                                                          \
        const T mu = a->mean[c];                                                                 \
        double s1, s2;                                                                           \
        channel_sums_##SUF(a->x, a->dy, N, C, L, c, mu, &s1, &s2);                               \
        const double is = (double)a->invstd[c];                                                  \
        if (a->db) a->db[c] = (T)s1;                                                             \
        if (a->dw) a->dw[c] = (T)(s2 * is);                                                      \
        if (!a->out) continue;                                                                   \
        const double k = a->w ? is * (double)a->w[c] : is;                                       \
        const double bb = k * s2 * is * is / a->m, aa = k * s1 / a->m;                           \
        const T al = (T)k, be = (T)(-bb), ga = (T)(bb * (double)mu - aa);                        \
        for (int64_t n = 0; n < N; n++) {                                                        \
            const T *restrict xr = a->x + (n * C + c) * L, *restrict gr = a->dy + (n * C + c) * L; \
            const uint8_t *restrict wr = a->w8 + n * L;                                          \
            T *restrict o = a->out + (n * C + c) * L;                                            \
            if (masked_dx_fast_##SUF(gr, xr, wr, o, L, al, be, ga, a->stream)) continue;         \
            _Pragma("omp simd")                                                                  \
            for (int64_t l = 0; l < L; l++)                                                      \
                o[l] = al * gr[l] + (wr[l] ? be * xr[l] + ga : (T)0);                            \
        }                                                                                        \
    }                                                                                            \
    fence(a->stream);                                                                            \
}                                                                                                \
                                                                                                 \
static void masked_bwd_##SUF(const struct bn_masked_bwd_args *a) {                               \
    const T *st = (const T *)a->stats;                                                           \
    struct masked_##SUF j;                                                                       \
    memset(&j, 0, sizeof j);                                                                     \
    j.x = (const T *)a->x; j.dy = (const T *)a->dy; j.out = (T *)a->dx; j.w8 = (const uint8_t *)a->mask; \
    j.N = a->n; j.C = a->c; j.L = a->l; j.m = (double)a->count; j.w = (const T *)a->weight;      \
    j.mean = (T *)st; j.invstd = (T *)(st + a->c); j.dw = (T *)a->dweight; j.db = (T *)a->dbias; \
    j.stream = stream_ok_##SUF(a->n, a->c, a->l);                                                \
    run_parallel(masked_bwd_task_##SUF, &j, a->nt);                                              \
}
DEFINE_MASKED(float, f32)
DEFINE_MASKED(double, f64)

/* ---------------------------------------------------------------------------------------
 * Small per-channel helpers, written once for both element types: f64 selects the type,
 * and each caller passes it as a constant, so the compiler specializes the loop.
 * ------------------------------------------------------------------------------------- */
static inline double load_at(const void *p, int64_t i, int f64) {
    return f64 ? ((const double *)p)[i] : (double)((const float *)p)[i];
}

static inline void store_at(void *p, int64_t i, double v, int f64) {
    if (f64)
        ((double *)p)[i] = v;
    else
        ((float *)p)[i] = (float)v;
}

/* 1 if a mean or invstd is NaN/Inf or an invstd is not positive (a variance that
 * overflowed); else 2 if some channel has sqrt(m) * unit * |mean| * invstd > threshold
 * (tested only for threshold > 0): a common offset large enough that float sums without a
 * shift, as in torch's kernel, may have rounded away part of the variance; else 0. Reads
 * only. */
static inline __attribute__((always_inline)) int check_stats(const struct bn_check_stats_args *a, int f64) {
    const double risk = a->threshold > 0.0 ? sqrt((double)a->m) * a->unit : 0.0;
    int code = 0;
    for (int64_t c = 0; c < a->c; c++) {
        const double mu = load_at(a->mean, c, f64), is = load_at(a->invstd, c, f64);
        if (!isfinite(mu) || !isfinite(is) || !(is > 0.0)) return 1;
        if (risk * fabs(mu) * is > a->threshold) code = 2;
    }
    return code;
}

/* torch's lerp as its vectorized CPU kernel computes it (ATen's Lerp.h, lerp_vec): fma(w,
 * end - start, start) for |w| < 0.5, else fma(w - 1, end - start, end), in the element type,
 * so the buffers hold what lerp_ would have written. */

/* ---------------------------------------------------------------------------------------
 * The smooth activations' elementary functions (elu, silu, gelu, for the kernels below), in
 * plain C that gcc vectorizes inside those kernels' loops: no libm call (no libmvec either),
 * no branch (selects), and IEEE arithmetic throughout (no -ffast-math: NaN in, NaN out).
 *
 *   exp(hi + lo): x = hi + lo = k ln2 + r with k = round(x / ln2) by the shift trick (adding
 *     1.5 * 2^52, resp. 2^23, and subtracting it again) and r = hi - k ln2 + lo by two fmas
 *     (ln2 as a sum of two values: Cody and Waite), |r| <= ln2 / 2; exp(r) = 1 + expm1(r) with
 *     expm1's Taylor polynomial (degree 13 in double, 7 in float: truncation below 2^-60 resp.
 *     2^-27 of the result); then times 2^k as two factors 2^k1 * 2^k2, their exponent bits
 *     taken from k + bias + the shift (no float-to-int conversion, which NaN would not
 *     survive), so that a result in the subnormal range is rounded once and the overflow to
 *     +inf comes where the exact value passes the largest finite one. ``lo`` carries the
 *     low part of an argument that one value cannot hold exactly (gelu's -z^2/2).
 *   expm1(x) for x <= 0: 2^k * expm1(r) + (2^k - 1), one fma; for |x| < ln2 / 2 (k = 0) the
 *     polynomial itself, so expm1(x) = x for tiny x (not exp(x) - 1, which cancels).
 *   Phi(z), the standard normal cdf (gelu's), as erfc(|z| / sqrt 2) / 2 below zero and
 *     1 - erfc(|z| / sqrt 2) / 2 above (no 1 + erf(z / sqrt 2), which cancels for z < 0):
 *     erfc(x) = t exp(-x^2) g(y), t = 4 / (4 + x), y = 2t - 1 in (-1, 1], with g(y) =
 *     erfc(x) exp(x^2) / t (between 0.14 and 1, analytic on [-1, 1]) a polynomial in y: the
 *     power form of g's Chebyshev series truncated below 3e-18 (double, 25 terms) resp. 3e-10
 *     (float, 14 terms), computed with mpmath (the sum of the coefficients' magnitudes is 1.0,
 *     so their sum loses nothing to cancellation). x^2 = z^2 / 2 enters exp as an exact
 *     pair (z*z and fma(z, z, -z*z)): rounded, it would cost up to 2^-53 * 800 of relative
 *     accuracy in the tail. |z| is clamped at 40 (double) / 15 (float), beyond which erfc
 *     underflows to 0 anyway; ``pdf`` receives phi(z) = exp(-z^2/2) / sqrt(2 pi).
 *   gelu(z) = z Phi(z), below zero with z inside exp's factor (a subnormal result rounded once).
 * Measured against mpmath (40 digits) over normal, uniform, tiny and tail inputs: exp, expm1,
 * elu, silu within 1.7 ulp, gelu within 5.4 ulp (double and float, subnormal results
 * included); silu' and gelu' near their zeros lose relative accuracy to cancellation, as
 * torch's formulas do (absolute error a few ulp of 1). Torch's own float gelu is about 1e-7
 * absolute off (its erf), so float gelu differs from torch by up to that much. The tanh
 * gelu z / (1 + exp(-2u)) carries u's rounding, amplified by 2|u| in exp (as torch's tanh
 * form does); results below the smallest normal number may come out as 0 there and in silu
 * (exp(-z) overflowing first, as in torch's z / (1 + exp(-z))).
 * ------------------------------------------------------------------------------------- */
#define SM_SHIFT_f64 0x1.8p52
#define SM_BIASED_f64 (0x1.8p52 + 1023.0)
#define SM_MBITS_f64 52
#define SM_LOG2E_f64 0x1.71547652b82fep+0
#define SM_LN2HI_f64 0x1.62e42fefa39efp-1
#define SM_LN2LO_f64 0x1.abc9e3b39803fp-56
#define SM_EXP_MAX_f64 710.0  /* exp(710) overflows */
#define SM_EXP_MIN_f64 -746.0 /* exp(-746) is below half the smallest subnormal */
#define SM_EM1_MIN_f64 -40.0  /* expm1(-40) rounds to -1 */
#define SM_ZMAX_f64 40.0      /* erfc(40 / sqrt 2) underflows */
#define SM_FABS_f64 fabs
#define SM_ONE_f64 0x3ff0000000000000u  /* bits of 1.0 */
#define SM_SQRTH_f64 0x3fe6a09e667f3bcdu  /* bits of sqrt(1/2) */
#define SM_MANT_f64 0x000fffffffffffffu
#define SM_I2F_f64 0x4330000000000000u   /* bits of 2^52 */
#define SM_TWO52_f64 0x1p52
#define SM_BIAS_f64 1023.0
#define SM_GELU_INF_NAN_f64 0           /* torch: gelu(+inf) = +inf in double */
#define SM_SHIFT_f32 0x1.8p23f
#define SM_BIASED_f32 (0x1.8p23f + 127.0f)
#define SM_MBITS_f32 23
#define SM_LOG2E_f32 0x1.715476p+0f
#define SM_LN2HI_f32 0x1.62e430p-1f
#define SM_LN2LO_f32 -0x1.05c610p-29f
#define SM_EXP_MAX_f32 89.0f
#define SM_EXP_MIN_f32 -104.0f
#define SM_EM1_MIN_f32 -20.0f
#define SM_ZMAX_f32 15.0f
#define SM_FABS_f32 fabsf
#define SM_ONE_f32 0x3f800000u
#define SM_SQRTH_f32 0x3f3504f3u
#define SM_MANT_f32 0x007fffffu
#define SM_I2F_f32 0x4b000000u
#define SM_TWO52_f32 0x1p23f
#define SM_BIAS_f32 127.0f
/* torch's float gelu(+inf): NaN from its AVX-512 kernel (a quirk), +inf from its AVX2 one;
 * batchnorm._jit sets it at load time to what torch gives in this process. */
static int torch_gelu_inf_nan_f32 = 1;
void bn_set_torch_gelu_inf_nan(int32_t on) { torch_gelu_inf_nan_f32 = on != 0; }
#define SM_GELU_INF_NAN_f32 torch_gelu_inf_nan_f32

/* expm1(r) / r^2 - 1/(2r)... precisely: expm1(r) = r + r^2 * (c[0] + r * (c[1] + ...)) */
static const double sm_em1_f64[] = {
    0x1.0000000000000p-1, 0x1.5555555555555p-3, 0x1.5555555555555p-5, 0x1.1111111111111p-7,
    0x1.6c16c16c16c17p-10, 0x1.a01a01a01a01ap-13, 0x1.a01a01a01a01ap-16, 0x1.71de3a556c734p-19,
    0x1.27e4fb7789f5cp-22, 0x1.ae64567f544e4p-26, 0x1.1eed8eff8d898p-29, 0x1.6124613a86d09p-33};
static const float sm_em1_f32[] = {
    0.5f, 0.1666666716337204f, 0.0416666679084301f, 0.008333333767950535f, 0.0013888889225199819f,
    0.00019841270113829523f};
/* atanh(s) / s = 1 + s^2 * (c[0] + s^2 * (c[1] + ...)): the Taylor series, |s| <= 0.172 */
static const double sm_atanh_f64[] = {
    0x1.5555555555555p-2, 0x1.999999999999ap-3, 0x1.2492492492492p-3, 0x1.c71c71c71c71cp-4,
    0x1.745d1745d1746p-4, 0x1.3b13b13b13b14p-4, 0x1.1111111111111p-4, 0x1.e1e1e1e1e1e1ep-5,
    0x1.af286bca1af28p-5, 0x1.8618618618618p-5, 0x1.642c8590b2164p-5, 0x1.47ae147ae147bp-5};
static const float sm_atanh_f32[] = {
    0.3333333432674408f, 0.20000000298023224f, 0.1428571492433548f, 0.1111111119389534f,
    0.09090909361839294f, 0.07692307978868484f};
/* g(y) = sum c[j] y^j (see above) */
static const double sm_erfc_f64[] = {
    0x1.18932bf08e154p-2, 0x1.f3fe31ecb49bfp-3, 0x1.8be202d26c703p-3, 0x1.14eacb1ad0338p-3,
    0x1.52cac2371027fp-4, 0x1.645fd8a4bc0a9p-5, 0x1.38dbd2c8dcb0dp-6, 0x1.b00c052c4b4b1p-8,
    0x1.908f4726f62a1p-10, 0x1.269b51c88dd2bp-14, -0x1.dd284577fc490p-14, -0x1.72cda1c4caed1p-15,
    -0x1.e7eb7d76c6ff8p-21, 0x1.3c6de5abf5920p-18, 0x1.3b12b04d7339cp-20, -0x1.7e212f0928219p-22,
    -0x1.c71dc9db1a68ap-23, 0x1.3f8d23aac035bp-26, 0x1.10440b059fc9ep-25, 0x1.2fc6bb0595015p-34,
    -0x1.36e7087b1380dp-28, -0x1.83d8a52d1338ap-33, 0x1.39acb48918bb0p-31, 0x1.50943359c9b4cp-36,
    -0x1.89f4a39b7844ep-35};
static const float sm_erfc_f32[] = {
    0.2739989161491394f, 0.24413718283176422f, 0.19330216944217682f, 0.1352134644985199f,
    0.08271301537752151f, 0.043502628803253174f, 0.01909465342760086f, 0.006593022961169481f,
    0.0015301777748391032f, 6.897650746395811e-05f, -0.00011717303277691826f, -4.251156860846095e-05f,
    1.941487198564573e-06f, 3.5362454582354985e-06f};

/* The activation codes of bn_act_*_args.act. */
#define ACT_LINEAR 0     /* z > 0 ? z : slope * z: identity (slope 1), relu (0), leaky_relu */
#define ACT_ELU 1        /* z > 0 ? z : alpha * expm1(z) */
#define ACT_SILU 2       /* z / (1 + exp(-z)), as torch computes it */
#define ACT_GELU 3       /* z * Phi(z) (approximate="none") */
#define ACT_GELU_TANH 4  /* z * (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))) / 2 */

#define SM_INLINE static inline __attribute__((always_inline))
/* p = sum c[j] x^j as four interleaved Horner chains in x^4, combined by Estrin's scheme: a
 * quarter of Horner's dependency chain (the loops are latency-bound otherwise). */
#define SM_POLY(T, FMA, c, x, p)                                                                 \
    do {                                                                                         \
        const int nc_ = (int)(sizeof c / sizeof c[0]);                                           \
        const T x2_ = (x) * (x), x4_ = x2_ * x2_;                                                \
        T a0_ = 0, a1_ = 0, a2_ = 0, a3_ = 0;                                                    \
        _Pragma("GCC unroll 32")                                                                 \
        for (int j_ = nc_ - 1; j_ >= 0; j_--) {                                                  \
            const int first_ = j_ + 4 >= nc_;                                                    \
            if (j_ % 4 == 0) a0_ = first_ ? c[j_] : FMA(a0_, x4_, c[j_]);                        \
            else if (j_ % 4 == 1) a1_ = first_ ? c[j_] : FMA(a1_, x4_, c[j_]);                   \
            else if (j_ % 4 == 2) a2_ = first_ ? c[j_] : FMA(a2_, x4_, c[j_]);                   \
            else a3_ = first_ ? c[j_] : FMA(a3_, x4_, c[j_]);                                    \
        }                                                                                        \
        p = FMA(FMA(a3_, x, a2_), x2_, FMA(a1_, x, a0_));                                        \
    } while (0)

#define DEFINE_SMOOTH(T, SUF, U, FMA)                                                            \
/* 2^k for an integer-valued k of the normal exponent range */                                   \
SM_INLINE T sm_pow2_##SUF(T k) {                                                                 \
    T v = k + SM_BIASED_##SUF;                                                                   \
    U u;                                                                                         \
    memcpy(&u, &v, sizeof u);                                                                    \
    u <<= SM_MBITS_##SUF;                                                                        \
    memcpy(&v, &u, sizeof v);                                                                    \
    return v;                                                                                    \
}                                                                                                \
                                                                                                 \
/* expm1(r) for |r| <= ln2 / 2 */                                                                \
SM_INLINE T sm_em1_poly_##SUF(T r) {                                                             \
    T p;                                                                                         \
    SM_POLY(T, FMA, sm_em1_##SUF, r, p);                                                         \
    return FMA(p, r * r, r);                                                                     \
}                                                                                                \
                                                                                                 \
/* f * exp(hi + lo), has_lo a constant (0: f * exp(hi)), |lo| <= 2, |f| <= 2^8: f is applied     \
 * before the last scaling, so that a result in the subnormal range is rounded once. Computed    \
 * for every argument, then +inf above SM_EXP_MAX and f * 0 below SM_EXP_MIN selected (there     \
 * k would leave the exponent range; f * 0 keeps f's sign, and is NaN for an infinite f); NaN    \
 * propagates through the arithmetic. */                                                         \
SM_INLINE T sm_exp_parts_##SUF(T hi, T lo, const int has_lo, T *x, T *s1, T *s2) {               \
    *x = has_lo ? hi + lo : hi;                 /* exp(hi + lo) = m * s1 * s2 */                 \
    const T k = FMA(*x, SM_LOG2E_##SUF, SM_SHIFT_##SUF) - SM_SHIFT_##SUF;                        \
    T r = FMA(-k, SM_LN2LO_##SUF, FMA(-k, SM_LN2HI_##SUF, hi));                                  \
    if (has_lo) r += lo;                                                                         \
    const T k1 = (k * (T)0.5 + SM_SHIFT_##SUF) - SM_SHIFT_##SUF;                                 \
    *s1 = sm_pow2_##SUF(k1);                                                                     \
    *s2 = sm_pow2_##SUF(k - k1);                                                                 \
    return (T)1 + sm_em1_poly_##SUF(r);                                                          \
}                                                                                                \
                                                                                                 \
SM_INLINE T sm_exp_finish_##SUF(T x, T m, T f, T s1, T s2) {                                     \
    const T y = ((m * f) * s1) * s2;                                                             \
    return x > SM_EXP_MAX_##SUF ? (T)INFINITY : (x < SM_EXP_MIN_##SUF ? f * (T)0 : y);           \
}                                                                                                \
                                                                                                 \
SM_INLINE T sm_exp2_##SUF(T hi, T lo, const int has_lo, T f) {                                   \
    T x, s1, s2;                                                                                 \
    const T m = sm_exp_parts_##SUF(hi, lo, has_lo, &x, &s1, &s2);                                \
    return sm_exp_finish_##SUF(x, m, f, s1, s2);                                                 \
}                                                                                                \
                                                                                                 \
SM_INLINE T sm_exp_##SUF(T x) { return sm_exp2_##SUF(x, 0, 0, 1); }                              \
                                                                                                 \
/* expm1(x) for x <= 0 (a larger x gives expm1(0) = 0) */                                        \
SM_INLINE T sm_expm1_##SUF(T x) {                                                                \
    x = x > 0 ? (T)0 : x;                                                                        \
    x = x < SM_EM1_MIN_##SUF ? SM_EM1_MIN_##SUF : x;                                             \
    const T k = FMA(x, SM_LOG2E_##SUF, SM_SHIFT_##SUF) - SM_SHIFT_##SUF;                         \
    const T r = FMA(-k, SM_LN2LO_##SUF, FMA(-k, SM_LN2HI_##SUF, x));                             \
    const T s = sm_pow2_##SUF(k);                                                                \
    return FMA(s, sm_em1_poly_##SUF(r), s - (T)1);                                               \
}                                                                                                \
                                                                                                 \
/* erfc(|z| / sqrt 2) / 2 = exp(hi + lo) * (the value returned), hi + lo = -z^2/2 exactly */     \
SM_INLINE T sm_half_erfc_##SUF(T z, T *hi, T *lo) {                                              \
    /* |z| clamped (a NaN z may come out as SM_ZMAX: the callers' products with z keep it NaN); a\
     * plain min, not a chain of selects, which gcc would if-convert by duplicating the paths */ \
    const T az = SM_FABS_##SUF(z), a = az < SM_ZMAX_##SUF ? az : SM_ZMAX_##SUF;                  \
    const T x = a * (T)0x1.6a09e667f3bcdp-1;   /* |z| / sqrt 2 */                                \
    const T q = (T)1 / ((T)4 + x), t = (T)4 * q, y = ((T)4 - x) * q;                             \
    T g;                                                                                         \
    SM_POLY(T, FMA, sm_erfc_##SUF, y, g);                                                        \
    const T aa = a * a;                                                                          \
    *hi = aa * (T)-0.5;                                                                          \
    *lo = FMA(a, a, -aa) * (T)-0.5;                                                              \
    return (T)0.5 * (t * g);                                                                     \
}                                                                                                \
                                                                                                 \
/* Phi(z); *pdf = phi(z) */                                                                      \
SM_INLINE T sm_phi_##SUF(T z, T *pdf) {                                                          \
    T hi, lo, x, s1, s2;                                                                         \
    const T f = sm_half_erfc_##SUF(z, &hi, &lo), m = sm_exp_parts_##SUF(hi, lo, 1, &x, &s1, &s2);\
    const T half_erfc = sm_exp_finish_##SUF(x, m, f, s1, s2);                                    \
    *pdf = sm_exp_finish_##SUF(x, m, (T)0x1.9884533d43651p-2, s1, s2);                           \
    return z < 0 ? half_erfc : (T)1 - half_erfc;                                                 \
}                                                                                                \
                                                                                                 \
/* gelu(z) = z Phi(z); below zero z enters exp's factor (a subnormal result rounded once) */     \
SM_INLINE T sm_gelu_##SUF(T z) {                                                                 \
    T hi, lo, x, s1, s2;                                                                         \
    const T f = sm_half_erfc_##SUF(z, &hi, &lo), m = sm_exp_parts_##SUF(hi, lo, 1, &x, &s1, &s2);\
    const T neg = sm_exp_finish_##SUF(x, m, f * z, s1, s2);                                      \
    const T pos = z * ((T)1 - sm_exp_finish_##SUF(x, m, f, s1, s2));                             \
    return z < 0 ? neg : pos;                                                                    \
}                                                                                                \
                                                                                                 \
/* log1p(w) for w in [-1, 1] (in-place elu's z = log1p(y / alpha)): u = 1 + w = 2^k m with m     \
 * in [sqrt(1/2), sqrt 2) (exponent and mantissa from the bits), log m = 2 atanh((m-1)/(m+1)),   \
 * plus (w - (u - 1)) / u for the rounding of 1 + w; -inf at -1, NaN for NaN. */                 \
SM_INLINE T sm_log1p_##SUF(T w) {                                                                \
    const T u = (T)1 + w;                                                                        \
    U b;                                                                                         \
    memcpy(&b, &u, sizeof b);                                                                    \
    b += SM_ONE_##SUF - SM_SQRTH_##SUF;          /* the exponent of u / sqrt(1/2) */             \
    U e = (b >> SM_MBITS_##SUF) | SM_I2F_##SUF, mb = (b & SM_MANT_##SUF) + SM_SQRTH_##SUF;       \
    T kf, m;                                                                                     \
    memcpy(&kf, &e, sizeof kf);                                                                  \
    memcpy(&m, &mb, sizeof m);                                                                   \
    kf = (kf - SM_TWO52_##SUF) - SM_BIAS_##SUF;                                                  \
    const T f = m - (T)1, s = f / ((T)2 + f), s2 = s * s;                                        \
    T p;                                                                                         \
    SM_POLY(T, FMA, sm_atanh_##SUF, s2, p);                                                      \
    const T c = (w - (u - (T)1)) / u;                                                            \
    const T lg = FMA(kf, SM_LN2HI_##SUF, FMA(kf, SM_LN2LO_##SUF, c) + FMA((T)2 * s * s2, p, (T)2 * s)); \
    return u > 0 ? lg : (w == w ? -(T)INFINITY : w);                                             \
}                                                                                                \
                                                                                                 \
/* The activations (kind: ACT_*, a constant where inlined) and their derivatives. */             \
SM_INLINE T sm_act_##SUF(const int kind, T z, T al) {                                            \
    if (kind == ACT_ELU) return !(z <= 0) ? z : al * sm_expm1_##SUF(z);                          \
    if (kind == ACT_SILU) return z / ((T)1 + sm_exp_##SUF(-z));                                  \
    if (kind == ACT_GELU) {                                                                      \
        const T y = sm_gelu_##SUF(z);                                                            \
        return SM_GELU_INF_NAN_##SUF && z == (T)INFINITY ? z - z : y;                            \
    }                                                                                            \
    /* ACT_GELU_TANH: z (1 + tanh u) / 2 = z / (1 + exp(-2u)), u = sqrt(2/pi) (z + 0.044715 z^3) */ \
    const T u = (T)0x1.9884533d43651p-1 * FMA((T)0.044715 * z, z * z, z);                        \
    return z / ((T)1 + sm_exp_##SUF((T)-2 * u));                                                 \
}                                                                                                \
                                                                                                 \
SM_INLINE T sm_grad_##SUF(const int kind, T z, T al) {                                           \
    if (kind == ACT_ELU) return z > 0 ? (T)1 : al * sm_exp_##SUF(z);   /* NaN: NaN */            \
    if (kind == ACT_SILU) {                                                                      \
        const T s = (T)1 / ((T)1 + sm_exp_##SUF(-z));                                            \
        return s * ((T)1 + z * ((T)1 - s));                                                      \
    }                                                                                            \
    if (kind == ACT_GELU) {                                                                      \
        T pdf;                                                                                   \
        const T c = sm_phi_##SUF(z, &pdf);                                                       \
        return c + z * pdf;                                                                      \
    }                                                                                            \
    const T zz = z * z, u = (T)0x1.9884533d43651p-1 * FMA((T)0.044715 * z, zz, z);               \
    const T s = (T)1 / ((T)1 + sm_exp_##SUF((T)-2 * u));                                         \
    return s + (T)2 * z * s * ((T)1 - s) * (T)0x1.9884533d43651p-1 * FMA((T)(3 * 0.044715), zz, (T)1); \
}

DEFINE_SMOOTH(float, f32, uint32_t, fmaf)
DEFINE_SMOOTH(double, f64, uint64_t, fma)

/* ---------------------------------------------------------------------------------------
 * BN + an activation, after an optional residual add (batchnorm.act). The activation is
 * `act` (ACT_* above): piecewise linear, act(z) = z for z > 0, slope * z otherwise
 * (identity: slope 1; leaky ReLU; ReLU: slope 0, where act(z) is 0 for z <= 0 and NaN stays
 * NaN, as torch.relu; its derivative is 0 there, so a NaN gradient is not spread where ReLU
 * cut it off, as torch's threshold_backward), or a smooth one (elu with alpha, silu, gelu
 * with erf or tanh), computed by the functions of the section above with torch's NaN and
 * Inf results.
 *   act_fwd   reads x (and r), writes y = act(z) with z = fma(a[c], x, b[c]) (+ r), and
 *             where asked (piecewise linear) the bytes mask = (z > 0); y may be x itself (the
 *             in-place mode: piecewise linear or elu)
 *   act_sums  reads dy and v (and the mask or r) -> sum dz and sum dz * (u - mu[c]) per
 *             channel, dz = dy * act'(z)
 *   act_dx    reads the same -> dx = al[c] * dz + be[c] * u + ga[c], and dz itself (the
 *             residual's gradient) where asked
 * v is what the forward saved. Out of place it is x, and u = x; act'(z) is recomputed from
 * x (z = fma(a, x, b) is one rounding in both directions, the same value from a vector or a
 * scalar instruction, so the backward finds the forward's z exactly), and where a residual
 * was added, from the forward's mask (piecewise linear: a byte per value, cheaper than
 * reading the residual again twice) or from x and r (smooth: z = fma(a, x, b) + r, again
 * the forward's value exactly; the caller keeps r). In place (output != 0; slope > 0, or
 * elu with alpha > 0) v is the output y, whose sign is z's, and u = z - r = act^-1(y) - r
 * (In-Place ABN: the normalized value is recovered from the output, x having been
 * overwritten; for elu z = log1p(y / alpha) and act'(z) = y + alpha where y <= 0).
 * ------------------------------------------------------------------------------------- */
struct bn_act_fwd_args {
    const void *x, *r;         /* r: laid out like x, or NULL */
    void *y;                   /* laid out like x; or x itself */
    void *mask;                /* uint8 laid out like x, or NULL: not written */
    const void *scale, *shift; /* a, b: c each */
    int64_t n, c, s;
    double slope, act_alpha;   /* piecewise linear's slope; elu's alpha */
    int32_t act, cl, nt;       /* act: ACT_* */
};

struct bn_act_sums_args {
    const void *dy, *v;        /* dy laid out like v */
    const void *mask;          /* out of place: the forward's mask, or NULL (sign from x) */
    const void *r;             /* the residual (in place; smooth out of place), or NULL */
    const void *scale, *shift; /* out of place: the forward's a, b */
    const void *mu;            /* the centre of the second sum */
    void *sum_dz, *sum_dzu;    /* out: c doubles each */
    void *dz;                  /* out: dz laid out like v; required for a smooth act out of place
                                * (whose dx then takes bn_dx), NULL otherwise */
    int64_t n, c, s;
    double slope, act_alpha;
    int32_t act, output, cl, nt; /* output: v is the in-place output */
};

struct bn_act_dx_args {
    const void *dy, *v, *mask, *r; /* as bn_act_sums_args' */
    const void *scale, *shift;
    const void *alpha, *beta, *gamma; /* the coefficients of dz, u and 1 */
    void *dx, *dz;             /* out (laid out like v): either may be NULL */
    int64_t n, c, s;
    double slope, act_alpha;
    int32_t act, output, cl, nt;
};

/* BN's training forward with the activation, in one call: the statistics pass, then per
 * channel (as bn_train_fwd: in double) the statistics rows and the forward's coefficients
 * a = gamma * invstd, b = beta - mu * a, then bn_act_fwd's pass with them. */
struct bn_act_train_fwd_args {
    const void *x, *r;         /* as bn_act_fwd_args' */
    void *y, *mask;
    const void *weight, *bias; /* or NULL (1 and 0) */
    void *stats;               /* out: mean, invstd, var_scale * biased variance (c each) */
    void *coef;                /* out: a then b (c each), the backward's scale and shift */
    const struct bn_lerp_args *update; /* as bn_train_fwd_args' */
    int64_t n, c, s;
    double eps, var_scale, slope, act_alpha;
    int32_t act, cl, nt;
};

/* The backward of bn_act_train_fwd (out of place, the batch's statistics), in one call:
 * bn_act_sums' pass, then per channel (in double) dweight, dbias and dx's coefficients (Section
 * 3: al = k, be = -k invstd^2 sum dz (x - mu) / m, ga = -be mu - k sum dz / m, k = gamma
 * invstd), then the dx pass: bn_act_dx's for the piecewise-linear acts (dz too where asked),
 * bn_dx's over the dz that bn_act_sums wrote for the smooth ones. */
struct bn_act_train_bwd_args {
    const void *dy, *x;        /* dy laid out like x */
    const void *mask, *r;      /* as bn_act_sums_args' out of place */
    const void *coef;          /* the forward's a then b (c each) */
    const void *stats;         /* the forward's rows mean, invstd (a third is not read) */
    const void *weight;        /* or NULL */
    void *dx;                  /* out, or NULL: not needed */
    void *dz;                  /* out: dy * act'(z), laid out like x; required for a smooth act,
                                * else NULL where not needed */
    void *dweight, *dbias;     /* out (c each), or NULL */
    int64_t n, c, s;
    double slope, act_alpha;
    int32_t act, cl, nt;
};

#define ACT_FLUSH 1024  /* values per float lane before it is added into a double */

/* What the backward kernels take: a known act; in place (output) only the invertible ones
 * (piecewise linear, elu); a smooth act out of place only in act_sums, with dz written (its dx
 * is then bn_dx's dx = al * dz + be * x + ga: act'(z), the costly part, once per backward). */
static inline int act_args_ok(int act, int output, int has_dz, int sums) {
    if (act < ACT_LINEAR || act > ACT_GELU_TANH) return 0;
    if (act == ACT_LINEAR) return !has_dz;
    if (output) return act == ACT_ELU && !has_dz;
    return sums && has_dz;
}

/* d = dz and u of value i of the piecewise-linear kind inside a span whose variables are g, v,
 * m, r, a, b, vec, sl, isl, zero and the constants output, has_m, has_r (the smooth kinds go
 * through the chunk functions of DEFINE_ACT instead). */
#define ACT_VALUE(T, SUF, FMA, i)                                                                \
    const T vi = v[i];                                                                           \
    const int pos = output ? vi > 0                                                              \
                  : has_m ? m[i] != 0 : FMA(vec ? a[i] : a[0], vi, vec ? b[i] : b[0]) > 0;       \
    const T d = pos ? g[i] : (zero ? (T)0 : sl * g[i]);                                          \
    T u = output ? (pos ? vi : vi * isl) : vi;                                                   \
    if (output && has_r) u -= r[i];

/* act_dx's span instances by what is read (output, mask, residual) and written (dx, dz),
 * inside act_dx_task (its variables); K: the activation (a constant). */
#define ACT_DX_OUT(SUF, VEC, Z, O, M, R)                                                         \
    if (dx && dz) act_dx_span_##SUF(g, v, m, r, dx, dz, n, a, b, al, be, ga, VEC, sl, isl, Z, O, M, R, 1, 1); \
    else if (dx) act_dx_span_##SUF(g, v, m, r, dx, dz, n, a, b, al, be, ga, VEC, sl, isl, Z, O, M, R, 1, 0); \
    else act_dx_span_##SUF(g, v, m, r, dx, dz, n, a, b, al, be, ga, VEC, sl, isl, Z, O, M, R, 0, 1);
#define ACT_DX_LINEAR(SUF, VEC)                                                                  \
    if (output && r) { ACT_DX_OUT(SUF, VEC, 0, 1, 0, 1) }                                        \
    else if (output) { ACT_DX_OUT(SUF, VEC, 0, 1, 0, 0) }                                        \
    else if (m && zero) { ACT_DX_OUT(SUF, VEC, 1, 0, 1, 0) }                                     \
    else if (m) { ACT_DX_OUT(SUF, VEC, 0, 0, 1, 0) }                                             \
    else if (zero) { ACT_DX_OUT(SUF, VEC, 1, 0, 0, 0) }                                          \
    else { ACT_DX_OUT(SUF, VEC, 0, 0, 0, 0) }

/* act_sums' span (rows) or row (channels-innermost) instances, inside act_sums_any. */
#define ACT_SUMS_CALL(SUF, Z, O, M, R)                                                           \
    if (rows) act_sums_span_##SUF(g, v, m, r, n, a, b, mu[0], sl, isl, Z, l1, l2, O, M, R);      \
    else act_sums_row_##SUF(g, v, m, r, n, a, b, mu, sl, isl, Z, l1, l2, O, M, R);
#define SM_CHUNK 256  /* values per chunk (smooth kinds; streamed outputs): a multiple of every L */

/* The act kernels stream a large output (as the plain kernels, from STREAM_MIN bytes) where
 * the build has AVX: each chunk is computed into a buffer in L1, then copied out with
 * non-temporal stores (no read for ownership of the output's lines), the partial lines at
 * either end with ordinary ones; chunks start on a 64-byte line of the output after the
 * first. Without AVX the outputs are written in place, never streamed. */
#if defined(__AVX512F__) || defined(__AVX__)
#define ACT_STREAMS 1
#else
#define ACT_STREAMS 0
#endif
static inline void stream_copy(void *dst, const void *src, size_t n) {
    char *d = (char *)dst;
    const char *s = (const char *)src;
#if ACT_STREAMS
    size_t head = (64 - ((uintptr_t)d & 63)) & 63;
    if (head > n) head = n;
    memcpy(d, s, head);
    d += head; s += head; n -= head;
    for (; n >= 64; n -= 64, d += 64, s += 64) {
#if defined(__AVX512F__)
        _mm512_stream_si512((__m512i *)d, _mm512_loadu_si512((const void *)s));
#else
        _mm256_stream_si256((__m256i *)d, _mm256_loadu_si256((const __m256i *)s));
        _mm256_stream_si256((__m256i *)(d + 32), _mm256_loadu_si256((const __m256i *)(s + 32)));
#endif
    }
#endif
    memcpy(d, s, n);
}

/* Channels-innermost gradient sums of the piecewise-linear kind out of place without a mask
 * (the sign recomputed as fma(A[c], x, B[c]) > 0), float, AVX-512: rows [0, rows) of C
 * values added into the per-channel float accumulators b1, b2, four rows at a time, their
 * accumulators held in registers across the four (the generic row loop loads and stores
 * them once per row, in 8-lane vectors). Each row's values are added in the same order as
 * there, with a separate multiply and add (this file is built without contraction), so the
 * sums are those of the generic loop. Returns 0 (not handled) without AVX-512. */
#if defined(__AVX512F__)
static inline __attribute__((always_inline)) void act_cl_sums16(
        const float *g, const float *v, int64_t C, int nr, const float *A, const float *B, const float *mu,
        __m512 slv, const int zero, float *b1, float *b2, const int last, __mmask16 tail) {
    const __m512 a = ld_row(A, last, tail), b = ld_row(B, last, tail), m = ld_row(mu, last, tail);
    __m512 s1 = ld_row(b1, last, tail), s2 = ld_row(b2, last, tail);
    for (int i = 0; i < nr; i++) {
        const __m512 x = ld_row(v + i * C, last, tail), gv = ld_row(g + i * C, last, tail);
        const __mmask16 pos = _mm512_cmp_ps_mask(_mm512_fmadd_ps(a, x, b), _mm512_setzero_ps(), _CMP_GT_OQ);
        const __m512 d = zero ? _mm512_maskz_mov_ps(pos, gv) : _mm512_mask_mov_ps(_mm512_mul_ps(slv, gv), pos, gv);
        s1 = _mm512_add_ps(s1, d);
        s2 = _mm512_add_ps(s2, _mm512_mul_ps(d, _mm512_sub_ps(x, m)));
    }
    if (last) {
        _mm512_mask_storeu_ps(b1, tail, s1);
        _mm512_mask_storeu_ps(b2, tail, s2);
    } else {
        _mm512_storeu_ps(b1, s1);
        _mm512_storeu_ps(b2, s2);
    }
}
static inline __attribute__((always_inline)) void act_cl_sums_rows(
        const float *g, const float *v, int64_t C, int nr, const float *A, const float *B, const float *mu,
        __m512 slv, const int zero, float *b1, float *b2, __mmask16 tail) {
    int64_t c = 0;
    for (; c + 16 <= C; c += 16)
        act_cl_sums16(g + c, v + c, C, nr, A + c, B + c, mu + c, slv, zero, b1 + c, b2 + c, 0, tail);
    if (c < C) act_cl_sums16(g + c, v + c, C, nr, A + c, B + c, mu + c, slv, zero, b1 + c, b2 + c, 1, tail);
}
#endif
static int act_cl_sums_fast_f32(const float *g, const float *v, int64_t C, int64_t rows, const float *A,
                                const float *B, const float *mu, float sl, int zero, float *b1, float *b2) {
#if defined(__AVX512F__)
    const __m512 slv = _mm512_set1_ps(sl);
    const __mmask16 tail = (__mmask16)((1u << (C % 16)) - 1u);
    int64_t r = 0;
    if (zero) {
        for (; r + 4 <= rows; r += 4) act_cl_sums_rows(g + r * C, v + r * C, C, 4, A, B, mu, slv, 1, b1, b2, tail);
        for (; r < rows; r++) act_cl_sums_rows(g + r * C, v + r * C, C, 1, A, B, mu, slv, 1, b1, b2, tail);
    } else {
        for (; r + 4 <= rows; r += 4) act_cl_sums_rows(g + r * C, v + r * C, C, 4, A, B, mu, slv, 0, b1, b2, tail);
        for (; r < rows; r++) act_cl_sums_rows(g + r * C, v + r * C, C, 1, A, B, mu, slv, 0, b1, b2, tail);
    }
    return 1;
#else
    (void)g; (void)v; (void)C; (void)rows; (void)A; (void)B; (void)mu; (void)sl; (void)zero; (void)b1; (void)b2;
    return 0;
#endif
}
/* The same activation's dx = al[c] * d + be[c] * x + ga[c] (d = dy where fma(A[c], x, B[c]) >
 * 0, else slope * dy) over n values of one row from channel 0 of the pointers given, float,
 * AVX-512, 16 lanes (the generic loop takes 8), the same operations in the same order. */
#if defined(__AVX512F__)
static inline __attribute__((always_inline)) void act_cl_dx16(
        const float *g, const float *v, float *dx, const float *A, const float *B, const float *al,
        const float *be, const float *ga, __m512 slv, const int zero, const int last, __mmask16 tail) {
    const __m512 x = ld_row(v, last, tail), gv = ld_row(g, last, tail);
    const __mmask16 pos = _mm512_cmp_ps_mask(_mm512_fmadd_ps(ld_row(A, last, tail), x, ld_row(B, last, tail)),
                                             _mm512_setzero_ps(), _CMP_GT_OQ);
    const __m512 d = zero ? _mm512_maskz_mov_ps(pos, gv) : _mm512_mask_mov_ps(_mm512_mul_ps(slv, gv), pos, gv);
    const __m512 o = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(ld_row(al, last, tail), d),
                                                 _mm512_mul_ps(ld_row(be, last, tail), x)), ld_row(ga, last, tail));
    if (last) _mm512_mask_storeu_ps(dx, tail, o);
    else _mm512_storeu_ps(dx, o);
}
static inline __attribute__((always_inline)) void act_cl_dx_run(
        const float *g, const float *v, float *dx, int64_t n, const float *A, const float *B, const float *al,
        const float *be, const float *ga, __m512 slv, const int zero) {
    int64_t c = 0;
    for (; c + 16 <= n; c += 16)
        act_cl_dx16(g + c, v + c, dx + c, A + c, B + c, al + c, be + c, ga + c, slv, zero, 0, 0);
    if (c < n)
        act_cl_dx16(g + c, v + c, dx + c, A + c, B + c, al + c, be + c, ga + c, slv, zero, 1,
                    (__mmask16)((1u << (n - c)) - 1u));
}
#endif
static int act_cl_dx_fast_f32(const float *g, const float *v, float *dx, int64_t n, const float *A, const float *B,
                              const float *al, const float *be, const float *ga, float sl, int zero) {
#if defined(__AVX512F__)
    if (zero) act_cl_dx_run(g, v, dx, n, A, B, al, be, ga, _mm512_set1_ps(sl), 1);
    else act_cl_dx_run(g, v, dx, n, A, B, al, be, ga, _mm512_set1_ps(sl), 0);
    return 1;
#else
    (void)g; (void)v; (void)dx; (void)n; (void)A; (void)B; (void)al; (void)be; (void)ga; (void)sl; (void)zero;
    return 0;
#endif
}
static int act_cl_dx_fast_f64(const double *g, const double *v, double *dx, int64_t n, const double *A,
                              const double *B, const double *al, const double *be, const double *ga, double sl,
                              int zero) {
    (void)g; (void)v; (void)dx; (void)n; (void)A; (void)B; (void)al; (void)be; (void)ga; (void)sl; (void)zero;
    return 0;
}
static int act_cl_sums_fast_f64(const double *g, const double *v, int64_t C, int64_t rows, const double *A,
                                const double *B, const double *mu, double sl, int zero, double *b1, double *b2) {
    (void)g; (void)v; (void)C; (void)rows; (void)A; (void)B; (void)mu; (void)sl; (void)zero; (void)b1; (void)b2;
    return 0;
}

/* values of T from o to the next 64-byte line, for a chunk of at most SM_CHUNK (0 unless
 * streamed: SM_CHUNK * sizeof(T) is a whole number of lines) */
#define ACT_CHUNK(T, o, stream) (SM_CHUNK - ((stream) ? (int64_t)(((uintptr_t)(o) & 63) / sizeof(T)) : 0))
/* sm_chunk's two loops for the smooth kind K (act(z), and g * act'(z)) */
#define SM_CHUNK_CASES(SUF, K)                                                                   \
    case 2 * K:                                                                                  \
        _Pragma("omp simd")                                                                      \
        for (int64_t i = 0; i < n; i++) y[i] = sm_act_##SUF(K, z[i], al);                        \
        break;                                                                                   \
    case 2 * K + 1:                                                                              \
        _Pragma("omp simd")                                                                      \
        for (int64_t i = 0; i < n; i++) y[i] = g[i] * sm_grad_##SUF(K, z[i], al);                \
        break;

#define DEFINE_ACT(T, SUF, FMA, L)                                                               \
                                                                                                 \
/* z -> act(z) for the piecewise-linear kind: slope sl, zero (a constant) for ReLU. */           \
SM_INLINE T act_apply_##SUF(T z, T sl, const int zero) {                                         \
    return !(z <= 0) ? z : (zero ? (T)0 : sl * z);                                               \
}                                                                                                \
                                                                                                 \
/* The smooth kinds, a chunk of at most SM_CHUNK values at a time: z into a buffer (the same     \
 * fma and add as everywhere, so that forward and backward find the same z), then act(z) or      \
 * act'(z) over the chunk in one vectorized loop per kind. The costly polynomials so exist once  \
 * per kind, not once per layout, residual and in-place variant of every loop that reads z.      \
 * A chunk is a flat range of values, [e0, e0 + k) of a tensor whose value e has channel e % C   \
 * (cl) or (e / S) % C: it holds whole or partial runs of one channel, so that short rows (a     \
 * channels-last row of 64 values, a 7 x 7 plane) share one chunk. */                            \
static inline int64_t sm_run_##SUF(int64_t e, int64_t left, const int cl, int64_t C, int64_t S,  \
                                   int64_t *c) {                                                 \
    int64_t seg;                                                                                 \
    if (cl) { *c = e % C; seg = C - *c; }                                                        \
    else { *c = (e / S) % C; seg = S - e % S; }                                                  \
    return seg < left ? seg : left;                                                              \
}                                                                                                \
                                                                                                 \
/* z = fma(A[c], x, B[c]) (+ r) over values [e0, e0 + k); x, r, z start at e0 */                 \
static inline void sm_z_##SUF(const T *restrict x, const T *restrict r, const T *restrict A,     \
        const T *restrict B, int64_t e0, int64_t k, const int cl, int64_t C, int64_t S,          \
        T *restrict z) {                                                                         \
    for (int64_t i = 0, c = 0, seg; i < k; i += seg) {                                           \
        seg = sm_run_##SUF(e0 + i, k - i, cl, C, S, &c);                                         \
        if (cl) {                                                                                \
            _Pragma("omp simd")                                                                  \
            for (int64_t j = 0; j < seg; j++) z[i + j] = FMA(A[c + j], x[i + j], B[c + j]);      \
        } else {                                                                                 \
            const T a0 = A[c], b0 = B[c];                                                        \
            _Pragma("omp simd")                                                                  \
            for (int64_t j = 0; j < seg; j++) z[i + j] = FMA(a0, x[i + j], b0);                  \
        }                                                                                        \
    }                                                                                            \
    if (r) {                                                                                     \
        _Pragma("omp simd")                                                                      \
        for (int64_t i = 0; i < k; i++) z[i] += r[i];                                            \
    }                                                                                            \
}                                                                                                \
                                                                                                 \
/* y = act(z) (grad 0) or y = g * act'(z) (grad 1) over one chunk, kind smooth */                \
static __attribute__((noinline)) void sm_chunk_##SUF(const int kind, const int grad,             \
        const T *restrict z, const T *restrict g, T *restrict y, int64_t n, T al) {              \
    switch (kind * 2 + grad) {                                                                   \
    SM_CHUNK_CASES(SUF, ACT_ELU) SM_CHUNK_CASES(SUF, ACT_SILU) SM_CHUNK_CASES(SUF, ACT_GELU)     \
    SM_CHUNK_CASES(SUF, ACT_GELU_TANH)                                                           \
    default: break;                                                                              \
    }                                                                                            \
}                                                                                                \
                                                                                                 \
/* elu in place: u = act^-1(y) = log1p(y / alpha) where y <= 0 (isl = 1 / alpha), else y */      \
static __attribute__((noinline)) void sm_unelu_##SUF(const T *restrict y, T *restrict u,         \
                                                     int64_t n, T isl) {                         \
    _Pragma("omp simd")                                                                          \
    for (int64_t i = 0; i < n; i++) u[i] = y[i] > 0 ? y[i] : sm_log1p_##SUF(y[i] * isl);         \
}                                                                                                \
                                                                                                 \
/* One span of n values; per-channel a, b either one value (vec 0) or n of them (vec 1). */      \
static inline __attribute__((always_inline)) void act_fwd_span_##SUF(                            \
        const T *restrict x, const T *restrict r, T *restrict y, uint8_t *restrict m, int64_t n, \
        const T *restrict a, const T *restrict b, const int vec, T sl, const int zero,           \
        const int has_r, const int has_m) {                                                      \
    _Pragma("omp simd")                                                                          \
    for (int64_t i = 0; i < n; i++) {                                                            \
        T z = FMA(vec ? a[i] : a[0], x[i], vec ? b[i] : b[0]);                                   \
        if (has_r) z += r[i];                                                                    \
        y[i] = act_apply_##SUF(z, sl, zero);                                                     \
        if (has_m) m[i] = z > 0;                                                                 \
    }                                                                                            \
}                                                                                                \
                                                                                                 \
/* The same with y written over x (one pointer: no aliasing for the compiler to fear). */        \
static inline __attribute__((always_inline)) void act_fwd_inplace_span_##SUF(                    \
        T *restrict xy, const T *restrict r, int64_t n, const T *restrict a, const T *restrict b, \
        const int vec, T sl, const int zero, const int has_r) {                                  \
    _Pragma("omp simd")                                                                          \
    for (int64_t i = 0; i < n; i++) {                                                            \
        T z = FMA(vec ? a[i] : a[0], xy[i], vec ? b[i] : b[0]);                                  \
        if (has_r) z += r[i];                                                                    \
        xy[i] = act_apply_##SUF(z, sl, zero);                                                    \
    }                                                                                            \
}                                                                                                \
                                                                                                 \
/* The piecewise-linear kind: with or without masks and a residual, or in place. */              \
static inline __attribute__((always_inline)) void act_fwd_sel_##SUF(                             \
        const T *x, const T *r, T *y, uint8_t *m, int64_t n, const T *a, const T *b, const int vec, \
        T sl, const int zero) {                                                                  \
    if (y == x) {                                                                                \
        if (r) act_fwd_inplace_span_##SUF(y, r, n, a, b, vec, sl, zero, 1);                      \
        else act_fwd_inplace_span_##SUF(y, r, n, a, b, vec, sl, zero, 0);                        \
    }                                                                                            \
    else if (r && m) act_fwd_span_##SUF(x, r, y, m, n, a, b, vec, sl, zero, 1, 1);               \
    else if (r) act_fwd_span_##SUF(x, r, y, m, n, a, b, vec, sl, zero, 1, 0);                    \
    else if (m) act_fwd_span_##SUF(x, r, y, m, n, a, b, vec, sl, zero, 0, 1);                    \
    else act_fwd_span_##SUF(x, r, y, m, n, a, b, vec, sl, zero, 0, 0);                           \
}                                                                                                \
                                                                                                 \
/* the piecewise-linear kind with zero (ReLU) a constant of each instance: branch-free selects */\
static inline __attribute__((always_inline)) void act_fwd_any_##SUF(                             \
        const T *x, const T *r, T *y, uint8_t *m, int64_t n, const T *a, const T *b, const int vec, \
        T sl, int zero) {                                                                        \
    if (zero) act_fwd_sel_##SUF(x, r, y, m, n, a, b, vec, sl, 1);                                \
    else act_fwd_sel_##SUF(x, r, y, m, n, a, b, vec, sl, 0);                                     \
}                                                                                                \
                                                                                                 \
/* elu in place over one chunk of the output y: u = act^-1(y) - r, d = dy * act'(z) =            \
 * dy * (y > 0 ? 1 : y + alpha) */                                                               \
static inline void sm_elu_back_##SUF(const T *restrict y, const T *restrict g,                   \
        const T *restrict r, T *restrict u, T *restrict d, int64_t k, T isl, T alpha) {          \
    sm_unelu_##SUF(y, u, k, isl);                                                                \
    _Pragma("omp simd")                                                                          \
    for (int64_t i = 0; i < k; i++) {                                                            \
        d[i] = g[i] * (y[i] > 0 ? (T)1 : y[i] + alpha);                                          \
        if (r) u[i] -= r[i];                                                                     \
    }                                                                                            \
}                                                                                                \
/* y = act(fma(A[c], x, B[c]) (+ r)) (and the mask, piecewise-linear kind) over values           \
 * [e0, e0 + n), a run of one channel at a time: in chunks, streamed out or written in place     \
 * (smooth kinds), or directly; y may be x (each chunk of x is read before y is written; an      \
 * unstreamed piecewise-linear run reads each x[i] before writing y[i]). */                      \
static void act_fwd_flat_##SUF(const T *x, const T *r, T *y, uint8_t *m, const T *A, const T *B, \
        int64_t e0, int64_t n, const int cl, int64_t C, int64_t S, const int kind, T sl,         \
        const int zero, T al, const int stream) {                                                \
    T z[SM_CHUNK], buf[SM_CHUNK];                                                                \
    for (int64_t k0 = e0, k; k0 < e0 + n; k0 += k) {                                             \
        /* unstreamed, the piecewise-linear kind takes the whole range (its runs are rows) */    \
        k = stream || kind != ACT_LINEAR ? ACT_CHUNK(T, y + k0, stream) : e0 + n - k0;           \
        if (k > e0 + n - k0) k = e0 + n - k0;                                                    \
        T *o = stream ? buf : y + k0;                                                            \
        if (kind != ACT_LINEAR) {                                                                \
            sm_z_##SUF(x + k0, r ? r + k0 : NULL, A, B, k0, k, cl, C, S, z);                     \
            sm_chunk_##SUF(kind, 0, z, NULL, o, k, al);                                          \
        } else {                                                                                 \
            for (int64_t i = 0, c = 0, seg; i < k; i += seg) {                                   \
                seg = sm_run_##SUF(k0 + i, k - i, cl, C, S, &c);                                 \
                const int64_t e = k0 + i;                                                        \
                if (cl)                                                                          \
                    act_fwd_any_##SUF(x + e, r ? r + e : NULL, o + i, m ? m + e : NULL, seg,     \
                                      A + c, B + c, 1, sl, zero);                                \
                else                                                                             \
                    act_fwd_any_##SUF(x + e, r ? r + e : NULL, o + i, m ? m + e : NULL, seg,     \
                                      A + c, B + c, 0, sl, zero);                                \
            }                                                                                    \
        }                                                                                        \
        if (stream) stream_copy(y + k0, o, (size_t)k * sizeof(T));                               \
    }                                                                                            \
}                                                                                                \
static void act_fwd_task_##SUF(void *p, int t, int nt) {                                         \
    const struct bn_act_fwd_args *a = (const struct bn_act_fwd_args *)p;                         \
    const T *x = (const T *)a->x, *r = (const T *)a->r, *A = (const T *)a->scale;                \
    const T *B = (const T *)a->shift;                                                            \
    T *y = (T *)a->y;                                                                            \
    uint8_t *m = (uint8_t *)a->mask;                                                             \
    const T sl = (T)a->slope, al = (T)a->act_alpha;                                              \
    const int zero = a->slope == 0.0, kind = a->act;                                             \
    const int64_t C = a->c, S = a->s, L_ = a->cl ? C : S;                                        \
    int64_t lo, hi;                                                                              \
    split(a->n * (a->cl ? S : C), t, nt, &lo, &hi);                                              \
    const int stream = ACT_STREAMS && stream_ok_##SUF(a->n, C, S);                               \
    act_fwd_flat_##SUF(x, r, y, m, A, B, lo * L_, (hi - lo) * L_, a->cl, C, S, kind, sl, zero,   \
                       al, stream);                                                              \
    fence(stream);                                                                               \
}                                                                                                \
                                                                                                 \
/* Rows: one span of n values of one channel into lane accumulators l1, l2 (L each), which       \
 * persist across the channel's rows (short rows cost no horizontal sums). */                    \
static inline __attribute__((always_inline)) void act_sums_span_##SUF(                           \
        const T *restrict g, const T *restrict v, const uint8_t *restrict m, const T *restrict r, \
        int64_t n, const T *restrict a, const T *restrict b, T mu, T sl, T isl, const int zero,  \
        T *restrict l1, T *restrict l2, const int output, const int has_m, const int has_r) {    \
    const int vec = 0;                                                                           \
    int64_t i = 0;                                                                               \
    if (has_m) {                                                                                 \
        /* gcc leaves the lane loop scalar when it reads the byte mask (6x slower): the mask     \
         * first becomes values of T in a buffer, a chunk at a time (out of place, no residual:  \
         * u = v) */                                                                             \
        T mf[SM_CHUNK];                                                                          \
        for (int64_t k0 = 0; k0 < n; k0 += SM_CHUNK) {                                           \
            const int64_t k = n - k0 < SM_CHUNK ? n - k0 : SM_CHUNK;                             \
            const T *gk = g + k0, *vk = v + k0;                                                  \
            _Pragma("omp simd")                                                                  \
            for (int64_t j = 0; j < k; j++) mf[j] = m[k0 + j] ? (T)1 : (T)0;                     \
            int64_t j = 0;                                                                       \
            for (; j + L <= k; j += L) {                                                         \
                _Pragma("omp simd")                                                              \
                for (int l = 0; l < L; l++) {                                                    \
                    const T d = mf[j + l] != 0 ? gk[j + l] : (zero ? (T)0 : sl * gk[j + l]);     \
                    l1[l] += d;                                                                  \
                    l2[l] += d * (vk[j + l] - mu);                                               \
                }                                                                                \
            }                                                                                    \
            for (int l = 0; j < k; j++, l++) {                                                   \
                const T d = mf[j] != 0 ? gk[j] : (zero ? (T)0 : sl * gk[j]);                     \
                l1[l] += d;                                                                      \
                l2[l] += d * (vk[j] - mu);                                                       \
            }                                                                                    \
        }                                                                                        \
        return;                                                                                  \
    }                                                                                            \
    for (; i + L <= n; i += L) {                                                                 \
        _Pragma("omp simd")                                                                      \
        for (int l = 0; l < L; l++) {                                                            \
            ACT_VALUE(T, SUF, FMA, i + l)                                                        \
            l1[l] += d;                                                                          \
            l2[l] += d * (u - mu);                                                               \
        }                                                                                        \
    }                                                                                            \
    for (int l = 0; i < n; i++, l++) {                                                           \
        ACT_VALUE(T, SUF, FMA, i)                                                                \
        l1[l] += d;                                                                              \
        l2[l] += d * (u - mu);                                                                   \
    }                                                                                            \
}                                                                                                \
                                                                                                 \
/* Channels-innermost: one row of C values added into float accumulators b1, b2. */              \
static inline __attribute__((always_inline)) void act_sums_row_##SUF(                            \
        const T *restrict g, const T *restrict v, const uint8_t *restrict m, const T *restrict r, \
        int64_t C, const T *restrict a, const T *restrict b, const T *restrict mu, T sl, T isl,  \
        const int zero, T *restrict b1, T *restrict b2, const int output, const int has_m,       \
        const int has_r) {                                                                       \
    const int vec = 1;                                                                           \
    _Pragma("omp simd")                                                                          \
    for (int64_t i = 0; i < C; i++) {                                                            \
        ACT_VALUE(T, SUF, FMA, i)                                                                \
        b1[i] += d;                                                                              \
        b2[i] += d * (u - mu[i]);                                                                \
    }                                                                                            \
}                                                                                                \
                                                                                                 \
/* act_sums for a smooth kind over n values: one span of one channel (cl 0: lane accumulators    \
 * l1, l2 of L values each, A, B, mu that channel's), or whole rows of C channels (cl 1: the     \
 * per-channel accumulators l1, l2, A, B and mu). Out of place d = dy * act'(z) (into dz, when   \
 * given) and u = x; in place (elu) d = dy * (y > 0 ? 1 : y + alpha), u = act^-1(y) - r. */      \
static void act_sums_smooth_##SUF(const T *g, const T *v, const T *r, int64_t n, const T *A,     \
        const T *B, const T *mu, T isl, T al, const int output, const int kind, T *restrict l1,  \
        T *restrict l2, T *dz, const int cl, int64_t C) {                                        \
    T z[SM_CHUNK], db[SM_CHUNK];                                                                 \
    for (int64_t k0 = 0; k0 < n; k0 += SM_CHUNK) {                                               \
        const int64_t k = n - k0 < SM_CHUNK ? n - k0 : SM_CHUNK;                                 \
        const T *gk = g + k0, *vk = v + k0, *u = vk;                                             \
        T *d = dz ? dz + k0 : db;                                                                \
        if (output) {                                                                            \
            sm_elu_back_##SUF(vk, gk, r ? r + k0 : NULL, z, d, k, isl, al);                      \
            u = z;                                                                               \
        } else {                                                                                 \
            sm_z_##SUF(vk, r ? r + k0 : NULL, A, B, k0, k, cl, cl ? C : 1, n, z);                \
            sm_chunk_##SUF(kind, 1, z, gk, d, k, al);                                            \
        }                                                                                        \
        if (!cl) { /* k0 is a multiple of L: lane l of the span stays lane l */                  \
            const T m0 = mu[0];                                                                  \
            int64_t i = 0;                                                                       \
            for (; i + L <= k; i += L) {                                                         \
                _Pragma("omp simd")                                                              \
                for (int l = 0; l < L; l++) {                                                    \
                    l1[l] += d[i + l];                                                           \
                    l2[l] += d[i + l] * (u[i + l] - m0);                                         \
                }                                                                                \
            }                                                                                    \
            for (int l = 0; i < k; i++, l++) {                                                   \
                l1[l] += d[i];                                                                   \
                l2[l] += d[i] * (u[i] - m0);                                                     \
            }                                                                                    \
            continue;                                                                            \
        }                                                                                        \
        for (int64_t i = 0, c = 0, seg; i < k; i += seg) {                                       \
            seg = sm_run_##SUF(k0 + i, k - i, 1, C, 1, &c);                                      \
            _Pragma("omp simd")                                                                  \
            for (int64_t j = 0; j < seg; j++) {                                                  \
                l1[c + j] += d[i + j];                                                           \
                l2[c + j] += d[i + j] * (u[i + j] - mu[c + j]);                                  \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
}                                                                                                \
/* Every instance of the two above the kernels need: kind, zero, output, has_m, has_r            \
 * constant. */                                                                                  \
static inline __attribute__((always_inline)) void act_sums_any_##SUF(                            \
        const T *g, const T *v, const uint8_t *m, const T *r, int64_t n, const T *a, const T *b, \
        const T *mu, T sl, T isl, T al, int zero, int output, int kind, T *l1, T *l2, T *dz,     \
        const int rows) {                                                                        \
    if (kind != ACT_LINEAR) {                                                                    \
        act_sums_smooth_##SUF(g, v, r, n, a, b, mu, isl, al, output, kind, l1, l2, dz, !rows,    \
                              n);                                                                \
        return;                                                                                  \
    }                                                                                            \
    {                                                                                            \
        if (output && r) { ACT_SUMS_CALL(SUF, 0, 1, 0, 1) }                                      \
        else if (output) { ACT_SUMS_CALL(SUF, 0, 1, 0, 0) }                                      \
        else if (m && zero) { ACT_SUMS_CALL(SUF, 1, 0, 1, 0) }                                   \
        else if (m) { ACT_SUMS_CALL(SUF, 0, 0, 1, 0) }                                           \
        else if (zero) { ACT_SUMS_CALL(SUF, 1, 0, 0, 0) }                                        \
        else { ACT_SUMS_CALL(SUF, 0, 0, 0, 0) }                                                  \
    }                                                                                            \
}                                                                                                \
                                                                                                 \
struct act_job_##SUF {                                                                           \
    const struct bn_act_sums_args *a;                                                            \
    double *tot;    /* channels-innermost: 2 * C doubles per thread */                           \
    T *buf;         /* channels-innermost: 2 * C values per thread */                            \
};                                                                                               \
                                                                                                 \
/* The reciprocal of the in-place activation's parameter (slope or alpha), 0 out of place. */    \
SM_INLINE T act_inverse_##SUF(int output, int kind, double slope, double alpha) {                \
    return output ? (T)(1.0 / (kind == ACT_ELU ? alpha : slope)) : (T)0;                         \
}                                                                                                \
                                                                                                 \
static void act_sums_task_##SUF(void *p, int t, int nt) {                                        \
    const struct act_job_##SUF *j = (const struct act_job_##SUF *)p;                             \
    const struct bn_act_sums_args *a = j->a;                                                     \
    const T *g = (const T *)a->dy, *v = (const T *)a->v, *r = (const T *)a->r;                   \
    const T *A = (const T *)a->scale, *B = (const T *)a->shift, *mu = (const T *)a->mu;          \
    const uint8_t *m = (const uint8_t *)a->mask;                                                 \
    T *dz = (T *)a->dz;                                                                          \
    const T sl = (T)a->slope, isl = act_inverse_##SUF(a->output, a->act, a->slope, a->act_alpha); \
    const T al = (T)a->act_alpha;                                                                \
    const int zero = a->slope == 0.0, output = a->output != 0, kind = a->act;                    \
    const int64_t N = a->n, C = a->c, S = a->s;                                                  \
    int64_t lo, hi;                                                                              \
    if (!a->cl) { /* as rows_sums_task: ROWS_IMAGES images at a time over the channels */        \
        double *s1 = (double *)a->sum_dz, *s2 = (double *)a->sum_dzu;                            \
        split(C, t, nt, &lo, &hi);                                                               \
        for (int64_t c = lo; c < hi; c++) { s1[c] = 0.0; s2[c] = 0.0; }                          \
        for (int64_t n0 = 0; n0 < N; n0 += ROWS_IMAGES) {                                        \
            const int64_t n1 = N - n0 < ROWS_IMAGES ? N : n0 + ROWS_IMAGES;                      \
            for (int64_t c = lo; c < hi; c++) {                                                  \
                double t1 = 0.0, t2 = 0.0;                                                       \
                T l1[L], l2[L];                                                                  \
                int64_t since = 0;                                                               \
                for (int l = 0; l < L; l++) { l1[l] = 0; l2[l] = 0; }                            \
                for (int64_t n = n0; n < n1; n++) {                                              \
                    const int64_t o = (n * C + c) * S;                                           \
                    act_sums_any_##SUF(g + o, v + o, m ? m + o : NULL, r ? r + o : NULL, S,      \
                                       A ? A + c : NULL, B ? B + c : NULL, mu + c, sl, isl, al,  \
                                       zero, output, kind, l1, l2, dz ? dz + o : NULL, 1);       \
                    since += S / L + 1;                                                          \
                    if (since >= ACT_FLUSH || n == n1 - 1) {                                     \
                        for (int l = 0; l < L; l++) {                                            \
                            t1 += l1[l];                                                         \
                            t2 += l2[l];                                                         \
                            l1[l] = 0;                                                           \
                            l2[l] = 0;                                                           \
                        }                                                                        \
                        since = 0;                                                               \
                    }                                                                            \
                }                                                                                \
                s1[c] += t1;                                                                     \
                s2[c] += t2;                                                                     \
            }                                                                                    \
        }                                                                                        \
        return;                                                                                  \
    }                                                                                            \
    double *t1 = j->tot + (int64_t)t * 2 * C, *t2 = t1 + C;                                      \
    T *b1 = j->buf + (int64_t)t * 2 * C, *b2 = b1 + C;                                           \
    for (int64_t c = 0; c < C; c++) { t1[c] = 0.0; t2[c] = 0.0; }                                \
    split(N * S, t, nt, &lo, &hi);                                                               \
    for (int64_t r0 = lo; r0 < hi; r0 += BLOCK) {                                                \
        const int64_t r1 = r0 + BLOCK < hi ? r0 + BLOCK : hi;                                    \
        for (int64_t c = 0; c < C; c++) { b1[c] = 0; b2[c] = 0; }                                \
        const int64_t o0 = r0 * C;                                                               \
        if (kind != ACT_LINEAR) /* the block's rows at once: short rows share a chunk */         \
            act_sums_smooth_##SUF(g + o0, v + o0, r ? r + o0 : NULL, (r1 - r0) * C, A, B, mu,    \
                                  isl, al, output, kind, b1, b2, dz ? dz + o0 : NULL, 1, C);     \
        else if (!output && !m && act_cl_sums_fast_##SUF(g + o0, v + o0, C, r1 - r0, A, B, mu,   \
                                                         sl, zero, b1, b2)) {}                   \
        else                                                                                     \
            for (int64_t row = r0; row < r1; row++) {                                            \
                const int64_t o = row * C;                                                       \
                act_sums_any_##SUF(g + o, v + o, m ? m + o : NULL, r ? r + o : NULL, C, A, B, mu,\
                                   sl, isl, al, zero, output, kind, b1, b2,                      \
                                   dz ? dz + o : NULL, 0);                                       \
            }                                                                                    \
        for (int64_t c = 0; c < C; c++) { t1[c] += (double)b1[c]; t2[c] += (double)b2[c]; }      \
    }                                                                                            \
}                                                                                                \
                                                                                                 \
/* 0, -1 (out of memory) or -2 (arguments these kernels do not take: see act_args_ok). */        \
static int act_sums_##SUF(const struct bn_act_sums_args *a) {                                    \
    if (!act_args_ok(a->act, a->output, a->dz != NULL, 1)) return -2;                            \
    struct act_job_##SUF j = {a, NULL, NULL};                                                    \
    int nt = a->nt < 1 ? 1 : (a->nt > MAX_THREADS ? MAX_THREADS : a->nt);                        \
    if (!a->cl) {                                                                                \
        run_parallel(act_sums_task_##SUF, &j, nt);                                               \
        return 0;                                                                                \
    }                                                                                            \
    const int64_t C = a->c;                                                                      \
    /* zeroed: a share the runtime did not start leaves its totals at 0 */                       \
    j.tot = (double *)calloc((size_t)(2 * nt) * C, sizeof(double));                              \
    j.buf = (T *)malloc((size_t)(2 * nt) * C * sizeof(T));                                       \
    if (!j.tot || !j.buf) { free(j.tot); free(j.buf); return -1; }                               \
    run_parallel(act_sums_task_##SUF, &j, nt);                                                   \
    double *s1 = (double *)a->sum_dz, *s2 = (double *)a->sum_dzu;                                \
    for (int64_t c = 0; c < C; c++) {                                                            \
        double u1 = 0.0, u2 = 0.0;                                                               \
        for (int k = 0; k < nt; k++) { u1 += j.tot[(int64_t)k * 2 * C + c]; u2 += j.tot[(int64_t)k * 2 * C + C + c]; } \
        s1[c] = u1;                                                                              \
        s2[c] = u2;                                                                              \
    }                                                                                            \
    free(j.tot); free(j.buf);                                                                    \
    return 0;                                                                                    \
}                                                                                                \
                                                                                                 \
static inline __attribute__((always_inline)) void act_dx_span_##SUF(                             \
        const T *restrict g, const T *restrict v, const uint8_t *restrict m, const T *restrict r, \
        T *restrict dx, T *restrict dz, int64_t n, const T *restrict a, const T *restrict b,     \
        const T *restrict al_, const T *restrict be, const T *restrict ga, const int vec, T sl,  \
        T isl, const int zero, const int output, const int has_m, const int has_r,               \
        const int has_dx, const int has_dz) {                                                    \
    _Pragma("omp simd")                                                                          \
    for (int64_t i = 0; i < n; i++) {                                                            \
        ACT_VALUE(T, SUF, FMA, i)                                                                \
        if (has_dx) dx[i] = (vec ? al_[i] : al_[0]) * d + (vec ? be[i] : be[0]) * u + (vec ? ga[i] : ga[0]); \
        if (has_dz) dz[i] = d;                                                                   \
    }                                                                                            \
}                                                                                                \
                                                                                                 \
/* act_dx for elu in place over values [e0, e0 + n) (channels as in sm_z): v is the output y,    \
 * d = dy * (y > 0 ? 1 : y + alpha) and u = act^-1(y) - r; dx = al[c] * d + be[c] * u + ga[c] */ \
static void act_dx_elu_##SUF(const T *g, const T *v, const T *r, T *dx, T *dz, int64_t e0,       \
        int64_t n, const T *al, const T *be, const T *ga, const int cl, int64_t C, int64_t S,    \
        T isl, T alpha) {                                                                        \
    T u[SM_CHUNK], d[SM_CHUNK];                                                                  \
    for (int64_t k0 = e0; k0 < e0 + n; k0 += SM_CHUNK) {                                         \
        const int64_t k = e0 + n - k0 < SM_CHUNK ? e0 + n - k0 : SM_CHUNK;                       \
        const T *gk = g + k0, *vk = v + k0;                                                      \
        sm_elu_back_##SUF(vk, gk, r ? r + k0 : NULL, u, d, k, isl, alpha);                       \
        if (dz) memcpy(dz + k0, d, (size_t)k * sizeof(T));                                       \
        if (!dx) continue;                                                                       \
        for (int64_t i = 0, c = 0, seg; i < k; i += seg) {                                       \
            seg = sm_run_##SUF(k0 + i, k - i, cl, C, S, &c);                                     \
            T *o = dx + k0 + i;                                                                  \
            if (cl) {                                                                            \
                _Pragma("omp simd")                                                              \
                for (int64_t j = 0; j < seg; j++)                                                \
                    o[j] = al[c + j] * d[i + j] + be[c + j] * u[i + j] + ga[c + j];              \
            } else {                                                                             \
                const T a0 = al[c], b0 = be[c], c0 = ga[c];                                      \
                _Pragma("omp simd")                                                              \
                for (int64_t j = 0; j < seg; j++) o[j] = a0 * d[i + j] + b0 * u[i + j] + c0;     \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
}                                                                                                \
static void act_dx_task_##SUF(void *p, int t, int nt) {                                          \
    const struct bn_act_dx_args *q = (const struct bn_act_dx_args *)p;                           \
    const T *g0 = (const T *)q->dy, *v0 = (const T *)q->v, *r0 = (const T *)q->r;                \
    const T *sc = (const T *)q->scale, *sh = (const T *)q->shift, *al0 = (const T *)q->alpha;    \
    const T *be0 = (const T *)q->beta, *ga0 = (const T *)q->gamma;                               \
    const uint8_t *m0 = (const uint8_t *)q->mask;                                                \
    T *dx0 = (T *)q->dx, *dz0 = (T *)q->dz;                                                      \
    const T sl = (T)q->slope, isl = act_inverse_##SUF(q->output, q->act, q->slope, q->act_alpha); \
    const T ea = (T)q->act_alpha;                                                                \
    const int zero = q->slope == 0.0, output = q->output != 0, kind = q->act;                    \
    const int64_t C = q->c, S = q->s, n = q->cl ? C : S;                                         \
    int64_t lo, hi;                                                                              \
    split(q->n * (q->cl ? S : C), t, nt, &lo, &hi);                                              \
    if (kind == ACT_ELU) { /* the smooth kinds: elu in place only (act_args_ok) */               \
        act_dx_elu_##SUF(g0, v0, r0, dx0, dz0, lo * n, (hi - lo) * n, al0, be0, ga0, q->cl, C, S,\
                         isl, ea);                                                               \
        return;                                                                                  \
    }                                                                                            \
    /* a run of one channel at a time; streamed, in chunks through buffers, else the whole range \
     * (its runs are rows) written directly */                                                   \
    const int stream = ACT_STREAMS && stream_ok_##SUF(q->n, C, S);                               \
    T xb[SM_CHUNK], zb[SM_CHUNK];                                                                \
    const T *line = dx0 ? dx0 : dz0; /* the chunks follow dx's lines (dz's where no dx) */       \
    for (int64_t k0 = lo * n, k; k0 < hi * n; k0 += k) {                                         \
        k = stream ? ACT_CHUNK(T, line + k0, 1) : hi * n - k0;                                   \
        if (k > hi * n - k0) k = hi * n - k0;                                                    \
        for (int64_t i = 0, c = 0, seg; i < k; i += seg) {                                       \
            seg = sm_run_##SUF(k0 + i, k - i, q->cl, C, S, &c);                                  \
            const int64_t o = k0 + i;                                                            \
            const T *g = g0 + o, *v = v0 + o, *r = r0 ? r0 + o : NULL;                           \
            const uint8_t *m = m0 ? m0 + o : NULL;                                               \
            T *dx = dx0 ? (stream ? xb + i : dx0 + o) : NULL;                                    \
            T *dz = dz0 ? (stream ? zb + i : dz0 + o) : NULL;                                    \
            const T *a = sc ? sc + c : NULL, *b = sh ? sh + c : NULL;                            \
            const T *al = al0 + c, *be = be0 + c, *ga = ga0 + c;                                 \
            if (q->cl && !output && !m && dx && !dz                                              \
                && act_cl_dx_fast_##SUF(g, v, dx, seg, a, b, al, be, ga, sl, zero))              \
                continue;                                                                        \
            { /* the run's length as the span's n of ACT_DX_LINEAR */                            \
                const int64_t n = seg;                                                           \
                if (q->cl) { ACT_DX_LINEAR(SUF, 1) }                                             \
                else { ACT_DX_LINEAR(SUF, 0) }                                                   \
            }                                                                                    \
        }                                                                                        \
        if (stream && dx0) stream_copy(dx0 + k0, xb, (size_t)k * sizeof(T));                     \
        if (stream && dz0) stream_copy(dz0 + k0, zb, (size_t)k * sizeof(T));                     \
    }                                                                                            \
    fence(stream);                                                                               \
}                                                                                                \
static void act_fwd_##SUF(const struct bn_act_fwd_args *a) {                                     \
    run_parallel(act_fwd_task_##SUF, (void *)a, a->nt < 1 ? 1 : (a->nt > MAX_THREADS ? MAX_THREADS : a->nt)); \
}                                                                                                \
/* 0, 1 (a statistic is NaN/Inf; y is written all the same) or -1 (out of memory). */            \
static int act_train_fwd_##SUF(const struct bn_act_train_fwd_args *a) {                          \
    const T *x = (const T *)a->x;                                                                \
    const int64_t N = a->n, C = a->c, S = a->s;                                                  \
    T *st = (T *)a->stats, *co = (T *)a->coef;                                                   \
    double *s = (double *)malloc((size_t)(2 * C) * sizeof(double));                              \
    if (!s || totals_##SUF(x, NULL, N, C, S, a->cl, NULL, s, s + C, a->nt)) { free(s); return -1; }\
    struct job_##SUF j;                                                                          \
    memset(&j, 0, sizeof j);                                                                     \
    j.C = C; j.w = (const T *)a->weight; j.b = (const T *)a->bias; j.eps = a->eps;               \
    j.var_scale = a->var_scale; j.mean = st; j.invstd = st + C; j.var = st + 2 * C;              \
    fwd_coefs_##SUF(&j, s, (double)(N * S), x, a->cl ? 1 : S, co);                               \
    free(s);                                                                                     \
    const struct bn_act_fwd_args f = {a->x, a->r, a->y, a->mask, co, co + C, N, C, S, a->slope,  \
                                      a->act_alpha, a->act, a->cl, a->nt};                       \
    act_fwd_##SUF(&f);                                                                           \
    return finish_fwd_##SUF(st, C, a->update);                                                   \
}                                                                                                \
                                                                                                 \
/* 0, or -2 (arguments these kernels do not take: see act_args_ok). */                           \
static int act_dx_##SUF(const struct bn_act_dx_args *a) {                                        \
    if (!act_args_ok(a->act, a->output, 0, 0)) return -2;                                        \
    if (!a->dx && !a->dz) return 0;                                                              \
    run_parallel(act_dx_task_##SUF, (void *)a, a->nt < 1 ? 1 : (a->nt > MAX_THREADS ? MAX_THREADS : a->nt)); \
    return 0;                                                                                    \
}                                                                                                \
                                                                                                 \
/* 0, -1 (out of memory) or -2 (arguments these kernels do not take: see act_args_ok). */        \
static int act_train_bwd_##SUF(const struct bn_act_train_bwd_args *a) {                          \
    const int64_t N = a->n, C = a->c, S = a->s;                                                  \
    const T *st = (const T *)a->stats, *co = (const T *)a->coef, *w = (const T *)a->weight;      \
    T *dw = (T *)a->dweight, *db = (T *)a->dbias;                                                \
    const int smooth = a->act != ACT_LINEAR;                                                     \
    if (smooth && !a->dz) return -2;                                                             \
    double *s = (double *)malloc((size_t)(2 * C) * sizeof(double));                              \
    T *k3 = (T *)malloc((size_t)(3 * C) * sizeof(T));                                            \
    if (!s || !k3) { free(s); free(k3); return -1; }                                             \
    const struct bn_act_sums_args q = {a->dy, a->x, a->mask, a->r, co, co + C, st, s, s + C,     \
                                       smooth ? a->dz : NULL, N, C, S, a->slope, a->act_alpha,   \
                                       a->act, 0, a->cl, a->nt};                                 \
    int rc = act_sums_##SUF(&q);                                                                 \
    if (rc) { free(s); free(k3); return rc; }                                                    \
    const double m = (double)(N * S);                                                            \
    for (int64_t c = 0; c < C; c++) {                                                            \
        const double is = (double)st[C + c], s1 = s[c], s2 = s[C + c];                           \
        if (db) db[c] = (T)s1;                                                                   \
        if (dw) dw[c] = (T)(s2 * is);                                                            \
        const double k = w ? is * (double)w[c] : is, b2 = k * (is * is) * s2 / m;                \
        k3[c] = (T)k; k3[C + c] = (T)(-b2);                                                      \
        k3[2 * C + c] = (T)(b2 * (double)st[c] + (-1.0 / m) * k * s1);                           \
    }                                                                                            \
    if (smooth) {                                                                                \
        if (a->dx) elementwise_##SUF((const T *)a->dz, (const T *)a->x, (T *)a->dx, N, C, S, a->cl,\
                                     k3, k3 + C, k3 + 2 * C, a->nt);                             \
    } else if (a->dx || a->dz) {                                                                 \
        const struct bn_act_dx_args d = {a->dy, a->x, a->mask, a->r, co, co + C, k3, k3 + C,     \
                                         k3 + 2 * C, a->dx, a->dz, N, C, S, a->slope, a->act_alpha,\
                                         a->act, 0, a->cl, a->nt};                               \
        rc = act_dx_##SUF(&d);                                                                   \
    }                                                                                            \
    free(s); free(k3);                                                                           \
    return rc;                                                                                   \
}

DEFINE_ACT(float, f32, fmaf, 16)
DEFINE_ACT(double, f64, fma, 8)

/* ---------------------------------------------------------------------------------------
 * The entry points. Return values: stats, sums, train_bwd: 0, or -1 (out of memory);
 * act_sums, act_train_bwd: 0, -1 (out of memory) or -2 (arguments they do not take); act_dx:
 * 0 or -2; train_fwd, act_train_fwd: 0, 1 (a statistic is NaN/Inf) or -1 (out of memory);
 * masked_fwd: the number of valid positions; check_stats: 0, 1 or 2 (above).
 * ------------------------------------------------------------------------------------- */
int bn_stats_f32(const struct bn_stats_args *a) { return stats_f32(a); }
int bn_stats_f64(const struct bn_stats_args *a) { return stats_f64(a); }

void bn_affine_f32(const struct bn_affine_args *a) { affine_f32(a); }
void bn_affine_f64(const struct bn_affine_args *a) { affine_f64(a); }

int bn_sums_f32(const struct bn_sums_args *a) { return sums_f32(a); }
int bn_sums_f64(const struct bn_sums_args *a) { return sums_f64(a); }

void bn_dx_f32(const struct bn_dx_args *a) { dx_f32(a); }
void bn_dx_f64(const struct bn_dx_args *a) { dx_f64(a); }

int bn_train_fwd_f32(const struct bn_train_fwd_args *a) { return train_fwd_f32(a); }
int bn_train_fwd_f64(const struct bn_train_fwd_args *a) { return train_fwd_f64(a); }

int bn_train_bwd_f32(const struct bn_train_bwd_args *a) { return train_bwd_f32(a); }
int bn_train_bwd_f64(const struct bn_train_bwd_args *a) { return train_bwd_f64(a); }

int64_t bn_masked_fwd_f32(const struct bn_masked_fwd_args *a) { return masked_fwd_f32(a); }
int64_t bn_masked_fwd_f64(const struct bn_masked_fwd_args *a) { return masked_fwd_f64(a); }

void bn_masked_bwd_f32(const struct bn_masked_bwd_args *a) { masked_bwd_f32(a); }
void bn_masked_bwd_f64(const struct bn_masked_bwd_args *a) { masked_bwd_f64(a); }

void bn_act_fwd_f32(const struct bn_act_fwd_args *a) { act_fwd_f32(a); }
void bn_act_fwd_f64(const struct bn_act_fwd_args *a) { act_fwd_f64(a); }

int bn_act_train_fwd_f32(const struct bn_act_train_fwd_args *a) { return act_train_fwd_f32(a); }
int bn_act_train_fwd_f64(const struct bn_act_train_fwd_args *a) { return act_train_fwd_f64(a); }

int bn_act_train_bwd_f32(const struct bn_act_train_bwd_args *a) { return act_train_bwd_f32(a); }
int bn_act_train_bwd_f64(const struct bn_act_train_bwd_args *a) { return act_train_bwd_f64(a); }

int bn_act_sums_f32(const struct bn_act_sums_args *a) { return act_sums_f32(a); }
int bn_act_sums_f64(const struct bn_act_sums_args *a) { return act_sums_f64(a); }

int bn_act_dx_f32(const struct bn_act_dx_args *a) { return act_dx_f32(a); }
int bn_act_dx_f64(const struct bn_act_dx_args *a) { return act_dx_f64(a); }

int bn_check_stats_f32(const struct bn_check_stats_args *a) { return check_stats(a, 0); }
int bn_check_stats_f64(const struct bn_check_stats_args *a) { return check_stats(a, 1); }

void bn_lerp_f32(const struct bn_lerp_args *a) { lerp_f32(a); }
void bn_lerp_f64(const struct bn_lerp_args *a) { lerp_f64(a); }

/* Each struct's layout, for batchnorm._jit to compare with its ctypes mirror before any
 * call: sizeof, then the offset and size of each field in declaration order. */
#define FIELD(S, f) (int64_t)offsetof(struct S, f), (int64_t)sizeof(((struct S *)0)->f)
static const int64_t layout_stats[] = {
    sizeof(struct bn_stats_args), FIELD(bn_stats_args, x), FIELD(bn_stats_args, mean), FIELD(bn_stats_args, var),
    FIELD(bn_stats_args, n), FIELD(bn_stats_args, c), FIELD(bn_stats_args, s), FIELD(bn_stats_args, cl),
    FIELD(bn_stats_args, nt)};
static const int64_t layout_affine[] = {
    sizeof(struct bn_affine_args), FIELD(bn_affine_args, x), FIELD(bn_affine_args, y), FIELD(bn_affine_args, scale),
    FIELD(bn_affine_args, shift), FIELD(bn_affine_args, n), FIELD(bn_affine_args, c), FIELD(bn_affine_args, s),
    FIELD(bn_affine_args, cl), FIELD(bn_affine_args, nt)};
static const int64_t layout_sums[] = {
    sizeof(struct bn_sums_args), FIELD(bn_sums_args, dy), FIELD(bn_sums_args, x), FIELD(bn_sums_args, mean),
    FIELD(bn_sums_args, sum_dy), FIELD(bn_sums_args, sum_dy_xmu), FIELD(bn_sums_args, n), FIELD(bn_sums_args, c),
    FIELD(bn_sums_args, s), FIELD(bn_sums_args, cl), FIELD(bn_sums_args, nt)};
static const int64_t layout_dx[] = {
    sizeof(struct bn_dx_args), FIELD(bn_dx_args, dy), FIELD(bn_dx_args, x), FIELD(bn_dx_args, dx),
    FIELD(bn_dx_args, alpha), FIELD(bn_dx_args, beta), FIELD(bn_dx_args, gamma), FIELD(bn_dx_args, n),
    FIELD(bn_dx_args, c), FIELD(bn_dx_args, s), FIELD(bn_dx_args, cl), FIELD(bn_dx_args, nt)};
static const int64_t layout_train_fwd[] = {
    sizeof(struct bn_train_fwd_args), FIELD(bn_train_fwd_args, x), FIELD(bn_train_fwd_args, y),
    FIELD(bn_train_fwd_args, weight), FIELD(bn_train_fwd_args, bias), FIELD(bn_train_fwd_args, stats),
    FIELD(bn_train_fwd_args, ren_mean), FIELD(bn_train_fwd_args, ren_var), FIELD(bn_train_fwd_args, rd),
    FIELD(bn_train_fwd_args, update), FIELD(bn_train_fwd_args, n), FIELD(bn_train_fwd_args, c),
    FIELD(bn_train_fwd_args, s),
    FIELD(bn_train_fwd_args, eps), FIELD(bn_train_fwd_args, var_scale), FIELD(bn_train_fwd_args, r_max),
    FIELD(bn_train_fwd_args, d_max), FIELD(bn_train_fwd_args, cl), FIELD(bn_train_fwd_args, nt)};
static const int64_t layout_train_bwd[] = {
    sizeof(struct bn_train_bwd_args), FIELD(bn_train_bwd_args, dy), FIELD(bn_train_bwd_args, x),
    FIELD(bn_train_bwd_args, dx), FIELD(bn_train_bwd_args, weight), FIELD(bn_train_bwd_args, stats),
    FIELD(bn_train_bwd_args, rd), FIELD(bn_train_bwd_args, dweight), FIELD(bn_train_bwd_args, dbias),
    FIELD(bn_train_bwd_args, n), FIELD(bn_train_bwd_args, c), FIELD(bn_train_bwd_args, s),
    FIELD(bn_train_bwd_args, cl), FIELD(bn_train_bwd_args, nt)};
static const int64_t layout_check_stats[] = {
    sizeof(struct bn_check_stats_args), FIELD(bn_check_stats_args, mean), FIELD(bn_check_stats_args, invstd),
    FIELD(bn_check_stats_args, c), FIELD(bn_check_stats_args, m), FIELD(bn_check_stats_args, threshold),
    FIELD(bn_check_stats_args, unit)};
static const int64_t layout_lerp[] = {
    sizeof(struct bn_lerp_args), FIELD(bn_lerp_args, a), FIELD(bn_lerp_args, b), FIELD(bn_lerp_args, ta),
    FIELD(bn_lerp_args, tb), FIELD(bn_lerp_args, counter), FIELD(bn_lerp_args, c), FIELD(bn_lerp_args, w)};
static const int64_t layout_masked_fwd[] = {
    sizeof(struct bn_masked_fwd_args), FIELD(bn_masked_fwd_args, x), FIELD(bn_masked_fwd_args, mask),
    FIELD(bn_masked_fwd_args, y), FIELD(bn_masked_fwd_args, weight), FIELD(bn_masked_fwd_args, bias),
    FIELD(bn_masked_fwd_args, stats), FIELD(bn_masked_fwd_args, n), FIELD(bn_masked_fwd_args, c),
    FIELD(bn_masked_fwd_args, l), FIELD(bn_masked_fwd_args, eps), FIELD(bn_masked_fwd_args, nt)};
static const int64_t layout_masked_bwd[] = {
    sizeof(struct bn_masked_bwd_args), FIELD(bn_masked_bwd_args, dy), FIELD(bn_masked_bwd_args, x),
    FIELD(bn_masked_bwd_args, mask), FIELD(bn_masked_bwd_args, dx), FIELD(bn_masked_bwd_args, weight),
    FIELD(bn_masked_bwd_args, stats), FIELD(bn_masked_bwd_args, dweight), FIELD(bn_masked_bwd_args, dbias),
    FIELD(bn_masked_bwd_args, n), FIELD(bn_masked_bwd_args, c), FIELD(bn_masked_bwd_args, l),
    FIELD(bn_masked_bwd_args, count), FIELD(bn_masked_bwd_args, nt)};
static const int64_t layout_act_fwd[] = {
    sizeof(struct bn_act_fwd_args), FIELD(bn_act_fwd_args, x), FIELD(bn_act_fwd_args, r), FIELD(bn_act_fwd_args, y),
    FIELD(bn_act_fwd_args, mask), FIELD(bn_act_fwd_args, scale), FIELD(bn_act_fwd_args, shift),
    FIELD(bn_act_fwd_args, n), FIELD(bn_act_fwd_args, c), FIELD(bn_act_fwd_args, s), FIELD(bn_act_fwd_args, slope),
    FIELD(bn_act_fwd_args, act_alpha), FIELD(bn_act_fwd_args, act), FIELD(bn_act_fwd_args, cl),
    FIELD(bn_act_fwd_args, nt)};
static const int64_t layout_act_train_fwd[] = {
    sizeof(struct bn_act_train_fwd_args), FIELD(bn_act_train_fwd_args, x), FIELD(bn_act_train_fwd_args, r),
    FIELD(bn_act_train_fwd_args, y), FIELD(bn_act_train_fwd_args, mask), FIELD(bn_act_train_fwd_args, weight),
    FIELD(bn_act_train_fwd_args, bias), FIELD(bn_act_train_fwd_args, stats), FIELD(bn_act_train_fwd_args, coef),
    FIELD(bn_act_train_fwd_args, update), FIELD(bn_act_train_fwd_args, n), FIELD(bn_act_train_fwd_args, c),
    FIELD(bn_act_train_fwd_args, s),
    FIELD(bn_act_train_fwd_args, eps), FIELD(bn_act_train_fwd_args, var_scale), FIELD(bn_act_train_fwd_args, slope),
    FIELD(bn_act_train_fwd_args, act_alpha), FIELD(bn_act_train_fwd_args, act), FIELD(bn_act_train_fwd_args, cl),
    FIELD(bn_act_train_fwd_args, nt)};
static const int64_t layout_act_train_bwd[] = {
    sizeof(struct bn_act_train_bwd_args), FIELD(bn_act_train_bwd_args, dy), FIELD(bn_act_train_bwd_args, x),
    FIELD(bn_act_train_bwd_args, mask), FIELD(bn_act_train_bwd_args, r), FIELD(bn_act_train_bwd_args, coef),
    FIELD(bn_act_train_bwd_args, stats), FIELD(bn_act_train_bwd_args, weight), FIELD(bn_act_train_bwd_args, dx),
    FIELD(bn_act_train_bwd_args, dz), FIELD(bn_act_train_bwd_args, dweight), FIELD(bn_act_train_bwd_args, dbias),
    FIELD(bn_act_train_bwd_args, n), FIELD(bn_act_train_bwd_args, c), FIELD(bn_act_train_bwd_args, s),
    FIELD(bn_act_train_bwd_args, slope), FIELD(bn_act_train_bwd_args, act_alpha), FIELD(bn_act_train_bwd_args, act),
    FIELD(bn_act_train_bwd_args, cl), FIELD(bn_act_train_bwd_args, nt)};
static const int64_t layout_act_sums[] = {
    sizeof(struct bn_act_sums_args), FIELD(bn_act_sums_args, dy), FIELD(bn_act_sums_args, v),
    FIELD(bn_act_sums_args, mask), FIELD(bn_act_sums_args, r), FIELD(bn_act_sums_args, scale),
    FIELD(bn_act_sums_args, shift), FIELD(bn_act_sums_args, mu), FIELD(bn_act_sums_args, sum_dz),
    FIELD(bn_act_sums_args, sum_dzu), FIELD(bn_act_sums_args, dz), FIELD(bn_act_sums_args, n), FIELD(bn_act_sums_args, c),
    FIELD(bn_act_sums_args, s), FIELD(bn_act_sums_args, slope), FIELD(bn_act_sums_args, act_alpha),
    FIELD(bn_act_sums_args, act), FIELD(bn_act_sums_args, output), FIELD(bn_act_sums_args, cl),
    FIELD(bn_act_sums_args, nt)};
static const int64_t layout_act_dx[] = {
    sizeof(struct bn_act_dx_args), FIELD(bn_act_dx_args, dy), FIELD(bn_act_dx_args, v), FIELD(bn_act_dx_args, mask),
    FIELD(bn_act_dx_args, r), FIELD(bn_act_dx_args, scale), FIELD(bn_act_dx_args, shift),
    FIELD(bn_act_dx_args, alpha), FIELD(bn_act_dx_args, beta), FIELD(bn_act_dx_args, gamma),
    FIELD(bn_act_dx_args, dx), FIELD(bn_act_dx_args, dz), FIELD(bn_act_dx_args, n), FIELD(bn_act_dx_args, c),
    FIELD(bn_act_dx_args, s), FIELD(bn_act_dx_args, slope), FIELD(bn_act_dx_args, act_alpha),
    FIELD(bn_act_dx_args, act), FIELD(bn_act_dx_args, output), FIELD(bn_act_dx_args, cl),
    FIELD(bn_act_dx_args, nt)};
#undef FIELD

#define LAYOUT(kind, table) {kind, table, (int64_t)(sizeof table / sizeof table[0])}
static const struct { const char *kind; const int64_t *values; int64_t count; } layouts[] = {
    LAYOUT("stats", layout_stats), LAYOUT("affine", layout_affine), LAYOUT("sums", layout_sums),
    LAYOUT("dx", layout_dx), LAYOUT("train_fwd", layout_train_fwd), LAYOUT("train_bwd", layout_train_bwd),
    LAYOUT("check_stats", layout_check_stats), LAYOUT("lerp", layout_lerp),
    LAYOUT("masked_fwd", layout_masked_fwd), LAYOUT("masked_bwd", layout_masked_bwd),
    LAYOUT("act_fwd", layout_act_fwd), LAYOUT("act_train_fwd", layout_act_train_fwd),
    LAYOUT("act_train_bwd", layout_act_train_bwd),
    LAYOUT("act_sums", layout_act_sums), LAYOUT("act_dx", layout_act_dx)};
#undef LAYOUT

/* Copies the layout of entry point `kind`'s struct into out (at most cap values); returns how
 * many values it has (more than cap: only cap were copied), or -1 for an unknown kind. */
int64_t bn_args_layout(const char *kind, int64_t *out, int64_t cap) {
    for (size_t i = 0; i < sizeof layouts / sizeof layouts[0]; i++) {
        if (strcmp(kind, layouts[i].kind)) continue;
        for (int64_t k = 0; k < layouts[i].count && k < cap; k++) out[k] = layouts[i].values[k];
        return layouts[i].count;
    }
    return -1;
}
