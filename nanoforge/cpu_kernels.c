/*
 * Matrix products for decoding on a CPU: a few rows of activations x (M, K) times a weight W (N, K) stored
 * as nn.Linear stores it, y (M, N) = x W^T. Decoding one token reads every weight once and does two flops
 * with each, so the time is the time to stream W from memory: the loops below read each weight row once,
 * for all M rows of x, on all threads (torch's own matmul runs this shape on one core here).
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

/* float32: y = x W^T. Four accumulators of 8 lanes each keep four FMAs in flight; each thread takes a
 * contiguous run of W's rows (a static schedule), so a thread streams its part of W front to back. */
void linear_f32(const float *x, const float *w, float *y, int64_t M, int64_t K, int64_t N, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const float *wn = w + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * K;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            int64_t k = 0;
            for (; k + 32 <= K; k += 32) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k), _mm256_loadu_ps(wn + k), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k + 8), _mm256_loadu_ps(wn + k + 8), a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k + 16), _mm256_loadu_ps(wn + k + 16), a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k + 24), _mm256_loadu_ps(wn + k + 24), a3);
            }
            float acc = sum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
            for (; k < K; k++)  /* K not a multiple of 32: the rest one at a time */
                acc += xm[k] * wn[k];
            y[m * N + n] = acc;
        }
    }
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

/* Block b's integer dot product of x and w (32 int8 each), as 8 float lanes that sum to it. It is exact:
 * maddubs multiplies unsigned by signed bytes and adds pairs into 16 bits, so x's signs move onto w
 * (sign_epi8) and x goes in as |x|; |x|, |w| <= 127 keep a pair's sum under 2^15. madd then adds pairs of
 * 16-bit sums into eight 32-bit lanes. */
static inline __m256 block_dot(const int8_t *x, const int8_t *w, int64_t b) {
    __m256i xb = _mm256_loadu_si256((const __m256i *)(x + b * 32));
    __m256i wb = _mm256_loadu_si256((const __m256i *)(w + b * 32));
    __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(xb, xb), _mm256_sign_epi8(wb, xb));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

/* int8 weights with one float scale per row: y = x (w * s)^T, x rounded to int8 in blocks of 32 first
 * (quantize_blocks), so y[m, n] = s[n] * sum over blocks b of d[m, b] * (block b's integer dot product).
 * K is a multiple of 32. Returns nonzero if there was no memory for x's int8 copy. */
int linear_q8(const float *x, const int8_t *w, const float *s, float *y, int64_t M, int64_t K, int64_t N,
              int threads) {
    const int64_t B = K / 32;
    int8_t *qx = malloc(M * K);
    float *dx = malloc(M * B * sizeof(float));
    if (!qx || !dx) {
        free(qx);
        free(dx);
        return 1;
    }
    quantize_blocks(x, qx, dx, M * B);  /* M * K values: microseconds, next to reading w */
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *wn = w + n * K;
        for (int64_t m = 0; m < M; m++) {
            const int8_t *qm = qx + m * K;
            const float *dm = dx + m * B;
            /* four blocks a step, into four sums: a sum's multiply-add waits for its previous one, so
             * four independent ones keep the multipliers busy (one sum ran ~15% slower) */
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            int64_t b = 0;
            for (; b + 4 <= B; b += 4) {
                a0 = _mm256_fmadd_ps(block_dot(qm, wn, b), _mm256_set1_ps(dm[b]), a0);
                a1 = _mm256_fmadd_ps(block_dot(qm, wn, b + 1), _mm256_set1_ps(dm[b + 1]), a1);
                a2 = _mm256_fmadd_ps(block_dot(qm, wn, b + 2), _mm256_set1_ps(dm[b + 2]), a2);
                a3 = _mm256_fmadd_ps(block_dot(qm, wn, b + 3), _mm256_set1_ps(dm[b + 3]), a3);
            }
            for (; b < B; b++)
                a0 = _mm256_fmadd_ps(block_dot(qm, wn, b), _mm256_set1_ps(dm[b]), a0);
            y[m * N + n] = sum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) * s[n];
        }
    }
    free(qx);
    free(dx);
    return 0;
}
