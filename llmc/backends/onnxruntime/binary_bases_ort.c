/* llmc.BinaryBasesLinear: y = x Wᵀ with W = Σ_i α_i ⊙ B_i read from its packed signs (llmc::binary_bases_linear).

   Inputs: x float [..., K]; signs uint8 [nb, N, K/8] (bit t of byte j is B_i[n, 8j + t] > 0, low bit
   first); scales float [nb, N, G] (one per basis, row and group of K/G inputs); optionally the kept
   outliers, column indices int32 [N, k] and values float [N, k], added as y[n] += Σ_j values[n, j]
   x[index[n, j]] (qbb_quant's `outliers`). Output y float [..., N].

   A sign is a choice between adding and subtracting its input, which is what AVX-512's masked
   arithmetic does with the bits as they are stored: for 16 inputs, two bytes of signs are the mask of
   one masked multiply-add acc += α_i·x over the lanes whose sign is +1. Over a row that sums
   α_i·(Σ_{B=+1} x); with Σ_all x per group precomputed, Σ_k B_k x_k = 2 Σ_{B=+1} x_k − Σ_all x_k, so a
   row and basis cost K/16 masked multiply-adds and no table. Up to DECODE_TOKENS tokens take this
   path, split by rows over the pool; more tokens (a batch of 8, a prompt) dequantize blocks of rows
   to float and multiply them with every token (llmc_multiply_rows, the block path of llmc.VQLinear). Without
   AVX-512, or when a group is not a multiple of 16 inputs, the same sums run in portable C.
*/

#include <stdlib.h>
#include <string.h>

#include "llmc_ort_ops.h"

/* Up to DECODE_TOKENS tokens take the masked multiply-adds, more the dequantized blocks: single-thread ctypes
   timings at 1536x576 and 576x1536 with 4 bases, masks / blocks: 4 tokens 274 / 317 and 268 / 290 us,
   8 tokens 510 / 411 and 507 / 351 us (a token costs its own multiply-adds per basis on the mask path, one
   per weight on the block path). */
enum { DECODE_TOKENS = 4, ROWS_PER_TASK = 32, BLOCK_ROWS_BB = 32 };

typedef struct {
    const llmc_bb_args *a;
    float *group_sums; /* [T, G]: Σ x over each group, per token */
    int fast;
    volatile int failed;
} bb_job;

