/*
 * Matrix products for decoding on a CPU: a few rows of activations x (M, K) times a weight W (N, K), y (M, N)
 * = x W^T. Decoding one token reads every weight once and does two flops with each, so the time is the time
 * to stream W from memory: the loops below read each weight once, for all M rows of x, on all threads
 * (torch's own matmul runs this shape on one core here), in the order it is stored: W is packed beforehand
 * (cpu_kernels.py's pack_f32 and pack_q8) so that order is front to back. At the end, attend_one: attention
 * of one query a sequence against its cached keys and values, every decoding step's.
 *
 * Built by cpu_kernels.py with the machine's C compiler (-O3 -march=native -fopenmp) on first use; needs
 * AVX2 and FMA (x86-64 CPUs since 2013-2015). Elsewhere cpu_kernels.py reports it unavailable and the
 * model runs on torch's matmuls, the reference these are tested against.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "these kernels need AVX2 and FMA"
#endif

/* the sum of a register's 8 floats */
static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  /* 4 lanes */
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                          /* 2 */
    s = _mm_add_ss(s, _mm_movehdup_ps(s));                                           /* 1 */
    return _mm_cvtss_f32(s);
}

/* Eight weights from w + i as float32: w holds float32, or bfloat16 (bf16 nonzero), whose 16 bits are a
 * float32's upper half, so widening is exact: a shift, on any AVX2 CPU (no bf16 instructions needed). */
static inline __m256 load8(const void *w, int64_t i, int bf16) {
    if (!bf16)
        return _mm256_loadu_ps((const float *)w + i);
    __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}

/* Row xm of x (K floats) times the four rows of a packed group, its blocks [b0, b1), the group's block b at
 * w + wg + 64 b (float32, or bfloat16 if bf16): y's four sums, into out. Two accumulators a row of the group
 * (the block's two halves): eight FMA chains in flight. */
static inline __attribute__((always_inline)) void group_row(const float *xm, const void *w, int64_t wg, int64_t b0,
                                                            int64_t b1, int bf16, float out[4]) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps();
    for (int64_t b = b0; b < b1; b++) {
        const int64_t wb = wg + b * 64;  /* block b of the four rows */
        __m256 x0 = _mm256_loadu_ps(xm + b * 16), x1 = _mm256_loadu_ps(xm + b * 16 + 8);
        a0 = _mm256_fmadd_ps(x0, load8(w, wb, bf16), a0);
        c0 = _mm256_fmadd_ps(x1, load8(w, wb + 8, bf16), c0);
        a1 = _mm256_fmadd_ps(x0, load8(w, wb + 16, bf16), a1);
        c1 = _mm256_fmadd_ps(x1, load8(w, wb + 24, bf16), c1);
        a2 = _mm256_fmadd_ps(x0, load8(w, wb + 32, bf16), a2);
        c2 = _mm256_fmadd_ps(x1, load8(w, wb + 40, bf16), c2);
        a3 = _mm256_fmadd_ps(x0, load8(w, wb + 48, bf16), a3);
        c3 = _mm256_fmadd_ps(x1, load8(w, wb + 56, bf16), c3);
    }
    out[0] = sum8(_mm256_add_ps(a0, c0));
    out[1] = sum8(_mm256_add_ps(a1, c1));
    out[2] = sum8(_mm256_add_ps(a2, c2));
    out[3] = sum8(_mm256_add_ps(a3, c3));
}

/* Row m's four outputs of group g: the first pass over K adds the bias, a later one the sums so far. */
static inline void put4(float *y, const float *bias, const float out[4], int64_t m, int64_t N, int64_t g, int64_t k0) {
    for (int64_t r = 0; r < 4 && 4 * g + r < N; r++)
        y[m * N + 4 * g + r] = out[r] + (k0 ? y[m * N + 4 * g + r] : bias ? bias[4 * g + r] : 0.0f);
}

#define KC 1024  /* weights of a row a pass takes: four rows' 16 KB (float32) stay in the L1 while all of x passes */

