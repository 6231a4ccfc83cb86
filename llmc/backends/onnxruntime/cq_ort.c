/* llmc.CQAttention and llmc.CQEncode: a KV cache of coupled-quantization codes, read and written as codes.

   cq_kv stores every earlier key (before RoPE) and value as one uint8 code per group of c channels
   (llmc/ops/cq.py). The standard lowering gathers the whole cache back into float tensors, rotates
   every key and multiplies, every step and layer. CQAttention reads the codes where they lie: per
   cached position it gathers the key's centroids, rotates them at that position (the keys are stored
   before RoPE, so a per-query table of query·centroid products would need one table per position)
   and takes the dot product of every query row of the KV head with it; a value is accumulated
   straight from its centroids. The step's own S tokens (float, not yet coded: a decoder that
   quantizes on write attends to them exactly) are attended in the same softmax; for a prompt they
   are scored 16 keys at a time against a transposed block, and key blocks that the mask hides
   entirely (the causal upper triangle) are skipped.

   Inputs:
     q                float [B, H, R, D]     the queries of KV head h folded as rows (R = groups * S), after RoPE
     key_codes        uint8 [B, H, P, Gk]    the cached keys' codes
     key_new          float [B, H, S, D]     this step's keys, before RoPE
     value_codes      uint8 [B, H, P, Gv]
     value_new        float [B, H, S, D]
     key_codebooks    float [H, Gk, Kk, ck]  D = Gk * ck, Kk <= 256
     value_codebooks  float [H, Gv, Kv, cv]  D = Gv * cv
     cos, signed_sin  float [B|1, 1, Tt, rot]  RoPE tables of the key positions (Tt >= T = P + S; the first T are read):
                                               rotated[d] = k[d] cos[d] + k[(d + rot/2) mod rot] signed_sin[d], d < rot;
                                               under rope_halves (RoPE's tables: cos[d + rot/2] = cos[d],
                                               signed_sin[d] = -signed_sin[d + rot/2]) the AVX-512 path reads the
                                               past keys' from the first half of cos and the second of signed_sin
     bias             float [B|1, 1, R, Tb]  additive mask (Tb >= T)
     scale            float [1]
   Output: out float [B, H, R, D] = softmax(q kᵀ scale + bias) v over the T keys, the first P decoded from
   their codes (llmc.ops.cq.attention).
*/

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "llmc_ort_ops.h"

/* Query rows per task: their scores [rows, T] are one buffer; a decode step has `groups` rows. */
enum { ROW_BLOCK = 256, MAX_HEAD_DIM = 1024, LANES = 16 };

/* A bias at or below this hides its key (llmc's masks use the float minimum). */
#define HIDDEN (-1e30f)

/* x86-64: an AVX-512 and an AVX2 build of the portable code beside it, picked at load time. */
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
    void *encode[2]; /* CQCachedAttention: the encode jobs of the new keys and values, run by each (batch, head)'s
                        first task, or NULL */
} cq_job;

static void encode_task(void *arg, size_t i);

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
    const int32_t e = ((int32_t)(x < -87.0f ? 0.0f : k) + 127) << 23;
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

/* key [D] rotated at its position (tables cos, sin of that position) into `rotated`. */
static inline void rotate(const float *restrict key, const float *cos, const float *sin, int64_t rot, int64_t D,
                          float *restrict rotated) {
    const int64_t half = rot / 2;
    for (int64_t d = 0; d < half; d++) rotated[d] = key[d] * cos[d] + key[d + half] * sin[d];
    for (int64_t d = half; d < rot; d++) rotated[d] = key[d] * cos[d] + key[d - half] * sin[d];
    for (int64_t d = rot; d < D; d++) rotated[d] = key[d];
}

