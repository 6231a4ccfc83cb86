/* llmc.CQAttention: attention of the queries over a KV cache of coupled-quantization codes, read as codes.

   cq_kv stores every earlier key (before RoPE) and value as one uint8 code per group of c channels
   (llmc/ops/cq.py). The standard lowering gathers the whole cache back into float tensors, rotates
   every key and multiplies, every step and layer. This op reads the codes where they lie: per cached
   position it gathers the key's centroids, rotates them at that position (the keys are stored
   before RoPE, so a per-query table of query·centroid products would need one table per position),
   and takes the dot products of every query row of the KV head with it; the values are summed per
   code (a histogram of the attention weights over each channel group's codes) and multiplied by the
   codebooks once, so a position costs one addition per value group instead of one per channel
   (for short pasts, fewer positions than codes, the centroids are accumulated directly).

   It attends over the P positions of the coded past only and returns the softmax-normalised
   output with the log of its denominator; the lowering (translations.py) attends over the step's
   own tokens with standard ops (matrix products) and merges the two by their log-sum-exp, so a
   prompt keeps ONNX Runtime's GEMMs and a decode step reads its past from codes.

   Inputs:
     q                float [B, H, R, D]     the queries of KV head h folded as rows (R = groups * S), after RoPE
     key_codes        uint8 [B, H, P, Gk]    the cached keys' codes
     value_codes      uint8 [B, H, P, Gv]
     key_codebooks    float [H, Gk, Kk, ck]  D = Gk * ck, Kk <= 256
     value_codebooks  float [H, Gv, Kv, cv]  D = Gv * cv
     cos, signed_sin  float [B|1, 1, Tt, rot]  RoPE tables of the key positions (Tt >= P; the first P are read):
                                               rotated[d] = k[d] cos[d] + k[(d + rot/2) mod rot] signed_sin[d], d < rot
     bias             float [B|1, 1, R, Tb]  additive mask (Tb >= P; the first P columns are read)
     scale            float [1]
   Outputs: out float [B, H, R, D] = softmax(q k̂ᵀ scale + bias) v̂ over the past; lse float [B, H, R, 1]
   (-inf when P = 0, where out is 0).
*/

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "llmc_ort_ops.h"

/* Query rows per task: their scores [rows, P] are one buffer; a decode step has `groups` rows. */
enum { ROW_BLOCK = 32, MAX_HEAD_DIM = 1024, LANES = 16 };

/* x86-64: an AVX-512 and an AVX2 build of the task beside the portable one, picked at load time. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

typedef struct {
    const llmc_cq_attention_args *a;
    int64_t blocks; /* row blocks per (batch, head) */
    int fast;       /* block_avx512 applies */
    volatile int failed;
} cq_job;

/* e^x for x <= 0 to about 2 ulp (Cody-Waite reduction by ln 2, a degree-6 polynomial, the exponent
   put in the bits); 0 below -87 (where float underflows). Plain arithmetic, so loops of it vectorise. */
static inline float exp_nonpositive(float x) {
    const float k = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t e = ((int32_t)k + 127) << 23;
    float two_k;
    memcpy(&two_k, &e, sizeof two_k);
    return x < -87.0f ? 0.0f : p * two_k;
}