/* bf16 with many rows of x: the pass's weights (group g, blocks [b0, b1)) widened once into float32 on the
 * stack, then every row reads those, where widening them again for each row made 16 rows as slow as float32.
 * Widening is exact and the sums run in the same order, so each row's output is what group_row gives it on
 * the bf16 weights: alone or batched, a row gets the same numbers. A function of its own: the 16 KB stay out
 * of the one-row path's frame. */
static __attribute__((noinline)) void widened_pass(const float *x, const uint16_t *w, const float *bias, float *y,
                                                   int64_t M, int64_t K, int64_t N, int64_t g, int64_t k0,
                                                   int64_t b0, int64_t b1) {
    float wide[4 * KC] __attribute__((aligned(32)));
    for (int64_t i = 0; i < (b1 - b0) * 64; i += 8)
        _mm256_store_ps(wide + i, load8(w, g * 4 * K + b0 * 64 + i, 1));
    for (int64_t m = 0; m < M; m++) {
        float out[4];
        group_row(x + m * K, wide, -b0 * 64, b0, b1, 0, out);  /* wide holds block b0 at its start */
        put4(y, bias, out, m, N, g, k0);
    }
}

/* float32 activations: y = x W^T + bias (bias NULL: none; added here, where a separate add took as long as
 * the call), W float32 or bfloat16 (bf16), packed (cpu_kernels.pack_f32, pack_bf16): rows in groups of four,
 * and within a group the four rows' 16 weights of block b side by side, then block b + 1. A thread takes a
 * contiguous run of groups (a static schedule) and streams it front to back: each load of x feeds four rows'
 * FMAs, and four separate rows read in place were four streams (27.8-22.8 GB/s from memory on an AMD Zen 4
 * that way, 32.6-28.3 packed). The last group is padded with zero rows, whose outputs are not written. K is
 * a multiple of 16. Inlined into linear_f32 and linear_bf16 with bf16 a constant, so each has its own loop. */
#define WIDEN_ROWS 8  /* bf16 from this many rows on widens each pass once (widened_pass); fewer, in the loop */
static inline __attribute__((always_inline)) void linear16(const float *x, const void *w, const float *bias,
                                                           float *y, int64_t M, int64_t K, int64_t N, int threads,
                                                           int bf16) {
    const int64_t G = (N + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < G; g++) {
        for (int64_t k0 = 0; k0 < K; k0 += KC) {  /* one pass for K <= KC; partial sums into y otherwise */
            const int64_t b0 = k0 / 16, b1 = (k0 + KC < K ? k0 + KC : K) / 16;
            if (bf16 && M >= WIDEN_ROWS) {
                widened_pass(x, w, bias, y, M, K, N, g, k0, b0, b1);
                continue;
            }
            for (int64_t m = 0; m < M; m++) {
                float out[4];
                group_row(x + m * K, w, g * 4 * K, b0, b1, bf16, out);
                put4(y, bias, out, m, N, g, k0);
            }
        }
    }
}

void linear_f32(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t K, int64_t N,
                int threads) {
    linear16(x, w, bias, y, M, K, N, threads, 0);
}

void linear_bf16(const float *x, const uint16_t *w, const float *bias, float *y, int64_t M, int64_t K, int64_t N,
                 int threads) {
    linear16(x, w, bias, y, M, K, N, threads, 1);
}

/* Activations to int8, as llama.cpp's q8_0 holds them: each block of 32 values shares one scale d (its
 * largest magnitude over 127), value ~= d * q. x has nblocks * 32 floats. */
static void quantize_blocks(const float *x, int8_t *q, float *d, int64_t nblocks) {
    for (int64_t i = 0; i < nblocks; i++) {
        const float *xb = x + i * 32;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++)
            amax = fmaxf(amax, fabsf(xb[j]));
        d[i] = amax / 127.0f;
        float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int j = 0; j < 32; j++)
            q[i * 32 + j] = (int8_t)nearbyintf(xb[j] * inv);
    }
}

