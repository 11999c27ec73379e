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

/* The row blocking every product shares: all x rows against panels [p, p + np), in blocks of one or two rows
   where np = 8 (8 or 16 independent multiply-add chains), up to four where np = 4, else blocks as even as possible
   of up to 12 rows (9 rows: one block, 26: 9 + 9 + 8). BLOCK(m0, mb, np) runs rows m0 .. m0 + mb - 1 with mb and
   np constants, so each product's block keeps only the accumulators in use. Used as a function's whole body, with
   M and np among its parameters. */
#define ROW_CASES(BLOCK, NP)                  \
    switch (mb) {                             \
        case 1: BLOCK(m0, 1, NP); break;      \
        case 2: BLOCK(m0, 2, NP); break;      \
        case 3: BLOCK(m0, 3, NP); break;      \
        case 4: BLOCK(m0, 4, NP); break;      \
        case 5: BLOCK(m0, 5, NP); break;      \
        case 6: BLOCK(m0, 6, NP); break;      \
        case 7: BLOCK(m0, 7, NP); break;      \
        case 8: BLOCK(m0, 8, NP); break;      \
        case 9: BLOCK(m0, 9, NP); break;      \
        case 10: BLOCK(m0, 10, NP); break;    \
        case 11: BLOCK(m0, 11, NP); break;    \
        default: BLOCK(m0, 12, NP); break;    \
    }
#define PANEL_GROUP(BLOCK)                                                   \
    if (np == 8) {                                                           \
        for (long m0 = 0; m0 < M; m0 += 2) {                                 \
            if (M - m0 >= 2) BLOCK(m0, 2, 8);                                \
            else BLOCK(m0, 1, 8);                                            \
        }                                                                    \
        return;                                                              \
    }                                                                        \
    if (np == 4) {                                                           \
        for (long m0 = 0; m0 < M; m0 += 4) {                                 \
            long mb = M - m0 < 4 ? M - m0 : 4;                               \
            if (mb == 4) BLOCK(m0, 4, 4);                                    \
            else if (mb == 3) BLOCK(m0, 3, 4);                               \
            else if (mb == 2) BLOCK(m0, 2, 4);                               \
            else BLOCK(m0, 1, 4);                                            \
        }                                                                    \
        return;                                                              \
    }                                                                        \
    long blocks = (M + 11) / 12, m0 = 0;                                     \
    for (long b = 0; b < blocks; b++) {                                      \
        long mb = (M - m0) / (blocks - b);                                   \
        if (np == 2) {                                                       \
            ROW_CASES(BLOCK, 2)                                              \
        } else {                                                             \
            ROW_CASES(BLOCK, 1)                                              \
        }                                                                    \
        m0 += mb;                                                            \
    }