/* Softmax weights of one row of scores in place (unnormalised); returns their sum. */
static inline float softmax_row(float *s, int64_t n) {
    float m = -INFINITY;
    for (int64_t t = 0; t < n; t++) m = s[t] > m ? s[t] : m;
    float acc[LANES] = {0};
    int64_t t = 0;
    for (; t + LANES <= n; t += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += (s[t + l] = exp_nonpositive(s[t + l] - m));
    float total = 0.0f;
    for (; t < n; t++) total += (s[t] = exp_nonpositive(s[t] - m));
    for (int l = 0; l < LANES; l++) total += acc[l];
    return total;
}

/* Where a task's tensors start; `stride`: floats from one new token to the next. */
typedef struct {
    const float *q, *cos, *sin, *bias, *key_new, *value_new, *kbook, *vbook;
    const uint8_t *kcodes, *vcodes;
    float *out;
    int64_t T, rows, stride;
} cq_views;

static cq_views views(const llmc_cq_attention_args *a, int64_t b, int64_t h, int64_t r0, int64_t rows) {
    const int64_t bh = b * a->H + h, R = a->R, D = a->D, capacity = a->codes_capacity ? a->codes_capacity : a->P;
    const int64_t new_at = b * (a->new_batch_stride ? a->new_batch_stride : a->H * a->S * D) +
                           h * (a->new_head_stride ? a->new_head_stride : a->S * D);
    cq_views v = {
        .q = a->q + (bh * R + r0) * D, .cos = a->cos + b * a->table_batch_stride,
        .sin = a->signed_sin + b * a->table_batch_stride,
        .bias = a->bias + b * a->bias_batch_stride + r0 * a->bias_cols,
        .key_new = a->key_new + new_at, .value_new = a->value_new + new_at,
        .kbook = a->key_codebooks + h * a->Gk * a->Kk * a->ck, .vbook = a->value_codebooks + h * a->Gv * a->Kv * a->cv,
        .kcodes = a->key_codes + bh * capacity * a->Gk, .vcodes = a->value_codes + bh * capacity * a->Gv,
        .out = a->out + (bh * R + r0) * D, .T = a->P + a->S, .rows = rows,
        .stride = a->new_token_stride ? a->new_token_stride : D};
    return v;
}

/* The portable path: scores of the past keys (decoded, rotated) and of the new keys (rotated), softmax, values. */
CLONES static int block_portable(const llmc_cq_attention_args *a, cq_views v) {
    const int64_t P = a->P, D = a->D, T = v.T, rows = v.rows, rot = a->rot;
    float *scores = (float *)malloc(sizeof(float) * rows * T);
    if (!scores) return 1;
    float key[MAX_HEAD_DIM], rotated[MAX_HEAD_DIM];
    for (int64_t t = 0; t < T; t++) {
        if (t < P) {
            const uint8_t *codes = v.kcodes + t * a->Gk;
            for (int64_t g = 0; g < a->Gk; g++)
                memcpy(key + g * a->ck, v.kbook + (g * a->Kk + codes[g]) * a->ck, sizeof(float) * a->ck);
        }
        rotate(t < P ? key : v.key_new + (t - P) * v.stride, v.cos + t * rot, v.sin + t * rot, rot, D, rotated);
        for (int64_t r = 0; r < rows; r++)
            scores[r * T + t] = dot(v.q + r * D, rotated, D) * a->scale + v.bias[r * a->bias_cols + t];
    }
    for (int64_t r = 0; r < rows; r++) {
        float *p = scores + r * T, *o = v.out + r * D;
        const float sum = softmax_row(p, T);
        memset(o, 0, sizeof(float) * D);
        for (int64_t t = 0; t < P; t++)
            for (int64_t g = 0; g < a->Gv; g++) {
                const float *word = v.vbook + (g * a->Kv + v.vcodes[t * a->Gv + g]) * a->cv;
                for (int64_t c = 0; c < a->cv; c++) o[g * a->cv + c] += p[t] * word[c];
            }
        for (int64_t t = P; t < T; t++) {
            const float *x = v.value_new + (t - P) * v.stride;
            for (int64_t d = 0; d < D; d++) o[d] += p[t] * x[d];
        }
        for (int64_t d = 0; d < D; d++) o[d] /= sum;
    }
    free(scores);
    return 0;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,fma")))

/* The AVX-512 path's shapes: 4-channel groups (4c<b>b), whole-head RoPE, D a multiple of 32 up to 128,
   so a head is at most 8 registers and rolling it by D/2 is a rotation of whole registers. */
static int avx512_path(const llmc_cq_attention_args *a) {
    return llmc_has_avx512() && a->ck == 4 && a->cv == 4 && a->rot == a->D && a->D % 32 == 0 && a->D <= 128;
}

/* Ask for every cache line of n floats, in order: a decode step's lookups would otherwise fetch a head's
   codebooks (64 KB at 4c8b, D = 64) one random line at a time. */
static inline void prefetch_all(const float *p, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i, 0, 3);
}

/* exp_nonpositive, 16 lanes: the same reduction and polynomial, 2^k applied by scalef (round to nearest for k). */
AVX512 static inline __m512 exp512(__m512 x) {
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fmadd_ps(k, _mm512_set1_ps(2.12194440e-4f),
                                     _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, k));
}

