/* Few-row matrix products for decoding on a CPU: y[M, N] = x[M, K] . W[N, K]^T (+ bias), float32.

   A decode step multiplies a handful of rows (one per query token) by every weight matrix of the model, so it
   is bound by how fast the weights stream from memory. This kernel reads W once, row after row (the row-major
   layout of torch's nn.Linear weight, so no repacked copy is needed), and multiplies each block of 8 weight rows
   by the x rows 2 at a time while the block sits in L1. Threads split N into contiguous ranges (OpenMP, the
   same runtime torch uses), so each thread streams one contiguous stretch of memory.

   Each output is the sum of 16 lane-wise partial sums over K (then the K % 16 tail, then the bias): the same
   order for every row, whatever M is and whichever other rows share the call. Built by cpu_kernels.py with
   -O3 -march=native; the vector type below becomes one AVX-512 register (or two AVX2 ones). */

#include <stddef.h>
#include <string.h>

typedef float vf __attribute__((vector_size(64)));

static inline vf load(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v); /* an unaligned vector load */
    return v;
}

static inline float lanes_sum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}

/* mb x nb outputs starting at (m0, n0), mb <= 4, nb <= 8, mb * nb <= 16 (one accumulator register each); mb and
   nb are constants where this is inlined, so only the accumulators in use are kept. */
static inline __attribute__((always_inline)) void block(const float *x, const float *w, const float *bias, float *y,
                                                         long N, long K, long m0, long n0, int mb, int nb) {
    vf acc[4][8];
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++) acc[i][j] = (vf){0};
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        vf wv[8], xv[4];
        for (int j = 0; j < nb; j++) wv[j] = load(w + (n0 + j) * K + k);
        for (int i = 0; i < mb; i++) xv[i] = load(x + (m0 + i) * K + k);
        for (int i = 0; i < mb; i++)
            for (int j = 0; j < nb; j++) acc[i][j] += xv[i] * wv[j];
    }
    for (int i = 0; i < mb; i++) {
        for (int j = 0; j < nb; j++) {
            float s = lanes_sum(acc[i][j]);
            for (long t = k; t < K; t++) s += x[(m0 + i) * K + t] * w[(n0 + j) * K + t];
            y[(m0 + i) * N + n0 + j] = bias ? s + bias[n0 + j] : s;
        }
    }
}

/* Every x row against weight rows n0 .. n0 + nb - 1, two x rows at a time with 8 weight rows: 16 independent
   accumulators hide the multiply-add latency, and the 8 weight rows are read from memory once, then from L1. */
static void weight_rows(const float *x, const float *w, const float *bias, float *y, long M, long N, long K, long n0,
                        int nb) {
    if (nb == 8) {
        long m0 = 0;
        for (; m0 + 2 <= M; m0 += 2) block(x, w, bias, y, N, K, m0, n0, 2, 8);
        if (m0 < M) block(x, w, bias, y, N, K, m0, n0, 1, 8);
        return;
    }
    for (long m0 = 0; m0 < M; m0++) /* the last few weight rows */
        for (int j = 0; j < nb; j++) block(x, w, bias, y, N, K, m0, n0 + j, 1, 1);
}

/* y[M, N] = x[M, K] . w[N, K]^T + bias[N] (bias may be NULL); every array contiguous, row-major. */
void tasc_gemv_f32(const float *x, const float *w, const float *bias, float *y, long M, long N, long K,
                   int threads) {
    long blocks = (N + 7) / 8;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long b = 0; b < blocks; b++) {
        long n0 = b * 8;
        weight_rows(x, w, bias, y, M, N, K, n0, N - n0 >= 8 ? 8 : (int)(N - n0));
    }
}