#define F32_BLOCK(M0, MB, NP) block(x, panels, bias, y, N, K, M0, p, MB, NP)
static void panel_group(const float *x, const float *panels, const float *bias, float *y, long M, long N, long K,
                        long p, int np) {
    PANEL_GROUP(F32_BLOCK)
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

/* ----- bf16 weights: y[M, N] = x[M, K] . W[N, K]^T (+ bias) with W and x rounded to bfloat16, float32 sums -----

   The weights are packed as bf16 pairs along k, panels[N / 16][K / 2][16][2], and x is rounded to bf16 pairs once
   per call; one AVX512-BF16 `vdpbf16ps` then adds x[k] w[n, k] + x[k + 1] w[n, k + 1] to 16 float32 sums, twice the
   multiply-adds of an FMA from half the weight bytes. As above, every output is one chain over the k pairs in
   order, whatever M is: a row's result does not depend on its batch. Compiled only where the compiler targets
   AVX512-BF16 (`tasc_gemm_has_bf16` says). */

#ifdef __AVX512BF16__
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

static inline uint32_t bf16_pair(float lo, float hi) { /* round to nearest even, as torch's float -> bfloat16 */
    uint32_t a, b;
    memcpy(&a, &lo, 4);
    memcpy(&b, &hi, 4);
    a = (a + 0x7FFF + ((a >> 16) & 1)) >> 16;
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16;
    return a | (b << 16);
}

/* x[M, K] rounded to bf16 pairs along k, row m at xp + m * stride (stride >= ceil(K / 2) pairs; an odd K's last
   pair has a zero high half). */
static void round_rows(const float *x, uint32_t *xp, long M, long K, long stride) {
    for (long m = 0; m < M; m++)
        for (long k = 0; k < (K + 1) / 2; k++) {
            float hi = 2 * k + 1 < K ? x[m * K + 2 * k + 1] : 0.0f;
            xp[m * stride + k] = bf16_pair(x[m * K + 2 * k], hi);
        }
}

/* Rows m0.. m0 + mb of np panels from panel p0 on; w: those panels' pairs (panels + p0 * K2 * 32, or a copy). */
static inline __attribute__((always_inline)) void block_bf16(const uint32_t *xp, const uint16_t *w,
                                                              const float *bias, float *y, long N, long K2,
                                                              long m0, long p0, int mb, int np) {
    __m512 acc[12][8];
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < np; j++) acc[i][j] = _mm512_setzero_ps();
    for (long k = 0; k < K2; k++) {
        __m512bh wv[8];
        for (int j = 0; j < np; j++) wv[j] = (__m512bh)_mm512_loadu_si512((const void *)(w + (j * K2 + k) * 32));
        for (int i = 0; i < mb; i++) {
            __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xp[(m0 + i) * K2 + k]);
            for (int j = 0; j < np; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xb, wv[j]);
        }
    }
    for (int j = 0; j < np; j++) {
        long n0 = (p0 + j) * 16;
        int width = N - n0 < 16 ? (int)(N - n0) : 16;
        __m512 b = bias ? _mm512_loadu_ps(bias + n0) : _mm512_setzero_ps();
        for (int i = 0; i < mb; i++) {
            __m512 out = _mm512_add_ps(acc[i][j], b);
            memcpy(y + (m0 + i) * N + n0, &out, sizeof(float) * width);
        }
    }
}

#define BF16_BLOCK(M0, MB, NP) block_bf16(xp, w, bias, y, N, K2, M0, p, MB, NP)
static void panel_group_bf16(const uint32_t *xp, const uint16_t *w, const float *bias, float *y, long M, long N,
                             long K2, long p, int np) {
    PANEL_GROUP(BF16_BLOCK)
}

/* y[M, N] = bf16(x)[M, K] . W^T + bias, W packed as bf16 panels[ceil(N / 16)][K2][16][2], K2 = ceil(K / 2) (an odd
   K's last pair is zero-padded in W; x's missing element counts as zero). */
int tasc_gemm_has_bf16(void) { return 1; }

void tasc_gemm_bf16(const float *x, const uint16_t *panels, const float *bias, float *y, long M, long N, long K,
                    int threads) {
    long K2 = (K + 1) / 2, total = (N + 15) / 16;
    uint32_t *xp = malloc(sizeof(uint32_t) * M * K2);
    round_rows(x, xp, M, K, K2);
    int np = M <= 2 ? 8 : M <= 4 ? 4 : 2;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        long first = total * t / n, last = total * (t + 1) / n, p = first;
        for (; p + np <= last; p += np) panel_group_bf16(xp, panels + p * K2 * 32, bias, y, M, N, K2, p, np);
        for (; p < last; p++) panel_group_bf16(xp, panels + p * K2 * 32, bias, y, M, N, K2, p, 1);
    }
    free(xp);
}

/* ----- bf16 on AMX tiles: the same product where the CPU has AMX-BF16 -----

   One TDPBF16PS multiplies a 16 x 32 tile of x (16 rows, 16 bf16 pairs along k) by a 16 x 16 tile of a panel
   (16 pairs along k by 16 outputs) into 16 x 16 float32 sums: 8192 multiply-adds an instruction. The panels are
   the bf16 layout above with k padded to whole tiles (zero pairs add exactly 0), x is rounded to bf16 pairs into a
   buffer padded to whole tiles of zero rows. Each output is one chain of tile products over the k tiles in
   order, and a tile's row m depends only on x's row m: a row's result does not depend on its batch. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static void load_tile_config(void) { /* this thread's 8 tiles: 16 rows of 64 bytes each */
    tile_config config = {0};
    config.palette = 1;
    for (int i = 0; i < 8; i++) {
        config.colsb[i] = 64;
        config.rows[i] = 16;
    }
    _tile_loadconfig(&config);
}

