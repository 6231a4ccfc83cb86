/* Declarations shared by the sources of llmc's ONNX Runtime custom-op library (custom_ops.py builds
   every .c file of this folder into one shared object). */

#ifndef LLMC_ORT_OPS_H
#define LLMC_ORT_OPS_H

#include <stddef.h>
#include <stdint.h>

/* Runs task(arg, i) for every i < total, possibly concurrently (ONNX Runtime's intra-op pool). */
typedef void (*parallel_fn)(void *context, void (*task)(void *, size_t), size_t total, void *arg);

/* The widest instruction set the kernels may use: 0 portable C, 1 AVX-512F, 2 also AVX-512 VBMI (the
   default: whatever the CPU has). Tests lower it to check every path on one machine. */
extern int llmc_vq_isa_limit;

/* Whether this CPU has AVX-512F and FMA (probed once). */
int llmc_has_avx512(void);

/* Sequential parallel_fn (tests, and runtimes without KernelContext_ParallelFor). */
void llmc_serial(void *context, void (*task)(void *, size_t), size_t total, void *arg);

/* llmc.CQAttention (cq_ort.c): attention over a cache whose past is CQ codes and whose newest S tokens are
   float. Returns 0, 1 on inconsistent sizes, 2 when out of memory. */
typedef struct {
    const float *q;                   /* [B, H, R, D] */
    const uint8_t *key_codes;         /* [B, H, P, Gk] */
    const float *key_new;             /* [B, H, S, D], before RoPE */
    const uint8_t *value_codes;       /* [B, H, P, Gv] */
    const float *value_new;           /* [B, H, S, D] */
    const float *key_codebooks;       /* [H, Gk, Kk, ck] */
    const float *value_codebooks;     /* [H, Gv, Kv, cv] */
    const float *cos, *signed_sin;    /* [B or 1, 1, Tt >= P + S, rot] */
    const float *bias;                /* [B or 1, 1, R, Tb >= P + S] */
    float scale;
    int64_t B, H, R, P, S, D, Gk, Kk, ck, Gv, Kv, cv, rot;
    int64_t table_batch_stride;       /* Tt * rot, or 0 when the tables broadcast over the batch */
    int64_t bias_cols, bias_batch_stride; /* Tb; R * Tb, or 0 likewise */
    float *out;                       /* [B, H, R, D] */
    /* Other layouts (0: the ones above). llmc.CQCachedAttention reads its new tokens from [B, S, H * D]
       (strides S H D, D, H D) and the past from a buffer of `codes_capacity` >= P positions. */
    int64_t new_batch_stride, new_head_stride, new_token_stride; /* floats; defaults H S D, S D, D */
    int64_t codes_capacity;                                      /* default P */
    int64_t heads_last; /* 1: q and out are [B, S, H * R / S * D] (row r of head h: query head h R / S + r / S,
                           token r % S), as CQCachedAttention takes them */
    /* heads_last only: q before RoPE, rotated here with these tables of the S query positions (NULL: q is
       rotated already) */
    const float *q_cos, *q_signed_sin; /* [B or 1, 1, S, rot] */
    int64_t q_table_batch_stride;      /* S * rot, or 0 when the tables broadcast over the batch */
    int64_t q_token_stride;            /* heads_last: floats from one token's q to the next (default H R / S D; more
                                          where q is the first part of a packed q/k/v) */
    int64_t rope_halves; /* 1: every row of cos repeats its first rot/2 values and every row of signed_sin negates
                            them (RoPE's tables), so the AVX-512 path reads only the first half of each cos row and
                            the second of each signed_sin row for the past keys */
} llmc_cq_attention_args;

int llmc_cq_attention_run(const llmc_cq_attention_args *a, parallel_fn parallel, void *context);

/* The same, single-threaded, for ctypes. */
int llmc_cq_attention(const llmc_cq_attention_args *a);

/* llmc.CQEncode (cq_ort.c): nearest-centroid codes of new keys or values. */
typedef struct {
    const float *x;         /* [B, H, S, G * c] */
    const float *codebooks_t; /* [H, G, c, K], K <= 256 */
    const float *norms;     /* [H, G, K]: squared norms of the centroids */
    int64_t B, H, S, G, K, c;
    uint8_t *codes;         /* [B, H, S, G] */
    /* Other layouts (0: the ones above): x as [B, S, H * G * c] (strides S H D, D, H D), codes written at
       positions [codes_offset, codes_offset + S) of a buffer [B, H, codes_capacity, G]. */
    int64_t x_batch_stride, x_head_stride, x_token_stride; /* floats; defaults H S D, S D, D */
    int64_t codes_capacity, codes_offset;                   /* defaults S, 0 */
    const float *codebooks; /* [H, G, K, c] row-major, read instead of codebooks_t when not NULL */
} llmc_cq_encode_args;

void llmc_cq_encode_run(const llmc_cq_encode_args *a, parallel_fn parallel, void *context);
void llmc_cq_encode(const llmc_cq_encode_args *a);

/* llmc.CQCachedAttention (cq_ort.c): the encodings of the new keys and values into the present cache and the
   attention, in one parallel loop. */
int llmc_cq_cached_attention_run(const llmc_cq_attention_args *a, const llmc_cq_encode_args *keys,
                                 const llmc_cq_encode_args *values, parallel_fn parallel, void *context);

/* llmc.BinaryBasesLinear (binary_bases_ort.c): y = x Wᵀ, W = Σ_i scales_i ⊙ signs_i, plus kept outliers.
   Returns 0, 1 on inconsistent sizes, 2 when out of memory. */
typedef struct {
    const float *x;         /* [T, K] */
    const uint8_t *signs;   /* [nb, N, K/8] */
    const float *scales;    /* [nb, N, G] */
    float *y;               /* [T, N] */
    int64_t T, K, N, nb, G;
    const int32_t *outlier_index;  /* [N, outliers] column indices, or NULL */
    const float *outlier_values;   /* [N, outliers]: y[t, n] += Σ_j values[n, j] x[t, index[n, j]] */
    int64_t outliers;
} llmc_bb_args;

int llmc_binary_bases_linear_run(const llmc_bb_args *a, parallel_fn parallel, void *context);
int llmc_binary_bases_linear(const llmc_bb_args *a);

/* y[t, n0 + r] = x[t] · w[r] for T tokens and `rows` float rows w [rows, K]; y has row stride N (the block
   product of llmc.VQLinear, with the widest instruction set allowed). */
void llmc_multiply_rows(const float *x, int64_t T, int K, const float *w, int rows, float *y, int N, int n0);

#endif