/* softmax_row, 16 lanes. */
AVX512 static float softmax_row512(float *s, int64_t n) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < n; t += 16) {
        const __mmask16 lanes = n - t >= 16 ? 0xFFFF : (__mmask16)((1u << (n - t)) - 1);
        m = _mm512_mask_max_ps(m, lanes, m, _mm512_maskz_loadu_ps(lanes, s + t));
    }
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t += 16) {
        const __mmask16 lanes = n - t >= 16 ? 0xFFFF : (__mmask16)((1u << (n - t)) - 1);
        const __m512 e = _mm512_maskz_mov_ps(lanes, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, s + t), top)));
        _mm512_mask_storeu_ps(s + t, lanes, e);
        sum = _mm512_add_ps(sum, e);
    }
    return _mm512_reduce_add_ps(sum);
}

/* Centroids of groups g .. g+3 (4 floats each) picked by their codes: one register. The four codes are read as
   one word and taken apart by shifts: a load per code would double the loads, which bound this decoding. */
AVX512 static inline __m512 centroids4(const float *book, int64_t K, const uint8_t *codes, int64_t g) {
    uint32_t c;
    memcpy(&c, codes + g, sizeof c);
    const float *b = book + g * K * 4;
    __m512 v = _mm512_castps128_ps512(_mm_loadu_ps(b + (c & 255) * 4));
    v = _mm512_insertf32x4(v, _mm_loadu_ps(b + (K + ((c >> 8) & 255)) * 4), 1);
    v = _mm512_insertf32x4(v, _mm_loadu_ps(b + (2 * K + ((c >> 16) & 255)) * 4), 2);
    return _mm512_insertf32x4(v, _mm_loadu_ps(b + (3 * K + (c >> 24)) * 4), 3);
}

/* One sum per vector: lane j of the result is the sum of the 16 lanes of acc[j]. Four levels of pairwise
   shuffles and adds (two shuffles per vector in all, where a horizontal sum of each costs four), then one
   permutation back to key order. */