int tasc_gemm_has_amx(void) { /* Linux hands out AMX state to a process that asks (ARCH_REQ_XCOMP_PERM) */
    static int permitted = -1;
    if (permitted < 0) permitted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return permitted;
}

#define AMX_PANELS 4 /* panels a tile pass covers: 4 sums tiles, one x tile, two panel tiles */

static void amx_group(const uint32_t *xp, const uint16_t *wp, const float *bias, float *y, long M, long Mp, long N,
                      long K2p, long p0, int np) { /* wp: the group's panels (panels + p0 * K2p * 32, or a copy) */
    float sums[AMX_PANELS][16][16];
    for (long m0 = 0; m0 < Mp; m0 += 16) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (long r = 0; r < K2p; r += 16) {
            const uint16_t *w = wp + r * 32;
            _tile_loadd(4, xp + m0 * K2p + r, K2p * 4);
            _tile_loadd(5, w, 64);
            _tile_dpbf16ps(0, 4, 5);
            if (np > 1) {
                _tile_loadd(6, w + K2p * 32, 64);
                _tile_dpbf16ps(1, 4, 6);
            }
            if (np > 2) {
                _tile_loadd(5, w + 2 * K2p * 32, 64);
                _tile_dpbf16ps(2, 4, 5);
            }
            if (np > 3) {
                _tile_loadd(6, w + 3 * K2p * 32, 64);
                _tile_dpbf16ps(3, 4, 6);
            }
        }
        _tile_stored(0, sums[0], 64);
        _tile_stored(1, sums[1], 64);
        _tile_stored(2, sums[2], 64);
        _tile_stored(3, sums[3], 64);
        for (int j = 0; j < np; j++) {
            long n0 = (p0 + j) * 16;
            int width = N - n0 < 16 ? (int)(N - n0) : 16;
            for (long m = m0; m < M && m < m0 + 16; m++)
                for (int n = 0; n < width; n++) y[m * N + n0 + n] = sums[j][m - m0][n] + (bias ? bias[n0 + n] : 0.0f);
        }
    }
}

/* y[M, N] = bf16(x)[M, K] . W^T + bias, W packed as bf16 panels[ceil(N / 16)][K2p][16][2], K2p = ceil(K / 2) rounded
   up to a multiple of 16 (zero pairs). */
void tasc_gemm_bf16_amx(const float *x, const uint16_t *panels, const float *bias, float *y, long M, long N, long K,
                        int threads) {
    long K2 = (K + 1) / 2, K2p = (K2 + 15) / 16 * 16, Mp = (M + 15) / 16 * 16, total = (N + 15) / 16;
    uint32_t *xp = calloc(Mp * K2p, sizeof(uint32_t)); /* zero rows and pairs beyond x's */
    round_rows(x, xp, M, K, K2p);
#pragma omp parallel num_threads(threads)
    {
        load_tile_config();
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        long first = total * t / n, last = total * (t + 1) / n;
        for (long p = first; p < last; p += AMX_PANELS) {
            int np = last - p < AMX_PANELS ? (int)(last - p) : AMX_PANELS;
            amx_group(xp, panels + p * K2p * 32, bias, y, M, Mp, N, K2p, p, np);
        }
        _tile_release();
    }
    free(xp);
}
#else
int tasc_gemm_has_amx(void) { return 0; }
#endif

/* ----- int8 weights (weight-only), bf16 inputs -----

   W is stored as int8 in the bf16 panel layout (pairs along k, the same k padding), with one float32 scale per
   output: W[n, k] ~= scale[n] * W8[n, k]. Each thread dequantises one group of panels at a time into a scratch of
   bf16 pairs that stays in its L2 cache (integers up to 127 are exact in bf16), runs the bf16 product above on it
   (on AMX tiles where the CPU has them) and scales the group's outputs: y = scale[n] * (bf16(x) . W8[n]) + bias[n].
   The weights cross the memory bus as one byte each instead of two; every output is the same chain of the bf16
   product, so a row's result does not depend on its batch. */