/* The integer dot product of 32 int8 of x and 32 of w, as eight 32-bit lanes that sum to it, given
 * ax = |x| (as unsigned bytes) and x itself: x's signs move onto w (sign_epi8), so the products are
 * |x| * (+-w), which is what the instructions take (unsigned by signed bytes). Exact either way: VNNI's
 * dpbusd adds four products into 32 bits; without it maddubs adds pairs into 16 bits (|x|, |w| <= 127
 * keep a pair under 2^15) and madd adds pairs of those into 32. */
static inline __m256i block_dot(__m256i ax, __m256i x, const int8_t *w) {
    __m256i sw = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)w), x);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sw);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), ax, sw);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sw), _mm256_set1_epi16(1));
#endif
}

/* int8 weights with one float scale per row: y = x (w * s)^T + bias (bias NULL: none), x rounded to int8 in
 * blocks of 32 first (quantize_blocks), so y[m, n] = s[n] * sum over blocks b of d[m, b] * (block b's
 * integer dot product).
 * w is packed (cpu_kernels.pack_q8): rows in groups of four, and within a group the four rows' block b
 * side by side, 128 bytes, then their block b + 1: a group streams front to back, where four separate rows
 * were four streams (int8 from memory went from ~24 to ~28 GB/s on an AMD Zen 4). The last group is padded
 * with zero rows, whose outputs are not written. Each block of x is loaded and its signs taken once for four
 * rows. Rows of x go MROWS at a time, so a chunk of them (int8) stays in cache while every group of w
 * passes it (a prompt's prefill: without it, each group would read all of x again from memory). K is a
 * multiple of 32. Returns nonzero if there was no memory for x's int8 copy. */
#define MROWS 64
int linear_q8(const float *x, const int8_t *w, const float *s, const float *bias, float *y, int64_t M, int64_t K,
              int64_t N, int threads) {
    const int64_t B = K / 32, G = (N + 3) / 4;
    int8_t *qx = malloc(M * K);
    float *dx = malloc(M * B * sizeof(float));
    if (!qx || !dx) {
        free(qx);
        free(dx);
        return 1;
    }
    quantize_blocks(x, qx, dx, M * B);  /* M * K values: microseconds, next to reading w */
    for (int64_t m0 = 0; m0 < M; m0 += MROWS) {
        const int64_t m1 = m0 + MROWS < M ? m0 + MROWS : M;
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t g = 0; g < G; g++) {
            const int8_t *wg = w + g * 4 * K;
            for (int64_t m = m0; m < m1; m++) {
                const int8_t *qm = qx + m * K;
                const float *dm = dx + m * B;
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
                for (int64_t b = 0; b < B; b++) {
                    const int8_t *wb = wg + b * 128;  /* block b of the four rows */
                    /* ask for the two cache lines 4 KiB ahead: the hardware's prefetcher alone left int8 at
                     * 16 GB/s from memory on a Sapphire Rapids-class Xeon (float32, 4x the bytes a step,
                     * reaches the copy rate without) */
                    _mm_prefetch((const char *)wb + 4096, _MM_HINT_T0);
                    _mm_prefetch((const char *)wb + 4096 + 64, _MM_HINT_T0);
                    __m256i xb = _mm256_loadu_si256((const __m256i *)(qm + b * 32));
                    __m256i ax = _mm256_sign_epi8(xb, xb);
                    __m256 d = _mm256_set1_ps(dm[b]);
                    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(ax, xb, wb)), d, a0);
                    a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(ax, xb, wb + 32)), d, a1);
                    a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(ax, xb, wb + 64)), d, a2);
                    a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(ax, xb, wb + 96)), d, a3);
                }
                const float out[4] = {sum8(a0), sum8(a1), sum8(a2), sum8(a3)};
                for (int64_t r = 0; r < 4 && 4 * g + r < N; r++)
                    y[m * N + 4 * g + r] = out[r] * s[4 * g + r] + (bias ? bias[4 * g + r] : 0.0f);
            }
        }
    }
    free(qx);
    free(dx);
    return 0;
}