AVX512 static inline __m512 sum16(const __m512 acc[16]) {
    __m512 c[8], e[4], g[2];
    for (int i = 0; i < 8; i++) /* 128-bit halves: 8 lanes per vector */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 4; i++) /* 4 lanes */
        e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int i = 0; i < 2; i++) /* 2 lanes, within 128-bit chunks */
        g[i] = _mm512_add_ps(_mm512_shuffle_ps(e[2 * i], e[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(e[2 * i], e[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(g[0], g[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                      _mm512_shuffle_ps(g[0], g[1], _MM_SHUFFLE(3, 1, 3, 1)));
    /* lane l now holds vector 4 (l % 4) + l / 4 */
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), sums);
}

/* The AVX-512 path. Past keys are decoded and rotated 16 at a time into a block (each key decoded once for
   all query rows); every row scores the block with D multiply-adds per key and one sum16 for all 16.
   New keys are rotated 16 at a time into transposed blocks kt [S/16][D][16], so a row scores 16 keys
   with D multiply-adds and no horizontal sums; a block of keys the row's mask hides entirely is not
   computed. Past values: at a decode step's few rows, each is decoded into registers and weighed into every row's
   sums, held in registers too; with more rows, 16 at a time into a block that every row reads (skipping weights
   that are exactly 0). Then the new values as they are. */
AVX512 static inline __attribute__((always_inline)) int block_avx512_nv(const llmc_cq_attention_args *a, cq_views v,
                                                                         const int64_t NV) {
    const int64_t P = a->P, S = a->S, D = 16 * NV, T = v.T, rows = v.rows, HV = NV / 2;
    float *scores = (float *)malloc(sizeof(float) * rows * T);
    float *kt = (float *)aligned_alloc(64, sizeof(float) * ((S + 15) / 16 * 16 + 16) * D); /* [blocks][D][16] */
    if (!scores || !kt) {
        free(scores);
        free(kt);
        return 1;
    }
    if (P * a->Gk >= a->Gk * a->Kk / 8) { /* enough lookups to touch most of the head's codebooks */
        prefetch_all(v.kbook, a->Gk * a->Kk * 4);
        prefetch_all(v.vbook, a->Gv * a->Kv * 4);
    }
    const __m512 scale = _mm512_set1_ps(a->scale);
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    float decoded[16 * 128] __attribute__((aligned(64))); /* 16 decoded keys (or values) [16][D] */
    int64_t seen[ROW_BLOCK]; /* per row: the keys after seen[r] are all hidden (a causal prompt's later keys) */
    for (int64_t r = 0; r < rows; r++) seen[r] = P;
    for (int64_t t0 = 0; t0 < P; t0 += 16) {
        const int64_t n = P - t0 < 16 ? P - t0 : 16;
        for (int64_t j = 0; j < n; j++) {
            const int64_t t = t0 + j;
            __m512 k[8];
            for (int64_t m = 0; m < NV; m++) k[m] = centroids4(v.kbook, a->Kk, v.kcodes + t * a->Gk, 4 * m);
            const float *c = v.cos + t * D, *s = v.sin + t * D;
            __m512 cos[8], sin[8];
            if (a->rope_halves) { /* half the table bytes: cos's first half twice, signed_sin's second half negated */
                for (int64_t m = 0; m < HV; m++) {
                    cos[m] = cos[m + HV] = _mm512_loadu_ps(c + 16 * m);
                    sin[m + HV] = _mm512_loadu_ps(s + D / 2 + 16 * m);
                    sin[m] = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(sin[m + HV]), sign));
                }
            } else {
                for (int64_t m = 0; m < NV; m++) {
                    cos[m] = _mm512_loadu_ps(c + 16 * m);
                    sin[m] = _mm512_loadu_ps(s + 16 * m);
                }
            }
            for (int64_t m = 0; m < NV; m++)
                _mm512_store_ps(decoded + j * D + 16 * m,
                                _mm512_fmadd_ps(k[(m + HV) % NV], sin[m], _mm512_mul_ps(k[m], cos[m])));
        }
        const __mmask16 lanes = n == 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);
        for (int64_t r = 0; r < rows; r++) {
            const float *qr = v.q + r * D;
            __m512 q[8], acc[16];
            for (int64_t m = 0; m < NV; m++) q[m] = _mm512_loadu_ps(qr + 16 * m);
            for (int64_t j = 0; j < 16; j++) {
                if (j >= n) {
                    acc[j] = _mm512_setzero_ps();
                    continue;
                }
                acc[j] = _mm512_mul_ps(q[0], _mm512_load_ps(decoded + j * D));
                for (int64_t m = 1; m < NV; m++)
                    acc[j] = _mm512_fmadd_ps(q[m], _mm512_load_ps(decoded + j * D + 16 * m), acc[j]);
            }
            const __m512 bias = _mm512_maskz_loadu_ps(lanes, v.bias + r * a->bias_cols + t0);
            _mm512_mask_storeu_ps(scores + r * T + t0, lanes, _mm512_fmadd_ps(sum16(acc), scale, bias));
        }
    }
    for (int64_t t0 = 0; t0 < S; t0 += 16) { /* the new keys, rotated, 16 a block, each block transposed */
        float *block = kt + t0 * D;
        for (int64_t j = 0; j < 16; j++) { /* key P + t0 + j as column j of the block */
            if (t0 + j >= S) {
                for (int64_t d = 0; d < D; d++) block[d * 16 + j] = 0.0f;
                continue;
            }
            const int64_t t = P + t0 + j;
            const float *key = v.key_new + (t0 + j) * v.stride, *c = v.cos + t * D, *s = v.sin + t * D;
            float rotated[128];
            for (int64_t m = 0; m < NV; m++) {
                const __m512 rolled = _mm512_loadu_ps(key + 16 * ((m + HV) % NV));
                const __m512 straight = _mm512_mul_ps(_mm512_loadu_ps(key + 16 * m), _mm512_loadu_ps(c + 16 * m));
                _mm512_storeu_ps(rotated + 16 * m, _mm512_fmadd_ps(rolled, _mm512_loadu_ps(s + 16 * m), straight));
            }
            for (int64_t d = 0; d < D; d++) block[d * 16 + j] = rotated[d];
        }
    }
    for (int64_t r = 0; r < rows; r++) { /* row by row: its scores and mask are read and written in order */
        const float *qr = v.q + r * D, *bias_row = v.bias + r * a->bias_cols + P;
        float *out_row = scores + r * T + P;
        for (int64_t t0 = 0; t0 < S; t0 += 16) {
            const __mmask16 lanes = S - t0 >= 16 ? 0xFFFF : (__mmask16)((1u << (S - t0)) - 1);
            const __m512 bias = _mm512_maskz_loadu_ps(lanes, bias_row + t0);
            if (!(_mm512_cmp_ps_mask(bias, _mm512_set1_ps(HIDDEN), _CMP_GT_OQ) & lanes)) {
                _mm512_mask_storeu_ps(out_row + t0, lanes, bias); /* all hidden: exp() gives 0 whatever the dot */
                continue;
            }
            const float *block = kt + t0 * D;
            __m512 acc[4]; /* four independent chains of multiply-adds (D is a multiple of 32) */
            for (int j = 0; j < 4; j++) acc[j] = _mm512_mul_ps(_mm512_set1_ps(qr[j]), _mm512_load_ps(block + j * 16));
            for (int64_t d = 4; d < D; d += 4)
                for (int j = 0; j < 4; j++)
                    acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(qr[d + j]), _mm512_load_ps(block + (d + j) * 16), acc[j]);
            const __m512 dots = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            _mm512_mask_storeu_ps(out_row + t0, lanes, _mm512_fmadd_ps(dots, scale, bias));
            seen[r] = P + t0 + (S - t0 < 16 ? S - t0 : 16);
        }
    }
    float sums[ROW_BLOCK];
    int64_t seen_all = 0; /* the most positions any row weighs */
    for (int64_t r = 0; r < rows; r++) {
        seen[r] = seen[r] ? seen[r] : T; /* a row that sees nothing weighs every key alike, as SDPA does */
        sums[r] = softmax_row512(scores + r * T, seen[r]);
        seen_all = seen[r] > seen_all ? seen[r] : seen_all;
        memset(v.out + r * D, 0, sizeof(float) * D);
    }
    const int64_t past = P < seen_all ? P : seen_all;
    /* Past values (every row weighs all of them: seen[r] >= P). A few rows (a decode step's): each value is decoded
       into registers and weighed into every row's sums, which stay in registers too (NV a row, at most 16 in all). */
    enum { MAX_SUMS = 16 };
    const int in_registers = rows * NV <= MAX_SUMS;
    if (in_registers) {
        __m512 o[MAX_SUMS];
        for (int64_t i = 0; i < MAX_SUMS; i++) o[i] = _mm512_setzero_ps();
        for (int64_t t = 0; t < past; t++) {
            __m512 x[8];
            for (int64_t m = 0; m < NV; m++) x[m] = centroids4(v.vbook, a->Kv, v.vcodes + t * a->Gv, 4 * m);
            for (int64_t r = 0; r < MAX_SUMS / NV && r < rows; r++) {
                const __m512 w = _mm512_set1_ps(scores[r * T + t]);
                for (int64_t m = 0; m < NV; m++) o[r * NV + m] = _mm512_fmadd_ps(w, x[m], o[r * NV + m]);
            }
        }
        for (int64_t r = 0; r < rows; r++)
            for (int64_t m = 0; m < NV; m++) _mm512_storeu_ps(v.out + r * D + 16 * m, o[r * NV + m]);
    }
    /* Otherwise 16 values at a time, decoded into a block that every row then reads. */
    for (int64_t t0 = 0; !in_registers && t0 < past; t0 += 16) {
        const int64_t n = past - t0 < 16 ? past - t0 : 16;
        for (int64_t j = 0; j < n; j++)
            for (int64_t m = 0; m < NV; m++)
                _mm512_store_ps(decoded + j * D + 16 * m,
                                centroids4(v.vbook, a->Kv, v.vcodes + (t0 + j) * a->Gv, 4 * m));
        for (int64_t r = 0; r < rows; r++) {
            const float *p = scores + r * T + t0;
            float *out = v.out + r * D;
            __m512 o[8];
            for (int64_t m = 0; m < NV; m++) o[m] = _mm512_loadu_ps(out + 16 * m);
            for (int64_t j = 0; j < n && t0 + j < seen[r]; j++) {
                if (p[j] == 0.0f) continue;
                const __m512 w = _mm512_set1_ps(p[j]);
                for (int64_t m = 0; m < NV; m++)
                    o[m] = _mm512_fmadd_ps(w, _mm512_load_ps(decoded + j * D + 16 * m), o[m]);
            }
            for (int64_t m = 0; m < NV; m++) _mm512_storeu_ps(out + 16 * m, o[m]);
        }
    }
    for (int64_t r = 0; r < rows; r++) { /* the new values, then 1 / sum */
        const float *p = scores + r * T;
        const int64_t n = seen[r];
        __m512 o[8], o2[8]; /* a second set of sums, for the odd new positions: two chains per register */
        for (int64_t m = 0; m < NV; m++) o[m] = _mm512_loadu_ps(v.out + r * D + 16 * m);
        for (int64_t m = 0; m < NV; m++) o2[m] = _mm512_setzero_ps();
        int64_t t = P;
        for (; t + 1 < n; t += 2) {
            const __m512 w = _mm512_set1_ps(p[t]), w2 = _mm512_set1_ps(p[t + 1]);
            const float *x = v.value_new + (t - P) * v.stride;
            for (int64_t m = 0; m < NV; m++) {
                o[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 16 * m), o[m]);
                o2[m] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(x + v.stride + 16 * m), o2[m]);
            }
        }
        for (; t < n; t++) {
            const __m512 w = _mm512_set1_ps(p[t]);
            const float *x = v.value_new + (t - P) * v.stride;
            for (int64_t m = 0; m < NV; m++) o[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 16 * m), o[m]);
        }
        for (int64_t m = 0; m < NV; m++) o[m] = _mm512_add_ps(o[m], o2[m]);
        const __m512 inv = _mm512_set1_ps(1.0f / sums[r]);
        for (int64_t m = 0; m < NV; m++) _mm512_storeu_ps(v.out + r * D + 16 * m, _mm512_mul_ps(inv, o[m]));
    }
    free(scores);
    free(kt);
    return 0;
}