/* Rows n0 .. n1 of every token, portable: the bits one by one. */
static void rows_portable(const bb_job *job, int64_t n0, int64_t n1) {
    const llmc_bb_args *a = job->a;
    const int64_t K = a->K, G = a->G, width = K / G, J = K / 8;
    for (int64_t t = 0; t < a->T; t++) {
        const float *x = a->x + t * K;
        for (int64_t n = n0; n < n1; n++) {
            float y = 0.0f;
            for (int64_t i = 0; i < a->nb; i++) {
                const uint8_t *s = a->signs + (i * a->N + n) * J;
                const float *alpha = a->scales + (i * a->N + n) * G;
                for (int64_t g = 0; g < G; g++) {
                    float plus = 0.0f;
                    for (int64_t k = g * width; k < (g + 1) * width; k++)
                        if (s[k / 8] >> (k % 8) & 1) plus += x[k];
                    y += alpha[g] * (2.0f * plus - job->group_sums[t * G + g]);
                }
            }
            a->y[t * a->N + n] = y;
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,fma")))

/* The 16 signs of a chunk as a mask (the first input in the low bit), loaded straight into a mask register
   (kmovw from memory is a load; from a general register it would take the port of half the multiply-adds). */
AVX512 static inline __mmask16 mask_at(const uint8_t *signs, int64_t chunk) {
    __mmask16 m;
    __asm__("kmovw %1, %0" : "=k"(m) : "m"(*(const uint16_t *)(const void *)(signs + 2 * chunk)));
    return m;
}

/* Rows n0 .. n1, AVX-512, for T tokens (T <= DECODE_TOKENS, a constant where called): per row, token and
   group, 2·Σ_i α_i Σ_{B=+1} x
   in two accumulators (even and odd chunks: independent chains of multiply-adds), minus Σ_i α_i · Σ x. */
AVX512 static inline __attribute__((always_inline)) void rows_tokens(const bb_job *job, int64_t n0, int64_t n1,
                                                                      const int64_t T) {
    const llmc_bb_args *a = job->a;
    const int64_t K = a->K, G = a->G, chunks = K / 16 / G, J = K / 8;
    for (int64_t n = n0; n < n1; n++) {
        float y[DECODE_TOKENS] = {0};
        for (int64_t g = 0; g < G; g++) {
            __m512 even[DECODE_TOKENS], odd[DECODE_TOKENS];
            for (int64_t t = 0; t < T; t++) even[t] = odd[t] = _mm512_setzero_ps();
            float alpha_sum = 0.0f;
            for (int64_t i = 0; i < a->nb; i++) {
                const uint8_t *s = a->signs + (i * a->N + n) * J;
                const float alpha = a->scales[(i * a->N + n) * G + g];
                const __m512 w = _mm512_set1_ps(alpha);
                alpha_sum += alpha;
                int64_t c = g * chunks;
                for (; c + 1 < (g + 1) * chunks; c += 2) {
                    const __mmask16 m0 = mask_at(s, c), m1 = mask_at(s, c + 1);
                    for (int64_t t = 0; t < T; t++) {
                        const float *x = a->x + t * K + c * 16;
                        even[t] = _mm512_mask3_fmadd_ps(w, _mm512_loadu_ps(x), even[t], m0);
                        odd[t] = _mm512_mask3_fmadd_ps(w, _mm512_loadu_ps(x + 16), odd[t], m1);
                    }
                }
                if (c < (g + 1) * chunks) {
                    const __mmask16 m0 = mask_at(s, c);
                    for (int64_t t = 0; t < T; t++)
                        even[t] = _mm512_mask3_fmadd_ps(w, _mm512_loadu_ps(a->x + t * K + c * 16), even[t], m0);
                }
            }
            for (int64_t t = 0; t < T; t++)
                y[t] += 2.0f * _mm512_reduce_add_ps(_mm512_add_ps(even[t], odd[t])) -
                        alpha_sum * job->group_sums[t * G + g];
        }
        for (int64_t t = 0; t < T; t++) a->y[t * a->N + n] = y[t];
    }
}

/* One token and up to 4 bases: per 32 inputs, two loads of x serve every basis (the bases inner), and each
   basis keeps two chains of multiply-adds (even and odd chunks), 8 independent chains in all. */
AVX512 static void rows_one_token(const bb_job *job, int64_t n0, int64_t n1) {
    const llmc_bb_args *a = job->a;
    const int64_t K = a->K, G = a->G, chunks = K / 16 / G, J = K / 8, nb = a->nb;
    const float *x = a->x;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *s0 = a->signs + n * J, *s1 = s0 + a->N * J * (nb > 1), *s2 = s0 + 2 * a->N * J * (nb > 2),
                      *s3 = s0 + 3 * a->N * J * (nb > 3);
        float y = 0.0f;
        for (int64_t g = 0; g < G; g++) {
            float alpha[4] = {0.0f, 0.0f, 0.0f, 0.0f}, alpha_sum = 0.0f;
            for (int64_t i = 0; i < nb; i++) alpha_sum += (alpha[i] = a->scales[(i * a->N + n) * G + g]);
            const __m512 w0 = _mm512_set1_ps(alpha[0]), w1 = _mm512_set1_ps(alpha[1]), w2 = _mm512_set1_ps(alpha[2]),
                         w3 = _mm512_set1_ps(alpha[3]);
            __m512 e0 = _mm512_setzero_ps(), e1 = e0, e2 = e0, e3 = e0, o0 = e0, o1 = e0, o2 = e0, o3 = e0;
            int64_t c = g * chunks;
            const int64_t end = (g + 1) * chunks;
            for (; c + 1 < end; c += 2) { /* a basis past nb has scale 0 and reads basis 0's signs */
                const __m512 xe = _mm512_loadu_ps(x + c * 16), xo = _mm512_loadu_ps(x + c * 16 + 16);
                e0 = _mm512_mask3_fmadd_ps(w0, xe, e0, mask_at(s0, c));
                o0 = _mm512_mask3_fmadd_ps(w0, xo, o0, mask_at(s0, c + 1));
                e1 = _mm512_mask3_fmadd_ps(w1, xe, e1, mask_at(s1, c));
                o1 = _mm512_mask3_fmadd_ps(w1, xo, o1, mask_at(s1, c + 1));
                e2 = _mm512_mask3_fmadd_ps(w2, xe, e2, mask_at(s2, c));
                o2 = _mm512_mask3_fmadd_ps(w2, xo, o2, mask_at(s2, c + 1));
                e3 = _mm512_mask3_fmadd_ps(w3, xe, e3, mask_at(s3, c));
                o3 = _mm512_mask3_fmadd_ps(w3, xo, o3, mask_at(s3, c + 1));
            }
            if (c < end) {
                const __m512 xe = _mm512_loadu_ps(x + c * 16);
                e0 = _mm512_mask3_fmadd_ps(w0, xe, e0, mask_at(s0, c));
                e1 = _mm512_mask3_fmadd_ps(w1, xe, e1, mask_at(s1, c));
                e2 = _mm512_mask3_fmadd_ps(w2, xe, e2, mask_at(s2, c));
                e3 = _mm512_mask3_fmadd_ps(w3, xe, e3, mask_at(s3, c));
            }
            const __m512 sum = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(e0, o0), _mm512_add_ps(e1, o1)),
                                             _mm512_add_ps(_mm512_add_ps(e2, o2), _mm512_add_ps(e3, o3)));
            y += 2.0f * _mm512_reduce_add_ps(sum) - alpha_sum * job->group_sums[g];
        }
        a->y[n] = y;
    }
}