/* x · y over n floats, in LANES independent partial sums (which the compiler turns into vectors). */
static inline float dot(const float *restrict x, const float *restrict y, int64_t n) {
    float acc[LANES] = {0};
    int64_t d = 0;
    for (; d + LANES <= n; d += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += x[d + l] * y[d + l];
    float s = 0.0f;
    for (; d < n; d++) s += x[d] * y[d];
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s;
}

/* Key t of the past, gathered from its codes and rotated at its position, into `rotated` [D]. */
static inline void past_key(const llmc_cq_attention_args *a, const uint8_t *codes, const float *codebooks,
                            const float *cos, const float *sin, float *restrict key, float *restrict rotated) {
    const int64_t ck = a->ck, Kk = a->Kk, rot = a->rot, half = a->rot / 2, D = a->D;
    for (int64_t g = 0; g < a->Gk; g++) memcpy(key + g * ck, codebooks + (g * Kk + codes[g]) * ck, sizeof(float) * ck);
    for (int64_t d = 0; d < half; d++) rotated[d] = key[d] * cos[d] + key[d + half] * sin[d];
    for (int64_t d = half; d < rot; d++) rotated[d] = key[d] * cos[d] + key[d - half] * sin[d];
    for (int64_t d = rot; d < D; d++) rotated[d] = key[d];
}

/* Softmax of one row of scores in place (unnormalised weights); returns the row's max and sets *sum. */
static inline float softmax_row(float *s, int64_t n, float *sum) {
    float m = -INFINITY;
    for (int64_t t = 0; t < n; t++) m = s[t] > m ? s[t] : m;
    float acc[LANES] = {0};
    int64_t t = 0;
    for (; t + LANES <= n; t += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += (s[t + l] = exp_nonpositive(s[t + l] - m));
    float total = 0.0f;
    for (; t < n; t++) total += (s[t] = exp_nonpositive(s[t] - m));
    for (int l = 0; l < LANES; l++) total += acc[l];
    *sum = total;
    return m;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,fma")))

/* The AVX-512 path's shapes: 4-channel groups (4c<b>b), whole-head RoPE, D a multiple of 32 up to 128,
   so a head is at most 8 registers and rolling it by D/2 is a rotation of whole registers. */
static int has_avx512(void) {
    static int cpu = -1;
    if (cpu < 0) {
        __builtin_cpu_init();
        cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
    }
    return cpu;
}

static int avx512_path(const llmc_cq_attention_args *a) {
    return has_avx512() && a->ck == 4 && a->cv == 4 && a->rot == a->D && a->D % 32 == 0 && a->D <= 128;
}

/* Centroids of groups g .. g+3 (4 floats each) picked by their codes: one register. */
AVX512 static inline __m512 centroids4(const float *book, int64_t K, const uint8_t *codes, int64_t g) {
    __m512 v = _mm512_castps128_ps512(_mm_loadu_ps(book + (g * K + codes[g]) * 4));
    v = _mm512_insertf32x4(v, _mm_loadu_ps(book + ((g + 1) * K + codes[g + 1]) * 4), 1);
    v = _mm512_insertf32x4(v, _mm_loadu_ps(book + ((g + 2) * K + codes[g + 2]) * 4), 2);
    return _mm512_insertf32x4(v, _mm_loadu_ps(book + ((g + 3) * K + codes[g + 3]) * 4), 3);
}

/* cq_block's work on the AVX-512 path: keys decoded and rotated in registers, one dot product per query
   row; values accumulated per position straight from their centroids (on this path that beats a
   histogram per code, whose scattered additions cost more than the vector multiply-adds). */
AVX512 static int block_avx512(const llmc_cq_attention_args *a, int64_t b, int64_t h, int64_t r0, int64_t rows) {
    const int64_t H = a->H, R = a->R, P = a->P, D = a->D, NV = D / 16, HV = NV / 2, bh = b * H + h;
    const float *q = a->q + (bh * R + r0) * D;
    float *out = a->out + (bh * R + r0) * D, *lse = a->lse + bh * R + r0;
    float *scores = (float *)malloc(sizeof(float) * rows * P);
    if (!scores) return 1;
    const uint8_t *kcodes = a->key_codes + bh * P * a->Gk, *vcodes = a->value_codes + bh * P * a->Gv;
    const float *kbook = a->key_codebooks + h * a->Gk * a->Kk * 4, *vbook = a->value_codebooks + h * a->Gv * a->Kv * 4;
    const float *cos = a->cos + b * a->table_batch_stride, *sin = a->signed_sin + b * a->table_batch_stride;
    const float *bias = a->bias + b * a->bias_batch_stride + r0 * a->bias_cols;
    for (int64_t t = 0; t < P; t++) {
        __m512 k[8], rk[8];
        for (int64_t m = 0; m < NV; m++) k[m] = centroids4(kbook, a->Kk, kcodes + t * a->Gk, 4 * m);
        const float *c = cos + t * D, *s = sin + t * D;
        for (int64_t m = 0; m < NV; m++)
            rk[m] = _mm512_fmadd_ps(k[(m + HV) % NV], _mm512_loadu_ps(s + 16 * m),
                                    _mm512_mul_ps(k[m], _mm512_loadu_ps(c + 16 * m)));
        for (int64_t r = 0; r < rows; r++) {
            const float *qr = q + r * D;
            __m512 acc = _mm512_mul_ps(rk[0], _mm512_loadu_ps(qr));
            for (int64_t m = 1; m < NV; m++) acc = _mm512_fmadd_ps(rk[m], _mm512_loadu_ps(qr + 16 * m), acc);
            scores[r * P + t] = _mm512_reduce_add_ps(acc) * a->scale + bias[r * a->bias_cols + t];
        }
    }
    float sums[ROW_BLOCK];
    for (int64_t r = 0; r < rows; r++) {
        lse[r] = softmax_row(scores + r * P, P, &sums[r]);
        memset(out + r * D, 0, sizeof(float) * D);
    }
    for (int64_t t = 0; t < P; t++) {
        __m512 v[8];
        for (int64_t m = 0; m < NV; m++) v[m] = centroids4(vbook, a->Kv, vcodes + t * a->Gv, 4 * m);
        for (int64_t r = 0; r < rows; r++) {
            const __m512 p = _mm512_set1_ps(scores[r * P + t]);
            float *o = out + r * D;
            for (int64_t m = 0; m < NV; m++)
                _mm512_storeu_ps(o + 16 * m, _mm512_fmadd_ps(p, v[m], _mm512_loadu_ps(o + 16 * m)));
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        const __m512 inv = _mm512_set1_ps(1.0f / sums[r]);
        for (int64_t m = 0; m < NV; m++)
            _mm512_storeu_ps(out + r * D + 16 * m, _mm512_mul_ps(inv, _mm512_loadu_ps(out + r * D + 16 * m)));
        lse[r] += logf(sums[r]);
    }
    free(scores);
    return 0;
}
#else
static int has_avx512(void) { return 0; }
static int avx512_path(const llmc_cq_attention_args *a) { return (void)a, 0; }
static int block_avx512(const llmc_cq_attention_args *a, int64_t b, int64_t h, int64_t r0, int64_t rows) {
    return (void)a, (void)b, (void)h, (void)r0, (void)rows, 1;
}
#endif

/* One (batch, KV head, block of query rows). */
CLONES static void cq_block(void *arg, size_t i) {
    cq_job *job = (cq_job *)arg;
    const llmc_cq_attention_args *a = job->a;
    const int64_t H = a->H, R = a->R, P = a->P, D = a->D, Gv = a->Gv, Kv = a->Kv, cv = a->cv;
    const int64_t b = (int64_t)i / (H * job->blocks), h = ((int64_t)i / job->blocks) % H;
    const int64_t r0 = ((int64_t)i % job->blocks) * ROW_BLOCK, rows = R - r0 < ROW_BLOCK ? R - r0 : ROW_BLOCK;
    const int64_t bh = b * H + h;
    const float *q = a->q + (bh * R + r0) * D;
    float *out = a->out + (bh * R + r0) * D, *lse = a->lse + bh * R + r0;
    if (P == 0) {
        memset(out, 0, sizeof(float) * rows * D);
        for (int64_t r = 0; r < rows; r++) lse[r] = -INFINITY;
        return;
    }
    if (job->fast) {
        if (block_avx512(a, b, h, r0, rows)) job->failed = 1;
        return;
    }
    const int by_code = P > Kv; /* values summed per code, then times the codebook */
    float *scores = (float *)malloc(sizeof(float) * rows * P);
    float *hist = by_code ? (float *)malloc(sizeof(float) * Gv * Kv) : NULL;
    if (!scores || (by_code && !hist)) {
        free(scores);
        free(hist);
        job->failed = 1;
        return;
    }
    float key[MAX_HEAD_DIM], rotated[MAX_HEAD_DIM];
    const uint8_t *kcodes = a->key_codes + bh * P * a->Gk, *vcodes = a->value_codes + bh * P * Gv;
    const float *kbook = a->key_codebooks + h * a->Gk * a->Kk * a->ck, *vbook = a->value_codebooks + h * Gv * Kv * cv;
    const float *cos = a->cos + b * a->table_batch_stride, *sin = a->signed_sin + b * a->table_batch_stride;
    const float *bias = a->bias + b * a->bias_batch_stride + r0 * a->bias_cols;
    for (int64_t t = 0; t < P; t++) {
        past_key(a, kcodes + t * a->Gk, kbook, cos + t * a->rot, sin + t * a->rot, key, rotated);
        for (int64_t r = 0; r < rows; r++)
            scores[r * P + t] = dot(q + r * D, rotated, D) * a->scale + bias[r * a->bias_cols + t];
    }
    for (int64_t r = 0; r < rows; r++) {
        float *p = scores + r * P, *o = out + r * D, sum;
        const float m = softmax_row(p, P, &sum);
        memset(o, 0, sizeof(float) * D);
        if (by_code) {
            memset(hist, 0, sizeof(float) * Gv * Kv);
            for (int64_t t = 0; t < P; t++)
                for (int64_t g = 0; g < Gv; g++) hist[g * Kv + vcodes[t * Gv + g]] += p[t];
            for (int64_t g = 0; g < Gv; g++)
                for (int64_t k = 0; k < Kv; k++) {
                    const float w = hist[g * Kv + k];
                    const float *word = vbook + (g * Kv + k) * cv;
                    for (int64_t c = 0; c < cv; c++) o[g * cv + c] += w * word[c];
                }
        } else {
            for (int64_t t = 0; t < P; t++)
                for (int64_t g = 0; g < Gv; g++) {
                    const float *word = vbook + (g * Kv + vcodes[t * Gv + g]) * cv;
                    for (int64_t c = 0; c < cv; c++) o[g * cv + c] += p[t] * word[c];
                }
        }
        const float inv = 1.0f / sum;
        for (int64_t d = 0; d < D; d++) o[d] *= inv;
        lse[r] = m + logf(sum);
    }
    free(scores);
    free(hist);
}

int llmc_cq_attention_run(const llmc_cq_attention_args *a, parallel_fn parallel, void *context) {
    cq_job job = {a, (a->R + ROW_BLOCK - 1) / ROW_BLOCK, avx512_path(a) && llmc_vq_isa_limit >= 1, 0};
    if (a->R == 0 || a->B == 0 || a->H == 0) return 0;
    parallel(context, cq_block, (size_t)(a->B * a->H * job.blocks), &job);
    return job.failed ? 2 : 0;
}

int llmc_cq_attention(const llmc_cq_attention_args *a) { return llmc_cq_attention_run(a, llmc_serial, NULL); }

/* ------------------------------------------------------------------------------ llmc.CQEncode

   The codes of new keys or values: per token, head and group, the centroid nearest to the group's c
   channels, as argmin_k ||C_k||² - 2 x·C_k (the formula of llmc.ops.cq.encode and of the standard
   lowering; the first minimum on ties), without the [H, G, tokens, K] score tensor of the standard
   ops. Inputs x float [B, H, S, D], codebooks_t float [H, G, c, K] (the codebooks channel-major, so
   the distances to all K centroids are computed along k; D = G c, K <= 256), norms float [H, G, K]
   (||C_k||²; both folded by ONNX Runtime at load from the codebooks); output uint8 [B, H, S, G]. */

typedef struct {
    const llmc_cq_encode_args *a;
    int64_t tokens_per_task;
    int fast; /* nearest_avx512 applies */
} encode_job;

/* The code of one group: x·C_k summed over the c channels in order for every k at once (the codebook
   channel-major), ||C_k||² - 2 x·C_k, the first minimum. */
static inline int64_t nearest(const float *xg, const float *book, const float *norm, int64_t K, int64_t c,
                              float *restrict dist) {
    for (int64_t k = 0; k < K; k++) dist[k] = xg[0] * book[k];
    for (int64_t j = 1; j < c; j++) {
        const float xj = xg[j];
        for (int64_t k = 0; k < K; k++) dist[k] += xj * book[j * K + k];
    }
    for (int64_t k = 0; k < K; k++) dist[k] = norm[k] - 2.0f * dist[k];
    int64_t arg = 0;
    for (int64_t k = 1; k < K; k++) arg = dist[k] < dist[arg] ? k : arg;
    return arg;
}

#if defined(__x86_64__) && defined(__GNUC__)
/* nearest() with K a multiple of 16, 16 centroids a register (the same products and sums, so the same code). */
AVX512 static int64_t nearest_avx512(const float *xg, const float *book, const float *norm, int64_t K, int64_t c) {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 best = _mm512_set1_ps(INFINITY);
    __m512i at = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 16) {
        __m512 dot = _mm512_mul_ps(_mm512_set1_ps(xg[0]), _mm512_loadu_ps(book + k));
        for (int64_t j = 1; j < c; j++)
            dot = _mm512_add_ps(dot, _mm512_mul_ps(_mm512_set1_ps(xg[j]), _mm512_loadu_ps(book + j * K + k)));
        const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(norm + k), _mm512_mul_ps(_mm512_set1_ps(2.0f), dot));
        const __mmask16 less = _mm512_cmp_ps_mask(d, best, _CMP_LT_OQ);
        best = _mm512_mask_mov_ps(best, less, d);
        at = _mm512_mask_mov_epi32(at, less, _mm512_add_epi32(iota, _mm512_set1_epi32((int)k)));
    }
    const float m = _mm512_reduce_min_ps(best); /* the smallest value; the first k that has it */
    const __mmask16 is_min = _mm512_cmp_ps_mask(best, _mm512_set1_ps(m), _CMP_EQ_OQ);
    if (!is_min) return 0; /* NaN distances */
    return _mm512_reduce_min_epi32(_mm512_mask_mov_epi32(_mm512_set1_epi32(INT32_MAX), is_min, at));
}
#endif

CLONES static void encode_task(void *arg, size_t i) {
    const encode_job *job = (const encode_job *)arg;
    const llmc_cq_encode_args *a = job->a;
    const int64_t G = a->G, K = a->K, c = a->c, D = G * c, rows = a->B * a->H * a->S;
    const int64_t first = (int64_t)i * job->tokens_per_task;
    const int64_t last = first + job->tokens_per_task < rows ? first + job->tokens_per_task : rows;
    float dist[256];
    for (int64_t row = first; row < last; row++) { /* row = (b * H + h) * S + s */
        const int64_t h = (row / a->S) % a->H;
        const float *x = a->x + row * D;
        uint8_t *codes = a->codes + row * G;
        for (int64_t g = 0; g < G; g++) {
            const float *book = a->codebooks_t + (h * G + g) * c * K, *norm = a->norms + (h * G + g) * K;
#if defined(__x86_64__) && defined(__GNUC__)
            if (job->fast) {
                codes[g] = (uint8_t)nearest_avx512(x + g * c, book, norm, K, c);
                continue;
            }
#endif
            codes[g] = (uint8_t)nearest(x + g * c, book, norm, K, c, dist);
        }
    }
}

void llmc_cq_encode_run(const llmc_cq_encode_args *a, parallel_fn parallel, void *context) {
    const int64_t rows = a->B * a->H * a->S;
    if (rows == 0) return;
    encode_job job = {a, rows < 64 ? 1 : 16, has_avx512() && llmc_vq_isa_limit >= 1 && a->K % 16 == 0};
    parallel(context, encode_task, (size_t)((rows + job.tokens_per_task - 1) / job.tokens_per_task), &job);
}

void llmc_cq_encode(const llmc_cq_encode_args *a) { llmc_cq_encode_run(a, llmc_serial, NULL); }