/* block_avx512_nv with the head size a constant (D = 32, 64, 96, 128), so the loops over a head's registers
   unroll and the registers stay registers. */
AVX512 static int block_avx512(const llmc_cq_attention_args *a, cq_views v) {
    switch (a->D) {
    case 32: return block_avx512_nv(a, v, 2);
    case 64: return block_avx512_nv(a, v, 4);
    case 96: return block_avx512_nv(a, v, 6);
    default: return block_avx512_nv(a, v, 8);
    }
}
#else
static int avx512_path(const llmc_cq_attention_args *a) { return (void)a, 0; }
static int block_avx512(const llmc_cq_attention_args *a, cq_views v) { return (void)a, (void)v, 1; }
#endif

/* One (batch, KV head, block of query rows). */
static void cq_block(void *arg, size_t i) {
    cq_job *job = (cq_job *)arg;
    const llmc_cq_attention_args *a = job->a;
    const int64_t b = (int64_t)i / (a->H * job->blocks), h = ((int64_t)i / job->blocks) % a->H;
    const int64_t r0 = ((int64_t)i % job->blocks) * ROW_BLOCK, rows = a->R - r0 < ROW_BLOCK ? a->R - r0 : ROW_BLOCK;
    cq_views v = views(a, b, h, r0, rows);
    if (r0 == 0 && job->encode[0]) { /* one task per (b, h) and encoding job covers that head's S tokens */
        encode_task(job->encode[0], (size_t)(b * a->H + h));
        encode_task(job->encode[1], (size_t)(b * a->H + h));
    }
    if (!a->heads_last) {
        if (job->fast ? block_avx512(a, v) : block_portable(a, v)) job->failed = 1;
        return;
    }
    /* q and out as [B, S, Hq * D]: the block's rows gathered into [rows, D] and its output scattered back */
    const int64_t D = a->D, S = a->S, G = a->R / S, Hq = a->H * G, q_stride = a->q_token_stride ? a->q_token_stride
                                                                                                : Hq * D;
    float *rows_q = (float *)malloc(sizeof(float) * rows * D), *rows_out = (float *)malloc(sizeof(float) * rows * D);
    if (!rows_q || !rows_out) {
        free(rows_q);
        free(rows_out);
        job->failed = 1;
        return;
    }
    for (int64_t r = 0; r < rows; r++) {
        const int64_t g = (r0 + r) / S, s = (r0 + r) % S, at = (b * S + s) * q_stride + (h * G + g) * D;
        if (a->q_cos) { /* q before RoPE: rotated at its token's position */
            const int64_t row = b * a->q_table_batch_stride + s * a->rot;
            rotate(a->q + at, a->q_cos + row, a->q_signed_sin + row, a->rot, D, rows_q + r * D);
        } else {
            memcpy(rows_q + r * D, a->q + at, sizeof(float) * D);
        }
    }
    v.q = rows_q;
    v.out = rows_out;
    if (job->fast ? block_avx512(a, v) : block_portable(a, v)) job->failed = 1;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t g = (r0 + r) / S, s = (r0 + r) % S, at = ((b * S + s) * Hq + h * G + g) * D;
        memcpy(a->out + at, rows_out + r * D, sizeof(float) * D);
    }
    free(rows_q);
    free(rows_out);
}

