/* The decoder's other reductions for decoding on a CPU, batch-invariant: attention over a KV cache, RMS norm, and
   SiLU(gate) * up, float32.

   Speculative decoding is lossless only if a row's logits do not depend on how many query tokens its pass carries
   or on which rows share the batch. torch's attention and reductions choose their blocking, vector lanes and thread
   split from the shapes, so the same row can round differently in another pass; these functions fix the order of
   every sum instead:

   - attention: each (row, query, head) is computed by one thread alone. Scores are dot products over d in one
     fixed order; the softmax's sum and the weighted sum of values run over the allowed cache slots in slot order,
     one slot at a time (vectors span d, never slots), so masked slots, padding and where a row's slots sit in the
     cache change nothing. A prompt prefix every row shares is read from one copy, its slots before the row's own:
     the same sums in the same order as with the prefix copied into each row (and each row's prefix read from the
     same memory, which stays in cache);
   - RMS norm: each row's sum of squares in one fixed order;
   - exp (softmax, SiLU): one polynomial evaluated the same way in every vector lane, tails padded to a full
     vector, so an element's value does not depend on its position.

   Built with gemm.c into one library by cpu_kernels.py (-O3 -march=native). */

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

typedef float vf __attribute__((vector_size(64)));
typedef int vi __attribute__((vector_size(64)));
#define LANES 16