/* rows_tokens with T a constant, so that its accumulators stay in registers; one token with at most 4 bases
   takes rows_one_token. */
AVX512 static void rows_avx512(const bb_job *job, int64_t n0, int64_t n1) {
    if (job->a->T == 1 && job->a->nb <= 4) {
        rows_one_token(job, n0, n1);
        return;
    }
    switch (job->a->T) {
    case 1: rows_tokens(job, n0, n1, 1); break;
    case 2: rows_tokens(job, n0, n1, 2); break;
    case 3: rows_tokens(job, n0, n1, 3); break;
    default: rows_tokens(job, n0, n1, DECODE_TOKENS); break;
    }
}

/* W rows n0 .. n1 as float [rows, K]: per 16 inputs, Σ_i ±α_i picked by the mask. */
AVX512 static void dequantize_avx512(const llmc_bb_args *a, int64_t n0, int64_t n1, float *w) {
    const int64_t K = a->K, G = a->G, chunks = K / 16 / G, J = K / 8;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t c = 0; c < K / 16; c++) {
            __m512 v = _mm512_setzero_ps();
            for (int64_t i = 0; i < a->nb; i++) {
                const __m512 alpha = _mm512_set1_ps(a->scales[(i * a->N + n) * G + c / chunks]);
                const __mmask16 m = mask_at(a->signs + (i * a->N + n) * J, c);
                v = _mm512_add_ps(v, _mm512_mask_blend_ps(m, _mm512_sub_ps(_mm512_setzero_ps(), alpha), alpha));
            }
            _mm512_storeu_ps(w + (n - n0) * K + c * 16, v);
        }
}
#else
static void rows_avx512(const bb_job *job, int64_t n0, int64_t n1) { rows_portable(job, n0, n1); }
#endif

static void dequantize_portable(const llmc_bb_args *a, int64_t n0, int64_t n1, float *w) {
    const int64_t K = a->K, G = a->G, width = K / G, J = K / 8;
    for (int64_t n = n0; n < n1; n++) {
        float *row = w + (n - n0) * K;
        memset(row, 0, sizeof(float) * K);
        for (int64_t i = 0; i < a->nb; i++) {
            const uint8_t *s = a->signs + (i * a->N + n) * J;
            const float *alpha = a->scales + (i * a->N + n) * G;
            for (int64_t k = 0; k < K; k++) row[k] += (s[k / 8] >> (k % 8) & 1) ? alpha[k / width] : -alpha[k / width];
        }
    }
}