int llmc_cq_attention_run(const llmc_cq_attention_args *a, parallel_fn parallel, void *context) {
    cq_job job = {a, (a->R + ROW_BLOCK - 1) / ROW_BLOCK, avx512_path(a) && llmc_vq_isa_limit >= 1, 0, {NULL, NULL}};
    if (a->R == 0 || a->B == 0 || a->H == 0) return 0;
    if (a->P + a->S == 0) return 1; /* no key at all: the caller checks the shapes */
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

/* The code of one group: x·C_k summed over the c channels in order for every k at once, ||C_k||² - 2 x·C_k, the
   first minimum. Centroid k's channel j is book[k * k_stride + j * j_stride]: (1, K) for CQEncode's channel-major
   codebooks, (c, 1) for the row-major ones CQAttention reads. */
static inline int64_t nearest(const float *xg, const float *book, const float *norm, int64_t K, int64_t c,
                              int64_t k_stride, int64_t j_stride, float *restrict dist) {
    for (int64_t k = 0; k < K; k++) dist[k] = xg[0] * book[k * k_stride];
    for (int64_t j = 1; j < c; j++) {
        const float xj = xg[j];
        for (int64_t k = 0; k < K; k++) dist[k] += xj * book[k * k_stride + j * j_stride];
    }
    for (int64_t k = 0; k < K; k++) dist[k] = norm[k] - 2.0f * dist[k];
    int64_t arg = 0;
    for (int64_t k = 1; k < K; k++) arg = dist[k] < dist[arg] ? k : arg;
    return arg;
}

#if defined(__x86_64__) && defined(__GNUC__)
/* The first k with the smallest best[lane] (at[lane] its k), 0 when every distance is NaN. */
AVX512 static inline int64_t first_minimum(__m512 best, __m512i at) {
    const float m = _mm512_reduce_min_ps(best);
    const __mmask16 is_min = _mm512_cmp_ps_mask(best, _mm512_set1_ps(m), _CMP_EQ_OQ);
    if (!is_min) return 0;
    return _mm512_reduce_min_epi32(_mm512_mask_mov_epi32(_mm512_set1_epi32(INT32_MAX), is_min, at));
}

/* nearest() on row-major codebooks with c = 4 and K a multiple of 16: 16 centroids are 4 registers,
   transposed within their 128-bit lanes into one register per channel (lane 4m + i then holds centroid
   4i + m of the 16), and the same products and sums, so the same code as CQEncode's channel-major search. */
AVX512 static int64_t nearest_rows_avx512(const float *xg, const float *book, const float *norm, int64_t K) {
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512 x0 = _mm512_set1_ps(xg[0]), x1 = _mm512_set1_ps(xg[1]), x2 = _mm512_set1_ps(xg[2]);
    const __m512 x3 = _mm512_set1_ps(xg[3]), two = _mm512_set1_ps(2.0f);
    __m512 best = _mm512_set1_ps(INFINITY);
    __m512i at = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 16) {
        const float *c = book + k * 4;
        const __m512 a = _mm512_loadu_ps(c), b = _mm512_loadu_ps(c + 16), cc = _mm512_loadu_ps(c + 32);
        const __m512 d = _mm512_loadu_ps(c + 48);
        const __m512d t0 = _mm512_castps_pd(_mm512_unpacklo_ps(a, b));
        const __m512d t1 = _mm512_castps_pd(_mm512_unpackhi_ps(a, b));
        const __m512d t2 = _mm512_castps_pd(_mm512_unpacklo_ps(cc, d));
        const __m512d t3 = _mm512_castps_pd(_mm512_unpackhi_ps(cc, d));
        __m512 dot = _mm512_mul_ps(x0, _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2)));
        dot = _mm512_add_ps(dot, _mm512_mul_ps(x1, _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2))));
        dot = _mm512_add_ps(dot, _mm512_mul_ps(x2, _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3))));
        dot = _mm512_add_ps(dot, _mm512_mul_ps(x3, _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3))));
        const __m512 norms = _mm512_permutexvar_ps(order, _mm512_loadu_ps(norm + k));
        const __m512 dist = _mm512_sub_ps(norms, _mm512_mul_ps(two, dot));
        const __mmask16 less = _mm512_cmp_ps_mask(dist, best, _CMP_LT_OQ);
        best = _mm512_mask_mov_ps(best, less, dist);
        at = _mm512_mask_mov_epi32(at, less, _mm512_add_epi32(order, _mm512_set1_epi32((int)k)));
    }
    return first_minimum(best, at);
}

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
    return first_minimum(best, at);
}
#endif