static inline vf vload(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

static inline vf splat(float x) { return (vf){0} + x; }

static inline vf lanes_where(vi mask, vf yes, vf no) { /* lane-wise mask ? yes : no (C has no vector ?:) */
    vi a, b;
    memcpy(&a, &yes, sizeof a);
    memcpy(&b, &no, sizeof b);
    vi bits = (a & mask) | (b & ~mask);
    vf out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

/* Sum of a vector's lanes in one fixed tree: lane l + lane l + 8, then + 4, + 2, + 1. */
static inline float hsum(vf v) {
    v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return v[0];
}

/* e^x per lane: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative error < 2e-7),
   times 2^n through the exponent bits; below -87 it is 0 (beyond float's normal range). */
static inline vf vexp(vf x) {
    const vf hi = splat(88.0f), lo = splat(-87.0f);
    x = lanes_where(x > hi, hi, x);
    vi tiny = x < lo;
    x = lanes_where(tiny, lo, x);
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vf n = (x * splat(1.44269504f) + magic) - magic;
    vf r = x - n * splat(0.693145752f) - n * splat(1.42860677e-6f);
    vf p = splat(1.0f / 720);
    p = p * r + splat(1.0f / 120);
    p = p * r + splat(1.0f / 24);
    p = p * r + splat(1.0f / 6);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    vf scale;
    memcpy(&scale, &bits, sizeof scale);
    return lanes_where(tiny, (vf){0}, p * scale);
}

#define BLOCK 4 /* queries of one key/value head computed together: each key and value is loaded once for them */

/* The lane partials of q . key: lane l sums the products at d = l, l + 16, ... in order. */
static inline __attribute__((always_inline)) vf partials(const vf *qr, const float *key, const long nv) {
    vf dot = qr[0] * vload(key);
    for (long c = 1; c < nv; c++) dot += qr[c] * vload(key + c * LANES);
    return dot;
}

#define PAIR_LO1 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define PAIR_HI1 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define PAIR_LO2 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27
#define PAIR_HI2 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31
#define PAIR_LO3 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29
#define PAIR_HI3 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31
#define PAIR_LO4 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define PAIR_HI4 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31

/* q . key for 16 consecutive keys at once, lane j the j-th: each key's partials summed in exactly hsum's tree
   (lane l + lane l + 8, then + 4, + 2, + 1), four levels of two keys' halves side by side, so a key's score is the
   same bits whether it is summed here or alone by hsum. */
static inline __attribute__((always_inline)) vf scores16(const vf *qr, const float *keys, const long nv) {
    const long D = nv * LANES;
    vf r1[8], r2[4], r3[2];
    for (int j = 0; j < 8; j++) {
        vf a = partials(qr, keys + 2 * j * D, nv), b = partials(qr, keys + (2 * j + 1) * D, nv);
        r1[j] = __builtin_shufflevector(a, b, PAIR_LO1) + __builtin_shufflevector(a, b, PAIR_HI1);
    }
    for (int j = 0; j < 4; j++)
        r2[j] = __builtin_shufflevector(r1[2 * j], r1[2 * j + 1], PAIR_LO2) +
                __builtin_shufflevector(r1[2 * j], r1[2 * j + 1], PAIR_HI2);
    for (int j = 0; j < 2; j++)
        r3[j] = __builtin_shufflevector(r2[2 * j], r2[2 * j + 1], PAIR_LO3) +
                __builtin_shufflevector(r2[2 * j], r2[2 * j + 1], PAIR_HI3);
    return __builtin_shufflevector(r3[0], r3[1], PAIR_LO4) + __builtin_shufflevector(r3[0], r3[1], PAIR_HI4);
}

typedef unsigned char vbytes __attribute__((vector_size(16)));

/* Scores of n consecutive slots (-inf where not allowed) into ps, 16 at a time, the largest folded into top / best
   (a maximum: the same whatever the grouping). A block of 16 slots none of which is allowed is not computed. */
static inline __attribute__((always_inline)) void score_slots(const vf *qr, const float *keys,
                                                               const unsigned char *ok, float *ps, long n,
                                                               float scale, vf *top_out, float *best_out,
                                                               const long nv) {
    const long D = nv * LANES, whole = n / LANES * LANES;
    vf top = *top_out; /* locals: ps's stores could alias the pointed-to ones */
    float best = *best_out;
    for (long s = 0; s < whole; s += LANES) {
        vbytes bytes;
        memcpy(&bytes, ok + s, sizeof bytes);
        unsigned long long words[2];
        memcpy(words, &bytes, sizeof words);
        vf score = splat(-INFINITY);
        if (words[0] | words[1]) {
            vi mask = __builtin_convertvector(bytes, vi) != 0;
            score = lanes_where(mask, scores16(qr, keys + s * D, nv) * splat(scale), score);
        }
        vstore(ps + s, score);
        top = lanes_where(score > top, score, top);
    }
    for (long s = whole; s < n; s++) {
        float score = ok[s] ? hsum(partials(qr, keys + s * D, nv)) * scale : -INFINITY;
        ps[s] = score;
        best = score > best ? score : best;
    }
    *top_out = top;
    *best_out = best;
}

/* acc[t] += p[t][s] * value[s], total[t] += p[t][s] over n consecutive slots, slot by slot; a slot with p = 0 for
   every query of the block changes no bit (x + 0 = x), so it is skipped. */
static inline __attribute__((always_inline)) void weigh_values(const float *vh, float *const *ps, long n, int nq,
                                                                float *total, vf acc[][16], const long nv) {
    const long D = nv * LANES;
    for (long s = 0; s < n; s++) {
        int any = 0;
        for (int t = 0; t < nq; t++) any |= ps[t][s] != 0.0f;
        if (!any) continue;
        vf value[16];
        for (long c = 0; c < nv; c++) value[c] = vload(vh + s * D + c * LANES);
        for (int t = 0; t < nq; t++) {
            total[t] += ps[t][s];
            vf w = splat(ps[t][s]);
            for (long c = 0; c < nv; c++) acc[t][c] += w * value[c];
        }
    }
}

/* One work item: up to BLOCK queries of key/value head g of row b over its slots, the P slots of the shared prefix
   (pkh/pvh) first, then the row's own S slots (kh/vh): the same arithmetic, in the same slot order, as if the
   prefix were copied in front of the row's slots. */
static inline __attribute__((always_inline)) void attend(const float *q, const float *pkh, const float *pvh,
                                                          const float *kh, const float *vh,
                                                          const unsigned char *allowed, float *out, float *p,
                                                          long b, long g, long first, int n, long Q, long H,
                                                          long groups, long P, long S, float scale, const long nv) {
    const long D = nv * LANES, T = P + S;
    const unsigned char *ok[BLOCK];
    float *o[BLOCK], *ps[BLOCK], best[BLOCK], total[BLOCK];
    vf qr[BLOCK][16], acc[BLOCK][16];
    for (int t = 0; t < n; t++) { /* query t of the block: query index i, head g * groups + j */
        long i = (first + t) / groups, h = g * groups + (first + t) % groups;
        ok[t] = allowed + (b * Q + i) * T;
        o[t] = out + ((b * Q + i) * H + h) * D;
        ps[t] = p + t * (T + LANES);
        best[t] = -INFINITY;
        total[t] = 0.0f;
        for (long c = 0; c < nv; c++) {
            qr[t][c] = vload(q + ((b * Q + i) * H + h) * D + c * LANES);
            acc[t][c] = (vf){0};
        }
    }
    int live = 0;
    for (int t = 0; t < n; t++) { /* scores of the prefix's slots, then the row's */
        vf top = splat(-INFINITY);
        score_slots(qr[t], pkh, ok[t], ps[t], P, scale, &top, &best[t], nv);
        score_slots(qr[t], kh, ok[t] + P, ps[t] + P, S, scale, &top, &best[t], nv);
        for (int l = 0; l < LANES; l++) best[t] = top[l] > best[t] ? top[l] : best[t];
        if (best[t] == -INFINITY) { /* nothing allowed (a padding query): zeros, and out of the block's sums */
            memset(o[t], 0, sizeof(float) * D);
            continue;
        }
        if (live != t) { /* each query's sums are its own: dropping another changes none of its bits */
            ok[live] = ok[t], o[live] = o[t], ps[live] = ps[t], best[live] = best[t];
        }
        live++;
    }
    for (int t = 0; t < live; t++) { /* p = e^(score - best), exactly 0 where not allowed; padded to whole vectors */
        for (long s = 0; s < T; s++) ps[t][s] = ok[t][s] ? ps[t][s] - best[t] : -100.0f;
        for (long s = 0; s < T; s += LANES) vstore(ps[t] + s, vexp(vload(ps[t] + s)));
    }
    float *rows[BLOCK];
    for (int t = 0; t < live; t++) rows[t] = ps[t] + P;
    weigh_values(pvh, ps, P, live, total, acc, nv);
    weigh_values(vh, rows, S, live, total, acc, nv);
    for (int t = 0; t < live; t++) {
        vf inv = splat(1.0f / total[t]);
        for (long c = 0; c < nv; c++) vstore(o[t] + c * LANES, acc[t][c] * inv);
    }
}

/* out[b, i, h, :] = softmax(scale q[b, i, h] . k[s])_s . v[s] over the slots s that allowed[b, i, s] lets query
   (b, i) see, for head h's key/value head g = h / (H / KV) (grouped-query attention). Row b's slots are the P slots
   of a prefix shared by every row (pk/pv: [KV, >= P, D] with head stride prefix_head_stride; may be NULL when
   P = 0), then its own S slots (k/v: [B, KV, >= S, D] with the given batch and head strides, in floats). q and out
   are [B, Q, H, D] contiguous, allowed [B, Q, P + S] bytes. A query with no allowed slot gets zeros. D must be a
   multiple of 16, at most 256.

   Work items are (b, g, a block of up to BLOCK of the Q x H / KV queries that read head g); whichever block a
   query falls in, its arithmetic is the same, one slot at a time. */
void tasc_attention_f32(const float *q, const float *k, const float *v, const float *pk, const float *pv,
                        const unsigned char *allowed, float *out, long B, long Q, long H, long KV, long P, long S,
                        long D, long batch_stride, long head_stride, long prefix_head_stride, float scale,
                        int threads) {
    long groups = H / KV, per_head = Q * groups, blocks = (per_head + BLOCK - 1) / BLOCK;
#pragma omp parallel num_threads(threads)
    {
        float *p = malloc(sizeof(float) * BLOCK * (P + S + LANES));
#pragma omp for schedule(static)
        for (long item = 0; item < B * KV * blocks; item++) {
            long first = (item % blocks) * BLOCK, g = (item / blocks) % KV, b = item / (blocks * KV);
            int n = per_head - first < BLOCK ? (int)(per_head - first) : BLOCK;
            const float *kh = k + b * batch_stride + g * head_stride, *vh = v + b * batch_stride + g * head_stride;
            const float *pkh = P ? pk + g * prefix_head_stride : kh, *pvh = P ? pv + g * prefix_head_stride : vh;
            /* the same code for every head size; compiled apart for the common ones so its loops unroll */
            if (D == 64)
                attend(q, pkh, pvh, kh, vh, allowed, out, p, b, g, first, n, Q, H, groups, P, S, scale, 4);
            else if (D == 128)
                attend(q, pkh, pvh, kh, vh, allowed, out, p, b, g, first, n, Q, H, groups, P, S, scale, 8);
            else
                attend(q, pkh, pvh, kh, vh, allowed, out, p, b, g, first, n, Q, H, groups, P, S, scale, D / LANES);
        }
        free(p);
    }
}

/* y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight, rows of N floats; N a multiple of 16. */
void tasc_rms_norm_f32(const float *x, const float *weight, float *y, long T, long N, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long t = 0; t < T; t++) {
        const float *row = x + t * N;
        vf squares = (vf){0};
        for (long c = 0; c < N; c += LANES) {
            vf r = vload(row + c);
            squares += r * r;
        }
        float inv = 1.0f / sqrtf(hsum(squares) / (float)N + eps);
        for (long c = 0; c < N; c += LANES) vstore(y + t * N + c, vload(row + c) * splat(inv) * vload(weight + c));
    }
}

/* y[t, n] = silu(gu[t, n]) * gu[t, N + n] for rows [gate | up] of 2N floats; N a multiple of 16. */
void tasc_silu_mul_f32(const float *gu, float *y, long T, long N, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long t = 0; t < T; t++)
        for (long c = 0; c < N; c += LANES) {
            vf g = vload(gu + t * 2 * N + c), u = vload(gu + t * 2 * N + N + c);
            vstore(y + t * N + c, g / (splat(1.0f) + vexp(-g)) * u);
        }
}