static void dequantise(const int8_t *w8, uint16_t *out, long count) { /* count: a multiple of 32 */
    for (long i = 0; i < count; i += 32) {
        __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w8 + i))));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w8 + i + 16))));
        _mm512_storeu_si512((void *)(out + i), (__m512i)_mm512_cvtne2ps_pbh(hi, lo)); /* lo in the low half */
    }
}

static void scale_outputs(float *y, const float *scales, const float *bias, long M, long N, long p, int np) {
    long n0 = p * 16, n1 = (p + np) * 16 < N ? (p + np) * 16 : N;
    for (long m = 0; m < M; m++)
        for (long n = n0; n < n1; n++) y[m * N + n] = y[m * N + n] * scales[n] + (bias ? bias[n] : 0.0f);
}

#define INT8_GROUP 4 /* panels dequantised together: 4 x K2 x 64 bytes of scratch (192 KiB at K = 1536) */

/* y[M, N] = bf16(x)[M, K] . (scale * W8)^T + bias, W8 packed as int8 panels[ceil(N / 16)][K2][16][2] with K2 as
   the bf16 product of this CPU takes it (ceil(K / 2), rounded up to whole tiles of 16 on AMX); scales[N]. */
void tasc_gemm_int8(const float *x, const int8_t *panels, const float *scales, const float *bias, float *y, long M,
                    long N, long K, int threads) {
    int amx = tasc_gemm_has_amx();
    long K2 = (K + 1) / 2, K2p = amx ? (K2 + 15) / 16 * 16 : K2, Mp = (M + 15) / 16 * 16, total = (N + 15) / 16;
    uint32_t *xp = calloc((amx ? Mp : M) * K2p, sizeof(uint32_t));
    round_rows(x, xp, M, K, K2p);
    int np = amx ? INT8_GROUP : M <= 2 ? 8 : M <= 4 ? 4 : 2;
#pragma omp parallel num_threads(threads)
    {
        uint16_t *scratch = malloc(sizeof(uint16_t) * 8 * K2p * 32);
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
        if (amx) load_tile_config();
#endif
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        long first = total * t / n, last = total * (t + 1) / n;
        for (long p = first; p < last; p += np) {
            int group = last - p < np ? (int)(last - p) : np;
            dequantise(panels + p * K2p * 32, scratch, group * K2p * 32);
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
            if (amx) {
                amx_group(xp, scratch, NULL, y, M, Mp, N, K2p, p, group);
                scale_outputs(y, scales, bias, M, N, p, group);
                continue;
            }
#endif
            for (int j = 0; j < group;) { /* the bf16 product's own grouping of panels */
                int take = group - j >= np ? np : 1;
                panel_group_bf16(xp, scratch + j * K2p * 32, NULL, y, M, N, K2p, p + j, take);
                j += take;
            }
            scale_outputs(y, scales, bias, M, N, p, group);
        }
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
        if (amx) _tile_release();
#endif
        free(scratch);
    }
    free(xp);
}
#else
int tasc_gemm_has_bf16(void) { return 0; }
int tasc_gemm_has_amx(void) { return 0; }
#endif

/* ----- w8a8: int8 weights and int8 inputs, exact integer sums -----

   W is int8 with one float32 scale per output (as for int8 above), packed as quads along k,
   panels[N / 16][K4][16][4] (K4 = ceil(K / 4), zero-padded). Each row of x is rounded to int8 with a scale of its
   own (its largest |x| maps to 127) and stored offset by 128 as unsigned bytes, since AVX512-VNNI's `vpdpbusd`
   multiplies unsigned by signed bytes: one instruction adds x[k..k+3] . w[n, k..k+3] to 16 int32 sums, twice the
   multiply-adds of `vdpbf16ps` from half its weight bytes. The offset comes back out through each output's weight
   sum, sum_k (xq + 128) w = sum_k xq w + 128 sum_k w, and
   y[m, n] = (acc - 128 colsum[n]) * scale_w[n] * scale_x[m] + bias[n].
   Integer sums are exact in any order and a row's scale depends on that row alone: a row's result does not depend
   on its batch. */
#ifdef __AVX512VNNI__
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