CLONES static void encode_task(void *arg, size_t i) {
    const encode_job *job = (const encode_job *)arg;
    const llmc_cq_encode_args *a = job->a;
    const int64_t G = a->G, K = a->K, c = a->c, D = G * c, rows = a->B * a->H * a->S;
    const int64_t first = (int64_t)i * job->tokens_per_task;
    const int64_t last = first + job->tokens_per_task < rows ? first + job->tokens_per_task : rows;
    float dist[256];
    const int64_t batch_stride = a->x_batch_stride ? a->x_batch_stride : a->H * a->S * D;
    const int64_t head_stride = a->x_head_stride ? a->x_head_stride : a->S * D;
    const int64_t token_stride = a->x_token_stride ? a->x_token_stride : D;
    const int64_t capacity = a->codes_capacity ? a->codes_capacity : a->S;
    for (int64_t row = first; row < last; row++) { /* row = (b * H + h) * S + s */
        const int64_t s = row % a->S, h = (row / a->S) % a->H, b = row / (a->S * a->H);
        const float *x = a->x + b * batch_stride + h * head_stride + s * token_stride;
        uint8_t *codes = a->codes + ((b * a->H + h) * capacity + a->codes_offset + s) * G;
        for (int64_t g = 0; g < G; g++) {
            const float *norm = a->norms + (h * G + g) * K;
            if (a->codebooks) { /* row-major */
                const float *book = a->codebooks + (h * G + g) * K * c;
#if defined(__x86_64__) && defined(__GNUC__)
                if (job->fast && c == 4) {
                    codes[g] = (uint8_t)nearest_rows_avx512(x + g * c, book, norm, K);
                    continue;
                }
#endif
                codes[g] = (uint8_t)nearest(x + g * c, book, norm, K, c, c, 1, dist);
                continue;
            }
            const float *book = a->codebooks_t + (h * G + g) * c * K;
#if defined(__x86_64__) && defined(__GNUC__)
            if (job->fast) {
                codes[g] = (uint8_t)nearest_avx512(x + g * c, book, norm, K, c);
                continue;
            }
#endif
            codes[g] = (uint8_t)nearest(x + g * c, book, norm, K, c, 1, K, dist);
        }
    }
}

