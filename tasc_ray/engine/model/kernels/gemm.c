/* Matrix products for decoding on a CPU: y[M, N] = x[M, K] . W[N, K]^T (+ bias), float32.

   A decode step multiplies a handful of rows (one per query token) by every weight of the model: with one or two
   rows it is bound by how fast the weights stream from memory, with tens of rows (a verification pass, a batch)
   by the multiply-adds. The weights are packed once into panels of 16 output rows, panels[N / 16][K][16], so
   that one vector load gives one k of 16 outputs: a block keeps mb x np accumulator registers (mb x rows times np
   panels, up to 24 of the 32 AVX-512 registers), and each k costs np weight loads, mb broadcasts of x and
   mb * np multiply-adds. Each thread takes a contiguous range of panels and streams it once per block of x rows.

   Every output is one multiply-add chain over k = 0 .. K - 1 in order, whatever M is and whichever other rows
   share the call: a row's result does not depend on its batch. Built by cpu_kernels.py with -O3 -march=native;
   the vector type below is one AVX-512 register (or two AVX2 ones). */

#include <omp.h>
#include <string.h>

typedef float vf __attribute__((vector_size(64)));

static inline vf load(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Outputs of x rows m0 .. m0 + mb - 1 for the 16 * np outputs of panels p0 .. p0 + np - 1; mb and np are
   constants where this is inlined, so only the accumulators in use are kept. */
static inline __attribute__((always_inline)) void block(const float *x, const float *panels, const float *bias,
                                                         float *y, long N, long K, long m0, long p0, int mb,
                                                         int np) {
    vf acc[12][8];
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < np; j++) acc[i][j] = (vf){0};
    const float *w = panels + p0 * K * 16;
    for (long k = 0; k < K; k++) {
        vf wv[8];
        for (int j = 0; j < np; j++) wv[j] = load(w + (j * K + k) * 16);
        for (int i = 0; i < mb; i++) {
            vf xb = (vf){0} + x[(m0 + i) * K + k];
            for (int j = 0; j < np; j++) acc[i][j] += xb * wv[j];
        }
    }
    for (int j = 0; j < np; j++) {
        long n0 = (p0 + j) * 16;
        int width = N - n0 < 16 ? (int)(N - n0) : 16; /* the last panel may be zero-padded */
        vf b = bias ? load(bias + n0) : (vf){0};
        for (int i = 0; i < mb; i++) {
            vf out = acc[i][j] + b;
            memcpy(y + (m0 + i) * N + n0, &out, sizeof(float) * width);
        }
    }
}

#define ROW_CASES(NP)                                                  \
    switch (mb) {                                                      \
        case 1: block(x, panels, bias, y, N, K, m0, p, 1, NP); break;  \
        case 2: block(x, panels, bias, y, N, K, m0, p, 2, NP); break;  \
        case 3: block(x, panels, bias, y, N, K, m0, p, 3, NP); break;  \
        case 4: block(x, panels, bias, y, N, K, m0, p, 4, NP); break;  \
        case 5: block(x, panels, bias, y, N, K, m0, p, 5, NP); break;  \
        case 6: block(x, panels, bias, y, N, K, m0, p, 6, NP); break;  \
        case 7: block(x, panels, bias, y, N, K, m0, p, 7, NP); break;  \
        case 8: block(x, panels, bias, y, N, K, m0, p, 8, NP); break;  \
        case 9: block(x, panels, bias, y, N, K, m0, p, 9, NP); break;  \
        case 10: block(x, panels, bias, y, N, K, m0, p, 10, NP); break; \
        case 11: block(x, panels, bias, y, N, K, m0, p, 11, NP); break; \
        default: block(x, panels, bias, y, N, K, m0, p, 12, NP); break; \
    }

/* All x rows against panels [p, p + np): x rows in blocks as even as possible (9 rows: one block, 26: 9 + 9 + 8). */
static void panel_group(const float *x, const float *panels, const float *bias, float *y, long M, long N, long K,
                        long p, int np) {
    if (np == 8) { /* one or two x rows: 8 panels give 8 or 16 independent multiply-add chains */
        for (long m0 = 0; m0 < M; m0 += 2) {
            if (M - m0 >= 2) block(x, panels, bias, y, N, K, m0, p, 2, 8);
            else block(x, panels, bias, y, N, K, m0, p, 1, 8);
        }
        return;
    }
    if (np == 4) { /* three or four x rows */
        for (long m0 = 0; m0 < M; m0 += 4) {
            long mb = M - m0 < 4 ? M - m0 : 4;
            if (mb == 4) block(x, panels, bias, y, N, K, m0, p, 4, 4);
            else if (mb == 3) block(x, panels, bias, y, N, K, m0, p, 3, 4);
            else if (mb == 2) block(x, panels, bias, y, N, K, m0, p, 2, 4);
            else block(x, panels, bias, y, N, K, m0, p, 1, 4);
        }
        return;
    }
    long blocks = (M + 11) / 12, m0 = 0;
    for (long b = 0; b < blocks; b++) {
        long mb = (M - m0) / (blocks - b);
        if (np == 2) {
            ROW_CASES(2)
        } else {
            ROW_CASES(1)
        }
        m0 += mb;
    }
}

/* y[M, N] = x[M, K] . W^T + bias (bias may be NULL, else padded to the panels' width); W packed as
   panels[ceil(N / 16)][K][16]; x and y contiguous, row-major. */
void tasc_gemm_f32(const float *x, const float *panels, const float *bias, float *y, long M, long N, long K,
                   int threads) {
    long total = (N + 15) / 16;
    int np = M <= 2 ? 8 : M <= 4 ? 4 : 2;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        long first = total * t / n, last = total * (t + 1) / n, p = first;
        for (; p + np <= last; p += np) panel_group(x, panels, bias, y, M, N, K, p, np);
        for (; p < last; p++) panel_group(x, panels, bias, y, M, N, K, p, 1);
    }
}