/* e^x, eight at a time, for x <= 0 (a score minus the largest): x = n ln2 + r with |r| <= ln2 / 2, e^r by its
 * Taylor series to r^6 (relative error ~1e-7, float32's own), 2^n written into the exponent bits. Below -87,
 * where e^x leaves float32's normal range, it gives 0 (a masked key's -inf too). */
static inline __m256 exp8(__m256 x) {
    const __m256 lowest = _mm256_set1_ps(-87.0f);
    const __m256 gone = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lowest);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* r = x - n ln2, with ln2 in two parts (the first exact in float32 times any n here): no cancellation */
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(gone, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)));
}

/* Attention of one query per sequence and head, decoding's case: y = softmax(scale q k^T) v over the L keys of
 * that sequence and head, leaving out keys whose mask byte is 0 (mask NULL: none). q (B, H, D), k and v
 * (B, H, L, D) and mask (B, H, L) are read through their strides in elements (a cache's keys are a view of a
 * longer buffer; a mask shared by the heads has stride 0 there); y is (B, H, D), contiguous. D a multiple of 8,
 * at most ATTN_D. Each (sequence, head) is one item, on one thread: its scores, then their exponentials and sum,
 * then the weighted sum of the values, in that order whatever else is batched. A sequence with no visible key
 * gets zeros. Returns nonzero if there was no memory for the scores. */
#define ATTN_D 256
int attend_one(const float *q, const float *k, const float *v, const uint8_t *mask, float *y, int64_t B, int64_t H,
               int64_t L, int64_t D, int64_t qb, int64_t qh, int64_t kb, int64_t kh, int64_t kt, int64_t vb,
               int64_t vh, int64_t vt, int64_t mb, int64_t mh, int64_t mt, float scale, int threads) {
    const int64_t L8 = (L + 7) / 8 * 8;  /* the scores padded to whole registers with -inf (weight 0) */
    float *scores = malloc(B * H * L8 * sizeof(float));
    if (!scores)
        return 1;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < B * H; i++) {
        const int64_t b = i / H, h = i % H;
        const float *qi = q + b * qb + h * qh, *ki = k + b * kb + h * kh, *vi = v + b * vb + h * vh;
        const uint8_t *mi = mask ? mask + b * mb + h * mh : NULL;
        float *s = scores + i * L8, top = -INFINITY;
        for (int64_t t = 0; t < L8; t++) {
            if (t >= L || (mi && !mi[t * mt])) {
                s[t] = -INFINITY;
                continue;
            }
            __m256 a = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8)
                a = _mm256_fmadd_ps(_mm256_loadu_ps(qi + d), _mm256_loadu_ps(ki + t * kt + d), a);
            s[t] = sum8(a) * scale;
            top = fmaxf(top, s[t]);
        }
        float *yi = y + i * D;
        if (top == -INFINITY) {  /* nothing visible */
            for (int64_t d = 0; d < D; d++)
                yi[d] = 0.0f;
            continue;
        }
        __m256 total = _mm256_setzero_ps();
        for (int64_t t = 0; t < L8; t += 8) {
            __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), _mm256_set1_ps(top)));
            _mm256_storeu_ps(s + t, p);
            total = _mm256_add_ps(total, p);
        }
        __m256 acc[ATTN_D / 8];
        for (int64_t d = 0; d < D / 8; d++)
            acc[d] = _mm256_setzero_ps();
        for (int64_t t = 0; t < L; t++) {
            if (s[t] == 0.0f)  /* masked, or too small to count */
                continue;
            const __m256 p = _mm256_set1_ps(s[t]);
            for (int64_t d = 0; d < D / 8; d++)
                acc[d] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vi + t * vt + 8 * d), acc[d]);
        }
        const __m256 inv = _mm256_set1_ps(1.0f / sum8(total));
        for (int64_t d = 0; d < D / 8; d++)
            _mm256_storeu_ps(yi + 8 * d, _mm256_mul_ps(acc[d], inv));
    }
    free(scores);
    return 0;
}