void llmc_cq_encode_run(const llmc_cq_encode_args *a, parallel_fn parallel, void *context) {
    const int64_t rows = a->B * a->H * a->S;
    if (rows == 0) return;
    encode_job job = {a, rows < 64 ? 1 : 16, llmc_has_avx512() && llmc_vq_isa_limit >= 1 && a->K % 16 == 0};
    parallel(context, encode_task, (size_t)((rows + job.tokens_per_task - 1) / job.tokens_per_task), &job);
}

void llmc_cq_encode(const llmc_cq_encode_args *a) { llmc_cq_encode_run(a, llmc_serial, NULL); }

/* llmc.CQCachedAttention's work: the codes of the new keys and values (`keys`, `values`: the encodings into the
   present cache) and the attention (which reads the past from its own codes input), in one parallel loop whose
   task for each (batch, head) also encodes that head's new tokens. Returns as llmc_cq_attention_run. */
int llmc_cq_cached_attention_run(const llmc_cq_attention_args *a, const llmc_cq_encode_args *keys,
                                 const llmc_cq_encode_args *values, parallel_fn parallel, void *context) {
    const int fast = llmc_has_avx512() && llmc_vq_isa_limit >= 1;
    encode_job k = {keys, keys->S, fast && keys->K % 16 == 0}, v = {values, values->S, fast && values->K % 16 == 0};
    cq_job job = {a, (a->R + ROW_BLOCK - 1) / ROW_BLOCK, avx512_path(a) && llmc_vq_isa_limit >= 1, 0, {&k, &v}};
    if (a->B == 0 || a->H == 0) return 0;
    if (a->R == 0 || a->S == 0) { /* no attention: just the codes */
        llmc_cq_encode_run(keys, parallel, context);
        llmc_cq_encode_run(values, parallel, context);
        return 0;
    }
    parallel(context, cq_block, (size_t)(a->B * a->H * job.blocks), &job);
    return job.failed ? 2 : 0;
}