/* x[M, K] as offset int8 quads along k (row m at xq + m * K4) and each row's scale; padding k reads as 0. */
static void quantise_rows(const float *x, uint32_t *xq, float *sx, long M, long K, long K4) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to the nearest integer, ties to even */
    for (long m = 0; m < M; m++) {
        const float *row = x + m * K;
        float largest = 0.0f;
        for (long k = 0; k < K; k++) largest = row[k] > largest ? row[k] : -row[k] > largest ? -row[k] : largest;
        float inv = largest > 0.0f ? 127.0f / largest : 1.0f;
        sx[m] = largest > 0.0f ? largest / 127.0f : 1.0f;
        uint8_t *out = (uint8_t *)(xq + m * K4);
        for (long k = 0; k < 4 * K4; k++) {
            float r = k < K ? (row[k] * inv + magic) - magic : 0.0f;
            int q = r > 127.0f ? 127 : r < -127.0f ? -127 : (int)r;
            out[k] = (uint8_t)(q + 128);
        }
    }
}

static inline __attribute__((always_inline)) void block_w8a8(const uint32_t *xq, const int8_t *w,
                                                              const int32_t *colsum, const float *scales,
                                                              const float *sx, const float *bias, float *y, long N,
                                                              long K4, long m0, long p0, int mb, int np) {
    __m512i acc[12][8];
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < np; j++) acc[i][j] = _mm512_setzero_si512();
    for (long k = 0; k < K4; k++) {
        __m512i wv[8];
        for (int j = 0; j < np; j++) wv[j] = _mm512_loadu_si512((const void *)(w + (j * K4 + k) * 64));
        for (int i = 0; i < mb; i++) {
            __m512i xb = _mm512_set1_epi32((int)xq[(m0 + i) * K4 + k]);
            for (int j = 0; j < np; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xb, wv[j]);
        }
    }
    for (int j = 0; j < np; j++) {
        long n0 = (p0 + j) * 16;
        int width = N - n0 < 16 ? (int)(N - n0) : 16;
        __m512i offset = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(colsum + n0)), 7);
        __m512 sw = _mm512_loadu_ps(scales + n0), b = bias ? _mm512_loadu_ps(bias + n0) : _mm512_setzero_ps();
        for (int i = 0; i < mb; i++) {
            __m512 sums = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j], offset));
            __m512 out = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(sums, sw), _mm512_set1_ps(sx[m0 + i])), b);
            memcpy(y + (m0 + i) * N + n0, &out, sizeof(float) * width);
        }
    }
}

#define W8A8_BLOCK(M0, MB, NP) block_w8a8(xq, w, colsum, scales, sx, bias, y, N, K4, M0, p, MB, NP)
static void panel_group_w8a8(const uint32_t *xq, const int8_t *w, const int32_t *colsum, const float *scales,
                             const float *sx, const float *bias, float *y, long M, long N, long K4, long p, int np) {
    PANEL_GROUP(W8A8_BLOCK)
}

int tasc_gemm_has_w8a8(void) { return 1; }

/* y[M, N] = q(x)[M, K] . (scale * W8)^T + bias, W8 packed as int8 quads panels[ceil(N / 16)][K4][16][4] with
   colsum[n] = sum_k W8[n, k]; scales, colsum and bias padded to the panels' width. */
void tasc_gemm_w8a8(const float *x, const int8_t *panels, const int32_t *colsum, const float *scales,
                    const float *bias, float *y, long M, long N, long K, int threads) {
    long K4 = (K + 3) / 4, total = (N + 15) / 16;
    uint32_t *xq = malloc(sizeof(uint32_t) * M * K4);
    float *sx = malloc(sizeof(float) * M);
    quantise_rows(x, xq, sx, M, K, K4);
    int np = M <= 2 ? 8 : M <= 4 ? 4 : 2;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        long first = total * t / n, last = total * (t + 1) / n, p = first;
        for (; p + np <= last; p += np)
            panel_group_w8a8(xq, panels + p * K4 * 64, colsum, scales, sx, bias, y, M, N, K4, p, np);
        for (; p < last; p++) panel_group_w8a8(xq, panels + p * K4 * 64, colsum, scales, sx, bias, y, M, N, K4, p, 1);
    }
    free(xq);
    free(sx);
}
#else
int tasc_gemm_has_w8a8(void) { return 0; }
#endif