/* The kept outliers of rows n0 .. n1, every token: y[t, n] += Σ_j values[n, j] x[t, index[n, j]]. An index
   outside the input width is skipped and fails the call (failed = 1), checked where it is read. */
static void add_outliers(bb_job *job, int64_t n0, int64_t n1) {
    const llmc_bb_args *a = job->a;
    if (!a->outliers) return;
    for (int64_t t = 0; t < a->T; t++) {
        const float *x = a->x + t * a->K;
        for (int64_t n = n0; n < n1; n++) {
            const int32_t *index = a->outlier_index + n * a->outliers;
            const float *values = a->outlier_values + n * a->outliers;
            float sum = 0.0f;
            for (int64_t j = 0; j < a->outliers; j++) {
                if ((uint64_t)(int64_t)index[j] >= (uint64_t)a->K) {
                    job->failed = 1; /* (a racy store of the same value) */
                    continue;
                }
                sum += values[j] * x[index[j]];
            }
            a->y[t * a->N + n] += sum;
        }
    }
}

static void decode_task(void *arg, size_t i) {
    bb_job *job = (bb_job *)arg;
    const int64_t n0 = (int64_t)i * ROWS_PER_TASK, n1 = n0 + ROWS_PER_TASK < job->a->N ? n0 + ROWS_PER_TASK : job->a->N;
    if (job->fast)
        rows_avx512(job, n0, n1);
    else
        rows_portable(job, n0, n1);
    add_outliers(job, n0, n1);
}

static void block_task_bb(void *arg, size_t i) {
    bb_job *job = (bb_job *)arg;
    const llmc_bb_args *a = job->a;
    const int64_t n0 = (int64_t)i * BLOCK_ROWS_BB, n1 = n0 + BLOCK_ROWS_BB < a->N ? n0 + BLOCK_ROWS_BB : a->N;
    float *w = (float *)malloc(sizeof(float) * (size_t)((n1 - n0) * a->K));
    if (!w) {
        job->failed = 2;
        return;
    }
#if defined(__x86_64__) && defined(__GNUC__)
    if (job->fast)
        dequantize_avx512(a, n0, n1, w);
    else
#endif
        dequantize_portable(a, n0, n1, w);
    llmc_multiply_rows(a->x, a->T, (int)a->K, w, (int)(n1 - n0), a->y, (int)a->N, (int)n0);
    free(w);
    add_outliers(job, n0, n1);
}

int llmc_binary_bases_linear_run(const llmc_bb_args *a, parallel_fn parallel, void *context) {
    if (a->K % 8 || a->G < 1 || a->K % a->G || a->nb < 1 || a->outliers < 0) return 1;
    bb_job job = {a, NULL, llmc_has_avx512() && llmc_vq_isa_limit >= 1 && (a->K / a->G) % 16 == 0, 0};
    if (a->T == 0 || a->N == 0) return 0;
    if (a->T > DECODE_TOKENS) {
        parallel(context, block_task_bb, (size_t)((a->N + BLOCK_ROWS_BB - 1) / BLOCK_ROWS_BB), &job);
        return job.failed;
    }
    float *sums = (float *)malloc(sizeof(float) * (size_t)(a->T * a->G));
    if (!sums) return 2;
    const int64_t width = a->K / a->G;
    for (int64_t t = 0; t < a->T; t++)
        for (int64_t g = 0; g < a->G; g++) {
            float s = 0.0f;
            for (int64_t k = 0; k < width; k++) s += a->x[t * a->K + g * width + k];
            sums[t * a->G + g] = s;
        }
    job.group_sums = sums;
    parallel(context, decode_task, (size_t)((a->N + ROWS_PER_TASK - 1) / ROWS_PER_TASK), &job);
    free(sums);
    return job.failed;
}

int llmc_binary_bases_linear(const llmc_bb_args *a) { return llmc_binary_bases_linear_run(a, llmc_serial, NULL); }
