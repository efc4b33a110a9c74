/* Bare streaming passes for benchmarks/floor.py: the memory traffic of a BN training step
 * with no arithmetic beyond one add or multiply-add per element. Built by floor.py with the
 * system C compiler (-O3 -march=native -fopenmp); each pass splits the n floats between
 * nt threads in contiguous halves (as the kernels split rows). Outputs are written with
 * non-temporal stores where AVX-512 is available (as the kernels do from 8 MB on). */
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static void range(int64_t n, int t, int nt, int64_t *lo, int64_t *hi) {
    const int64_t q = (n / nt) & ~(int64_t)63;  /* 64-float aligned shares */
    *lo = q * t;
    *hi = t == nt - 1 ? n : q * (t + 1);
}

/* read x (and dy): returns a sum so that the loads are not optimized away */
double pass_read(const float *x, const float *dy, int64_t n, int nt) {
    double total = 0.0;
#pragma omp parallel for num_threads(nt) reduction(+ : total) schedule(static, 1)
    for (int t = 0; t < nt; t++) {
        int64_t lo, hi;
        range(n, t, nt, &lo, &hi);
        float acc[16] = {0};
        int64_t i = lo;
        if (dy)
            for (; i + 16 <= hi; i += 16)
#pragma omp simd
                for (int l = 0; l < 16; l++) acc[l] += x[i + l] * dy[i + l];
        else
            for (; i + 16 <= hi; i += 16)
#pragma omp simd
                for (int l = 0; l < 16; l++) acc[l] += x[i + l];
        for (; i < hi; i++) acc[0] += dy ? x[i] * dy[i] : x[i];
        for (int l = 0; l < 16; l++) total += acc[l];
    }
    return total;
}

/* out = a * x (+ dy): read x (and dy), write out */
void pass_write(const float *x, const float *dy, float *out, int64_t n, float a, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; t++) {
        int64_t lo, hi;
        range(n, t, nt, &lo, &hi);
        int64_t i = lo;
#if defined(__AVX512F__)
        const __m512 av = _mm512_set1_ps(a);
        for (; i < hi && ((uintptr_t)(out + i) & 63); i++) out[i] = a * x[i] + (dy ? dy[i] : 0.0f);
        for (; i + 16 <= hi; i += 16) {
            __m512 v = _mm512_mul_ps(av, _mm512_loadu_ps(x + i));
            if (dy) v = _mm512_add_ps(v, _mm512_loadu_ps(dy + i));
            _mm512_stream_ps(out + i, v);
        }
#endif
        for (; i < hi; i++) out[i] = a * x[i] + (dy ? dy[i] : 0.0f);
#if defined(__AVX512F__)
        _mm_sfence();
#endif
    }
}
