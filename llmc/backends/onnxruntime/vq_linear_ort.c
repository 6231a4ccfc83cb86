/* llmc.VQLinear: an ONNX Runtime custom op for llmc::vq_linear that reads the uint8 codes at run time.

   The standard lowering of vq_linear (Gather of codewords, ReduceSum, MatMul) is folded by ONNX
   Runtime into a float32 weight when it loads the session, so a decode step then reads 4 bytes per
   weight. This op keeps the codes. Per token and per input group j, a lookup table of
   x_j · codeword for the codewords of every codebook; each output is then a sum of table entries
   picked by its codes, 1 byte per codebook per group of g weights.

   Inputs (the lowering lays them out for this kernel; ONNX Runtime folds those transposes at load):
     x          float [..., K]        K = J * g
     codes      uint8 [J * M, N]      codes[j*M + m, n]: the code of output row n, group j, codebook m
     codebooks  float [M, g, C]       codeword c of codebook m is codebooks[m, :, c]; C <= 256
     scales     float [N]
     codewords  float [M, C, g]       the same codebooks, codeword-major (for dequantizing)
   Output y float [..., N]:  y[t, n] = scales[n] * sum_{j,m} x[t, j*g:(j+1)*g] · codebooks[m, :, codes[j*M+m, n]]

   Up to LUT_MAX_TOKENS tokens take the lookup tables. One token splits the code rows (j, m) into
   segments that ONNX Runtime's intra-op pool sums in parallel (each builds only its own tables).
   More tokens (a prompt) dequantize blocks of output rows into float32 and multiply them with
   every token, a block per task: the tables' cost grows with the tokens, a block's does not.

   ONNX Runtime is reached through its C ABI: `RegisterCustomOps` receives OrtApiBase, whose
   GetApi(version) returns the OrtApi table of function pointers. That table is append-only across
   releases; the slots used here are named by their index below. The op is declared with the
   OrtCustomOp layout of API version 16 (status-returning CreateKernelV2/KernelComputeV2).
*/

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "llmc_ort_ops.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

/* ------------------------------------------------------------------------------ the kernel */

enum { MAX_CODEWORDS = 256, ROWS_PER_STEP = 4 };

/* Codes are read this far ahead. In a decode they come from DRAM, and with the hardware prefetcher
   alone the lookups waited on them: a ring of 200 layers of 1536x576 ran 2.1x slower than one hot
   layer, and 1.05-1.07x with this. (A prefetch past the end of the codes is harmless: it never
   faults.) */
enum { PREFETCH_BYTES = 4096 };

/* Prefetch the line PREFETCH_BYTES past p (address arithmetic on integers: it may pass the array's end). */
static inline void prefetch_ahead(const uint8_t *p) {
    __builtin_prefetch((const void *)((uintptr_t)p + PREFETCH_BYTES), 0, 3);
}

/* Tables for code rows i0 .. i0+rows-1 (row i = group i / M, codebook i % M) at stride MAX_CODEWORDS. */
#define TABLE_BODY                                                           \
    for (int r = 0; r < rows; r++) {                                         \
        const int i = i0 + r, j = i / M, m = i % M;                          \
        const float *xj = x + (size_t)j * g;                                 \
        const float *cb = codebooks + (size_t)m * g * C;                     \
        float *out = table + (size_t)r * MAX_CODEWORDS;                      \
        for (int c = 0; c < C; c++) out[c] = xj[0] * cb[c];                  \
        for (int k = 1; k < g; k++) {                                        \
            const float xv = xj[k];                                          \
            const float *w = cb + (size_t)k * C;                             \
            for (int c = 0; c < C; c++) out[c] += xv * w[c];                 \
        }                                                                    \
    }

static void tables_generic(const float *restrict x, const float *restrict codebooks, int M, int g, int C, int i0,
                           int rows, float *restrict table) {
    TABLE_BODY
}

#if defined(__x86_64__)
/* Codeword dot products 64 at a time: four accumulators over the g inputs of the group. */
__attribute__((target("avx512f,fma"))) static void tables_avx512(const float *restrict x,
                                                                 const float *restrict codebooks, int M, int g,
                                                                 int C, int i0, int rows, float *restrict table) {
    if (C % 64) {
        TABLE_BODY
        return;
    }
    for (int r = 0; r < rows; r++) {
        const int i = i0 + r, j = i / M, m = i % M;
        const float *xj = x + (size_t)j * g;
        const float *cb = codebooks + (size_t)m * g * C;
        float *out = table + (size_t)r * MAX_CODEWORDS;
        for (int c = 0; c < C; c += 64) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int k = 0; k < g; k++) {
                const __m512 xv = _mm512_set1_ps(xj[k]);
                const float *w = cb + (size_t)k * C + c;
                a0 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w), a0);
                a1 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + 16), a1);
                a2 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + 32), a2);
                a3 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + 48), a3);
            }
            _mm512_storeu_ps(out + c, a0);
            _mm512_storeu_ps(out + c + 16, a1);
            _mm512_storeu_ps(out + c + 32, a2);
            _mm512_storeu_ps(out + c + 48, a3);
        }
    }
}
#endif

typedef void (*tables_fn)(const float *, const float *, int, int, int, int, int, float *);

/* The widest instruction set this CPU offers the kernel: 0 portable C, 1 AVX-512F (+FMA), 2 also
   AVX-512 BW and VBMI. Probed once. */
static int cpu_level(void) {
    static int level = -1;
    if (level < 0) {
#if defined(__x86_64__)
        __builtin_cpu_init();
        const int f = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
        level = !f ? 0 : __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vbmi") ? 2 : 1;
#else
        level = 0;
#endif
    }
    return level;
}

int llmc_has_avx512(void) { return cpu_level() >= 1; }

#if defined(__x86_64__)
/* partial_sums for 256 codewords with AVX-512 VBMI byte permutes instead of loads: a table's 256
   floats are held as 4 byte planes of 256 bytes (16 registers), and 64 lookups are, per plane, two
   2-register byte permutes and a blend on the code's top bit; 4 unpacks per pair of planes then
   rebuild the floats, exactly. The unpacks work within 128-bit lanes, so the sums come out in a
   fixed permutation of each 64 outputs, undone once at the end. */
#define VBMI_TARGET __attribute__((target("avx512f,avx512bw,avx512vbmi,fma")))

/* by_plane: the byte permute of a 16-float register that puts plane p in its 128-bit lane p. */
VBMI_TARGET static __m512i plane_order(void) {
    uint8_t order[64]; /* byte 4e + p -> byte 16p + e */
    for (int p = 0; p < 4; p++)
        for (int e = 0; e < 16; e++) order[16 * p + e] = (uint8_t)(4 * e + p);
    return _mm512_loadu_si512(order);
}

VBMI_TARGET static void byte_planes(const __m512 t[16], __m512i by_plane, __m512i planes[4][4]) {
    for (int s = 0; s < 4; s++) {
        __m512i u[4];
        for (int r = 0; r < 4; r++) u[r] = _mm512_permutexvar_epi8(by_plane, _mm512_castps_si512(t[4 * s + r]));
        const __m512i a = _mm512_shuffle_i64x2(u[0], u[1], 0x44), b = _mm512_shuffle_i64x2(u[0], u[1], 0xEE);
        const __m512i c = _mm512_shuffle_i64x2(u[2], u[3], 0x44), d = _mm512_shuffle_i64x2(u[2], u[3], 0xEE);
        planes[0][s] = _mm512_shuffle_i64x2(a, c, 0x88);
        planes[1][s] = _mm512_shuffle_i64x2(a, c, 0xDD);
        planes[2][s] = _mm512_shuffle_i64x2(b, d, 0x88);
        planes[3][s] = _mm512_shuffle_i64x2(b, d, 0xDD);
    }
}

VBMI_TARGET static void partial_sums_vbmi(const float *x, const uint8_t *codes, const float *codebooks, int M, int g,
                                          int N, int i0, int i1, float *acc, float *sums) {
    const int chunks = (N + 63) / 64;
    const __mmask64 last = N % 64 ? (((__mmask64)1 << (N % 64)) - 1) : ~(__mmask64)0;
    const __m512i by_plane = plane_order();
    for (int k = 0; k < chunks * 64; k++) sums[k] = 0.0f;
    for (int i = i0; i < i1; i++) {
        const int j = i / M, m = i % M;
        const float *xj = x + (size_t)j * g, *cb = codebooks + (size_t)m * g * MAX_CODEWORDS;
        __m512 t[16];
        for (int q = 0; q < 16; q++) t[q] = _mm512_setzero_ps();
        for (int k = 0; k < g; k++) {
            const __m512 xv = _mm512_set1_ps(xj[k]);
            for (int q = 0; q < 16; q++)
                t[q] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(cb + (size_t)k * MAX_CODEWORDS + 16 * q), t[q]);
        }
        __m512i planes[4][4];
        byte_planes(t, by_plane, planes);
        const uint8_t *row = codes + (size_t)i * N;
        for (int ch = 0; ch < chunks; ch++) {
            prefetch_ahead(row + 64 * ch);
            const __m512i idx = _mm512_maskz_loadu_epi8(ch == chunks - 1 ? last : ~(__mmask64)0, row + 64 * ch);
            const __mmask64 high = _mm512_movepi8_mask(idx);
            __m512i b[4];
            for (int p = 0; p < 4; p++)
                b[p] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(planes[p][0], idx, planes[p][1]),
                                              _mm512_permutex2var_epi8(planes[p][2], idx, planes[p][3]));
            const __m512i lo01 = _mm512_unpacklo_epi8(b[0], b[1]), hi01 = _mm512_unpackhi_epi8(b[0], b[1]);
            const __m512i lo23 = _mm512_unpacklo_epi8(b[2], b[3]), hi23 = _mm512_unpackhi_epi8(b[2], b[3]);
            const __m512i f[4] = {_mm512_unpacklo_epi16(lo01, lo23), _mm512_unpackhi_epi16(lo01, lo23),
                                  _mm512_unpacklo_epi16(hi01, hi23), _mm512_unpackhi_epi16(hi01, hi23)};
            float *out = sums + 64 * ch;
            for (int q = 0; q < 4; q++)
                _mm512_storeu_ps(out + 16 * q, _mm512_add_ps(_mm512_loadu_ps(out + 16 * q), _mm512_castsi512_ps(f[q])));
        }
    }
    /* sums[64c + 16q + 4l + e] is output n = 64c + 16l + 4q + e */
    for (int n = 0; n < N; n++) {
        const int r = n % 64;
        acc[n] = sums[n - r + 16 * ((r % 16) / 4) + 4 * (r / 16) + r % 4];
    }
}
#endif

/* acc[n] = sum over code rows i in [i0, i1) of table_i[codes[i, n]], for one token x [K].

   The tables of four code rows (4 KiB) are built and consumed at once, so they never leave L1.
   Scalar loads, not AVX-512 gathers: on the Zen 4 cores this was written on, the scalar loop took
   1.2-1.45x less time per layer than vgatherdps versions (SmolLM2's shapes, one token, measured
   while other work shared the cores; benchmarks/vq_linear.py times the op as shipped). */
static void partial_sums(tables_fn tables, const float *x, const uint8_t *codes, const float *codebooks, int M, int g,
                         int C, int N, int i0, int i1, float *acc) {
    float table[ROWS_PER_STEP * MAX_CODEWORDS];
    for (int n = 0; n < N; n++) acc[n] = 0.0f;
    int i = i0;
    for (; i + ROWS_PER_STEP <= i1; i += ROWS_PER_STEP) {
        tables(x, codebooks, M, g, C, i, ROWS_PER_STEP, table);
        const float *t0 = table, *t1 = t0 + MAX_CODEWORDS, *t2 = t1 + MAX_CODEWORDS, *t3 = t2 + MAX_CODEWORDS;
        const uint8_t *r0 = codes + (size_t)i * N, *r1 = r0 + N, *r2 = r1 + N, *r3 = r2 + N;
        for (int n = 0; n < ROWS_PER_STEP * N; n += 64) prefetch_ahead(r0 + n);
        for (int n = 0; n < N; n++) acc[n] += (t0[r0[n]] + t1[r1[n]]) + (t2[r2[n]] + t3[r3[n]]);
    }
    for (; i < i1; i++) {
        tables(x, codebooks, M, g, C, i, 1, table);
        const uint8_t *r0 = codes + (size_t)i * N;
        for (int n = 0; n < N; n++) acc[n] += table[r0[n]];
    }
}

/* ---------------------------------------------------------------- many tokens: dequantize, multiply */

enum { BLOCK_ROWS = 32, LUT_MAX_TOKENS = 8 };

/* w[r, :] = scales[n] * sum_m codewords[m, codes[j*M+m, n], :] for rows n = n0 + r < n1: [rows, K]. */
static void dequantize_rows(const uint8_t *codes, const float *codewords, const float *scales, int N, int M, int g,
                            int C, int J, int n0, int n1, float *w) {
    const int K = J * g;
    for (int n = n0; n < n1; n++) {
        float *row = w + (size_t)(n - n0) * K;
        for (int j = 0; j < J; j++) {
            float *out = row + (size_t)j * g;
            const float *first = codewords + (size_t)codes[(size_t)j * M * N + n] * g;
            for (int k = 0; k < g; k++) out[k] = first[k];
            for (int m = 1; m < M; m++) {
                const float *word = codewords + ((size_t)m * C + codes[((size_t)j * M + m) * N + n]) * g;
                for (int k = 0; k < g; k++) out[k] += word[k];
            }
        }
        for (int k = 0; k < K; k++) row[k] *= scales[n];
    }
}

/* y[t, n0 + r] = x[t] · w[r] for all T tokens and `rows` rows; y has row stride N. */
static void multiply_generic(const float *x, int64_t T, int K, const float *w, int rows, float *y, int N, int n0) {
    for (int64_t t = 0; t < T; t++)
        for (int r = 0; r < rows; r++) {
            const float *a = x + (size_t)t * K, *b = w + (size_t)r * K;
            float sum = 0.0f;
            for (int k = 0; k < K; k++) sum += a[k] * b[k];
            y[(size_t)t * N + n0 + r] = sum;
        }
}

#if defined(__x86_64__)
/* dequantize_rows for groups of at most 16 weights: one masked 16-float operation per codeword. */
__attribute__((target("avx512f"))) static void dequantize_rows_avx512(const uint8_t *codes, const float *codewords,
                                                                      const float *scales, int N, int M, int g,
                                                                      int C, int J, int n0, int n1, float *w) {
    if (g > 16) {
        dequantize_rows(codes, codewords, scales, N, M, g, C, J, n0, n1, w);
        return;
    }
    const int K = J * g;
    if (g == 8) { /* whole 8-float registers: masked stores are slow on some cores */
        for (int n = n0; n < n1; n++) {
            float *row = w + (size_t)(n - n0) * K;
            const __m256 scale = _mm256_set1_ps(scales[n]);
            for (int j = 0; j < J; j++) {
                const uint8_t *code = codes + (size_t)j * M * N + n;
                __m256 sum = _mm256_loadu_ps(codewords + (size_t)code[0] * 8);
                for (int m = 1; m < M; m++)
                    sum = _mm256_add_ps(sum, _mm256_loadu_ps(codewords + ((size_t)m * C + code[(size_t)m * N]) * 8));
                _mm256_storeu_ps(row + (size_t)j * 8, _mm256_mul_ps(sum, scale));
            }
        }
        return;
    }
    const __mmask16 mask = (__mmask16)((1u << g) - 1u);
    for (int n = n0; n < n1; n++) {
        float *row = w + (size_t)(n - n0) * K;
        const __m512 scale = _mm512_set1_ps(scales[n]);
        for (int j = 0; j < J; j++) {
            const uint8_t *code = codes + (size_t)j * M * N + n;
            __m512 sum = _mm512_maskz_loadu_ps(mask, codewords + (size_t)code[0] * g);
            for (int m = 1; m < M; m++)
                sum = _mm512_add_ps(
                    sum, _mm512_maskz_loadu_ps(mask, codewords + ((size_t)m * C + code[(size_t)m * N]) * g));
            _mm512_mask_storeu_ps(row + (size_t)j * g, mask, _mm512_mul_ps(sum, scale));
        }
    }
}
#endif

#if defined(__x86_64__)
/* y[t + a, n0 + r + b] = x[t + a] · w[r + b] for a < tb, b < rb (at most 4 x 4: 16 accumulators; per
   16 weights, tb + rb loads feed tb * rb FMAs). Inlined with constant tb, rb. */
__attribute__((target("avx512f,fma"), always_inline)) static inline void micro_avx512(
    const float *x, int K, const float *w, float *y, int N, int tb, int rb) {
    const int full = K & ~15;
    const __mmask16 tail = (__mmask16)((1u << (K - full)) - 1u);
    __m512 acc[4][4];
    for (int a = 0; a < tb; a++)
        for (int b = 0; b < rb; b++) acc[a][b] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 16) {
        const __mmask16 mask = k < full ? (__mmask16)0xFFFF : tail;
        __m512 xv[4], wv[4];
        for (int a = 0; a < tb; a++) xv[a] = _mm512_maskz_loadu_ps(mask, x + (size_t)a * K + k);
        for (int b = 0; b < rb; b++) wv[b] = _mm512_maskz_loadu_ps(mask, w + (size_t)b * K + k);
        for (int a = 0; a < tb; a++)
            for (int b = 0; b < rb; b++) acc[a][b] = _mm512_fmadd_ps(xv[a], wv[b], acc[a][b]);
    }
    for (int a = 0; a < tb; a++)
        for (int b = 0; b < rb; b++) y[(size_t)a * N + b] = _mm512_reduce_add_ps(acc[a][b]);
}

/* multiply_generic with AVX-512: blocks of 4 tokens x 4 rows, then the tails. */
__attribute__((target("avx512f,fma"))) static void multiply_avx512(const float *x, int64_t T, int K, const float *w,
                                                                   int rows, float *y, int N, int n0) {
    for (int64_t t = 0; t < T; t += 4) {
        const float *xt = x + (size_t)t * K;
        float *yt = y + (size_t)t * N + n0;
        int r = 0;
        if (t + 4 <= T) {
            for (; r + 4 <= rows; r += 4) micro_avx512(xt, K, w + (size_t)r * K, yt + r, N, 4, 4);
            for (; r < rows; r++) micro_avx512(xt, K, w + (size_t)r * K, yt + r, N, 4, 1);
        } else {
            for (int64_t a = t; a < T; a++, xt += K, yt += N) {
                for (r = 0; r + 4 <= rows; r += 4) micro_avx512(xt, K, w + (size_t)r * K, yt + r, N, 1, 4);
                for (; r < rows; r++) micro_avx512(xt, K, w + (size_t)r * K, yt + r, N, 1, 1);
            }
        }
    }
}
#endif

typedef void (*multiply_fn)(const float *, int64_t, int, const float *, int, float *, int, int);
typedef void (*dequantize_fn)(const uint8_t *, const float *, const float *, int, int, int, int, int, int, int,
                              float *);

/* The work of one op call, shared by its parallel tasks. */
typedef struct {
    tables_fn tables;
    multiply_fn multiply;
    dequantize_fn dequantize;
    const float *x, *codebooks, *scales, *codewords;
    const uint8_t *codes;
    float *y, *partial; /* partial: [segments, N] for one token split by code rows */
    int64_t T;
    int K, N, M, g, C, JM, segments, vbmi, failed;
} vq_call;

int llmc_vq_isa_limit = 2; /* llmc_ort_ops.h */

static vq_call make_call(const float *x, int64_t T, int K, const uint8_t *codes, const float *codebooks,
                         const float *scales, const float *codewords, float *y, int N, int M, int g, int C) {
    const int level = cpu_level() < llmc_vq_isa_limit ? cpu_level() : llmc_vq_isa_limit;
    vq_call c = {0};
#if defined(__x86_64__)
    c.tables = level >= 1 ? tables_avx512 : tables_generic;
    c.multiply = level >= 1 ? multiply_avx512 : multiply_generic;
    c.dequantize = level >= 1 ? dequantize_rows_avx512 : dequantize_rows;
    c.vbmi = level >= 2;
#else
    c.tables = tables_generic;
    c.multiply = multiply_generic;
    c.dequantize = dequantize_rows;
#endif
    c.x = x, c.codebooks = codebooks, c.scales = scales, c.codewords = codewords, c.codes = codes, c.y = y;
    c.T = T, c.K = K, c.N = N, c.M = M, c.g = g, c.C = C, c.JM = K / g * M, c.segments = 1;
    return c;
}

void llmc_multiply_rows(const float *x, int64_t T, int K, const float *w, int rows, float *y, int N, int n0) {
    make_call(x, T, K, NULL, NULL, NULL, NULL, y, N, 1, 1, 1).multiply(x, T, K, w, rows, y, N, n0);
}

static void block_task(void *arg, size_t b) {
    vq_call *c = (vq_call *)arg;
    const int n0 = (int)b * BLOCK_ROWS, n1 = n0 + BLOCK_ROWS < c->N ? n0 + BLOCK_ROWS : c->N;
    float *w = (float *)malloc(sizeof(float) * (size_t)(n1 - n0) * c->K);
    if (!w) {
        c->failed = 1; /* (a racy store of the same value) */
        return;
    }
    c->dequantize(c->codes, c->codewords, c->scales, c->N, c->M, c->g, c->C, c->K / c->g, n0, n1, w);
    c->multiply(c->x, c->T, c->K, w, n1 - n0, c->y, c->N, n0);
    free(w);
}

/* partial_sums with the fastest kernel for the call; sets c->failed when out of memory. */
static void code_sums(vq_call *c, const float *x, int i0, int i1, float *acc) {
#if defined(__x86_64__)
    if (c->vbmi && c->C == MAX_CODEWORDS) {
        float *sums = (float *)malloc(sizeof(float) * (size_t)((c->N + 63) / 64) * 64);
        if (!sums) {
            c->failed = 1;
            return;
        }
        partial_sums_vbmi(x, c->codes, c->codebooks, c->M, c->g, c->N, i0, i1, acc, sums);
        free(sums);
        return;
    }
#endif
    partial_sums(c->tables, x, c->codes, c->codebooks, c->M, c->g, c->C, c->N, i0, i1, acc);
}

static void token_task(void *arg, size_t t) {
    vq_call *c = (vq_call *)arg;
    float *y = c->y + (size_t)t * c->N;
    code_sums(c, c->x + (size_t)t * c->K, 0, c->JM, y);
    for (int n = 0; n < c->N; n++) y[n] *= c->scales[n];
}

static void segment_task(void *arg, size_t s) {
    vq_call *c = (vq_call *)arg;
    /* segment bounds on multiples of ROWS_PER_STEP */
    const int steps = (c->JM + ROWS_PER_STEP - 1) / ROWS_PER_STEP;
    const int i0 = (int)((size_t)steps * s / c->segments) * ROWS_PER_STEP;
    int i1 = (int)((size_t)steps * (s + 1) / c->segments) * ROWS_PER_STEP;
    if (i1 > c->JM) i1 = c->JM;
    code_sums(c, c->x, i0, i1, c->partial + s * (size_t)c->N);
}

/* Segments of one decode token: enough for a few threads, each at least 16 code rows. */
enum { DECODE_SEGMENTS = 4, MIN_SEGMENT_ROWS = 16 };

/* y for all tokens; `parallel` runs task(arg, i) for i < total (possibly concurrently). Returns 0, or
   2 when out of memory. */
static int vq_linear_run(vq_call *c, parallel_fn parallel, void *context) {
    if (c->T > LUT_MAX_TOKENS) {
        parallel(context, block_task, (size_t)(c->N + BLOCK_ROWS - 1) / BLOCK_ROWS, c);
        return c->failed ? 2 : 0;
    }
    if (c->T != 1) {
        parallel(context, token_task, (size_t)c->T, c);
        return c->failed ? 2 : 0;
    }
    int segments = c->JM / MIN_SEGMENT_ROWS;
    c->segments = segments < 1 ? 1 : segments > DECODE_SEGMENTS ? DECODE_SEGMENTS : segments;
    if (c->segments == 1) {
        token_task(c, 0);
        return c->failed ? 2 : 0;
    }
    c->partial = (float *)malloc(sizeof(float) * (size_t)c->segments * c->N);
    if (!c->partial) return 2;
    parallel(context, segment_task, (size_t)c->segments, c);
    for (int n = 0; n < c->N && !c->failed; n++) {
        float sum = 0.0f;
        for (int s = 0; s < c->segments; s++) sum += c->partial[(size_t)s * c->N + n];
        c->y[n] = sum * c->scales[n];
    }
    free(c->partial);
    c->partial = NULL;
    return c->failed ? 2 : 0;
}

void llmc_serial(void *context, void (*task)(void *, size_t), size_t total, void *arg) {
    (void)context;
    for (size_t i = 0; i < total; i++) task(arg, i);
}

/* The op without ONNX Runtime (tests call it through ctypes): y [T, N] for x [T, K], single thread.
   Returns 0, 1 on inconsistent sizes, 2 out of memory. */
int llmc_vq_linear(const float *x, int64_t T, int K, const uint8_t *codes, const float *codebooks,
                   const float *scales, const float *codewords, float *y, int N, int M, int g, int C) {
    if (g <= 0 || M <= 0 || C <= 0 || C > MAX_CODEWORDS || K % g || T < 0 || N < 0) return 1;
    vq_call c = make_call(x, T, K, codes, codebooks, scales, codewords, y, N, M, g, C);
    return vq_linear_run(&c, llmc_serial, NULL);
}

/* ------------------------------------------------------------- the ONNX Runtime binding */

typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtShape OrtShape; /* OrtTensorTypeAndShapeInfo */
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtDomain OrtDomain; /* OrtCustomOpDomain */

typedef void *const *OrtApiTable;
typedef struct {
    OrtApiTable (*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

/* OrtApi slots (index in the table) used here, with the API version that added them. */
enum {
    SLOT_CreateStatus = 0,                   /* 1 */
    SLOT_CreateCustomOpDomain = 26,          /* 1 */
    SLOT_CustomOpDomain_Add = 27,            /* 1 */
    SLOT_AddCustomOpDomain = 28,             /* 1 */
    SLOT_GetTensorMutableData = 51,          /* 1 */
    SLOT_GetDimensionsCount = 61,            /* 1 */
    SLOT_GetDimensions = 62,                 /* 1 */
    SLOT_GetTensorTypeAndShape = 65,         /* 1 */
    SLOT_KernelInfoGetAttribute_int64 = 86,  /* 1 */
    SLOT_KernelContext_GetInput = 90,        /* 1 */
    SLOT_KernelContext_GetOutput = 91,       /* 1 */
    SLOT_ReleaseStatus = 93,                 /* 1 */
    SLOT_ReleaseTensorTypeAndShapeInfo = 99, /* 1 */
    SLOT_KernelContext_ParallelFor = 274,    /* 17 */
};
enum { OP_API_VERSION = 16, PARALLEL_API_VERSION = 17 };
enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };
enum { TYPE_FLOAT = 1, TYPE_UINT8 = 2, TYPE_INT32 = 6 };
enum { IO_REQUIRED = 0, IO_OPTIONAL = 1 };
enum { MAX_RANK = 8 };

typedef OrtStatus *(*CreateStatus_t)(int code, const char *msg);
typedef OrtStatus *(*CreateCustomOpDomain_t)(const char *domain, OrtDomain **out);
typedef OrtStatus *(*CustomOpDomain_Add_t)(OrtDomain *domain, const void *op);
typedef OrtStatus *(*AddCustomOpDomain_t)(OrtSessionOptions *options, OrtDomain *domain);
typedef OrtStatus *(*GetTensorMutableData_t)(const OrtValue *value, void **out);
typedef OrtStatus *(*GetDimensionsCount_t)(const OrtShape *info, size_t *out);
typedef OrtStatus *(*GetDimensions_t)(const OrtShape *info, int64_t *dims, size_t n);
typedef OrtStatus *(*GetTensorTypeAndShape_t)(const OrtValue *value, OrtShape **out);
typedef OrtStatus *(*KernelContext_GetInput_t)(const OrtKernelContext *context, size_t index, const OrtValue **out);
typedef OrtStatus *(*KernelContext_GetOutput_t)(OrtKernelContext *context, size_t index, const int64_t *dims,
                                                size_t rank, OrtValue **out);
typedef void (*ReleaseTensorTypeAndShapeInfo_t)(OrtShape *info);
typedef OrtStatus *(*KernelInfoGetAttribute_int64_t)(const OrtKernelInfo *info, const char *name, int64_t *out);
typedef void (*ReleaseStatus_t)(OrtStatus *status);
typedef OrtStatus *(*KernelContext_ParallelFor_t)(const OrtKernelContext *context, void (*fn)(void *, size_t),
                                                  size_t total, size_t num_batch, void *arg);

#define ORT(name) ((name##_t)ort[SLOT_##name])

static OrtApiTable ort;     /* set by RegisterCustomOps */
static int ort_parallel;    /* whether the runtime has KernelContext_ParallelFor */

/* OrtCustomOp as laid out for API version 16. */
typedef struct OrtCustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct OrtCustomOp *op, OrtApiTable api, const OrtKernelInfo *info);
    const char *(*GetName)(const struct OrtCustomOp *op);
    const char *(*GetExecutionProviderType)(const struct OrtCustomOp *op);
    int (*GetInputType)(const struct OrtCustomOp *op, size_t index);
    size_t (*GetInputTypeCount)(const struct OrtCustomOp *op);
    int (*GetOutputType)(const struct OrtCustomOp *op, size_t index);
    size_t (*GetOutputTypeCount)(const struct OrtCustomOp *op);
    void (*KernelCompute)(void *kernel, OrtKernelContext *context);
    void (*KernelDestroy)(void *kernel);
    int (*GetInputCharacteristic)(const struct OrtCustomOp *op, size_t index);
    int (*GetOutputCharacteristic)(const struct OrtCustomOp *op, size_t index);
    int (*GetInputMemoryType)(const struct OrtCustomOp *op, size_t index); /* API 13 */
    int (*GetVariadicInputMinArity)(const struct OrtCustomOp *op);        /* API 14 */
    int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *op);
    int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *op);
    int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *op);
    OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *op, OrtApiTable api, const OrtKernelInfo *info,
                                 void **kernel); /* API 16 */
    OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *context);
} OrtCustomOp;

static int kernel_state; /* the op keeps no state: every kernel is this address */

static void *create_kernel(const OrtCustomOp *op, OrtApiTable api, const OrtKernelInfo *info) {
    (void)op, (void)api, (void)info;
    return &kernel_state;
}
static OrtStatus *create_kernel_v2(const OrtCustomOp *op, OrtApiTable api, const OrtKernelInfo *info, void **kernel) {
    *kernel = create_kernel(op, api, info);
    return NULL;
}
static const char *op_name(const OrtCustomOp *op) { return (void)op, "VQLinear"; }
static const char *op_provider(const OrtCustomOp *op) { return (void)op, "CPUExecutionProvider"; }
static int input_type(const OrtCustomOp *op, size_t i) { return (void)op, i == 1 ? TYPE_UINT8 : TYPE_FLOAT; }
static size_t input_count(const OrtCustomOp *op) { return (void)op, 5; }
static int output_type(const OrtCustomOp *op, size_t i) { return (void)op, (void)i, TYPE_FLOAT; }
static size_t output_count(const OrtCustomOp *op) { return (void)op, 1; }
static void kernel_destroy(void *kernel) { (void)kernel; }
static int required(const OrtCustomOp *op, size_t i) { return (void)op, (void)i, IO_REQUIRED; }
static int default_memory(const OrtCustomOp *op, size_t i) { return (void)op, (void)i, 0; }
static int one(const OrtCustomOp *op) { return (void)op, 1; }
static int zero(const OrtCustomOp *op) { return (void)op, 0; }

/* A tensor's data pointer and shape (rank <= MAX_RANK). */
static OrtStatus *tensor(const OrtValue *value, void **data, int64_t *dims, size_t *rank) {
    OrtShape *info = NULL;
    OrtStatus *status = ORT(GetTensorTypeAndShape)(value, &info);
    if (!status) status = ORT(GetDimensionsCount)(info, rank);
    if (!status && *rank > MAX_RANK) status = ORT(CreateStatus)(ORT_INVALID_ARGUMENT, "VQLinear: rank above 8");
    if (!status) status = ORT(GetDimensions)(info, dims, *rank);
    if (info) ORT(ReleaseTensorTypeAndShapeInfo)(info);
    if (!status) status = ORT(GetTensorMutableData)(value, data);
    return status;
}

static void parallel_ort(void *context, void (*task)(void *, size_t), size_t total, void *arg) {
    if (!ort_parallel || total < 2 ||
        ORT(KernelContext_ParallelFor)((const OrtKernelContext *)context, task, total, total, arg))
        llmc_serial(NULL, task, total, arg); /* (a failed ParallelFor leaks its status; it has never been seen to fail) */
}

static OrtStatus *kernel_compute(void *kernel, OrtKernelContext *context) {
    (void)kernel;
    void *data[5];
    int64_t dims[5][MAX_RANK];
    size_t rank[5];
    for (size_t i = 0; i < 5; i++) {
        const OrtValue *value = NULL;
        OrtStatus *status = ORT(KernelContext_GetInput)(context, i, &value);
        if (!status) status = tensor(value, &data[i], dims[i], &rank[i]);
        if (status) return status;
    }
    if (rank[0] < 1 || rank[1] != 2 || rank[2] != 3 || rank[3] != 1 || rank[4] != 3)
        return ORT(CreateStatus)(ORT_INVALID_ARGUMENT, "VQLinear: expected x [..., K], codes [J*M, N], codebooks "
                                                       "[M, g, C], scales [N], codewords [M, C, g]");
    const int64_t K = dims[0][rank[0] - 1], JM = dims[1][0], N = dims[1][1];
    const int64_t M = dims[2][0], g = dims[2][1], C = dims[2][2];
    if (M < 1 || g < 1 || C < 1 || C > MAX_CODEWORDS || K % g || K / g * M != JM || dims[3][0] != N ||
        dims[4][0] != M || dims[4][1] != C || dims[4][2] != g || K > INT32_MAX || N > INT32_MAX || JM > INT32_MAX)
        return ORT(CreateStatus)(ORT_INVALID_ARGUMENT, "VQLinear: inconsistent sizes (need K = J*g, codes [J*M, N], "
                                                       "codebooks [M, g, C <= 256], scales [N], codewords [M, C, g])");
    int64_t out_dims[MAX_RANK], T = 1;
    for (size_t d = 0; d + 1 < rank[0]; d++) T *= (out_dims[d] = dims[0][d]);
    out_dims[rank[0] - 1] = N;
    OrtValue *out = NULL;
    void *y = NULL;
    OrtStatus *status = ORT(KernelContext_GetOutput)(context, 0, out_dims, rank[0], &out);
    if (!status) status = ORT(GetTensorMutableData)(out, &y);
    if (status) return status;
    vq_call c = make_call(data[0], T, (int)K, data[1], data[2], data[3], data[4], y, (int)N, (int)M, (int)g, (int)C);
    if (vq_linear_run(&c, parallel_ort, context)) return ORT(CreateStatus)(ORT_FAIL, "VQLinear: out of memory");
    return NULL;
}

static void kernel_compute_v1(void *kernel, OrtKernelContext *context) { (void)kernel_compute(kernel, context); }

static const OrtCustomOp vq_linear_op = {
    OP_API_VERSION, create_kernel, op_name, op_provider, input_type, input_count, output_type, output_count,
    kernel_compute_v1, kernel_destroy, required, required, default_memory, one, zero, one, zero, create_kernel_v2,
    kernel_compute,
};

/* Multiply-adds below which CQEncode runs on the calling thread: in a SmolLM2 decode step (batch 1, 3 KV
   heads) ONNX Runtime's pool cost more than the op's work. (CQAttention's three (batch, head) tasks of
   such a step gained from the pool: 59 against 73 µs a call.) */
enum { PARALLEL_MIN_WORK = 1 << 18 };

/* llmc.CQAttention (cq_ort.c): 11 inputs, codes at 1 and 4; one output. */
static int input_type_float(const OrtCustomOp *op, size_t i) { return (void)op, (void)i, TYPE_FLOAT; }
static const char *cq_name(const OrtCustomOp *op) { return (void)op, "CQAttention"; }
static int cq_input_type(const OrtCustomOp *op, size_t i) {
    return (void)op, i == 1 || i == 4 ? TYPE_UINT8 : TYPE_FLOAT;
}
static size_t cq_input_count(const OrtCustomOp *op) { return (void)op, 11; }

static OrtStatus *cq_invalid(const char *what) {
    char message[400]; /* CreateStatus copies it */
    strcpy(message, "CQAttention: expected q [B, H, R, D], key/value codes [B, H, P, G], new keys/values [B, H, S, D], "
                    "codebooks [H, G, K <= 256, c] with G * c = D <= 1024, cos/sin [B|1, 1, >= P+S, rot <= D, even], "
                    "bias [B|1, 1, R, >= P+S], scale [1]; ");
    strncat(message, what, sizeof message - strlen(message) - 1);
    return ORT(CreateStatus)(ORT_INVALID_ARGUMENT, message);
}

static OrtStatus *cq_compute(void *kernel, OrtKernelContext *context) {
    (void)kernel;
    enum { Q, KC, KN, KB, VC, VN, VB, COS, SIN, BIAS, SCALE, N_IN };
    void *data[N_IN];
    int64_t dims[N_IN][MAX_RANK];
    size_t rank[N_IN];
    for (size_t i = 0; i < N_IN; i++) {
        const OrtValue *value = NULL;
        OrtStatus *status = ORT(KernelContext_GetInput)(context, i, &value);
        if (!status) status = tensor(value, &data[i], dims[i], &rank[i]);
        if (status) return status;
    }
    for (size_t i = 0; i < SCALE; i++)
        if (rank[i] != 4) return cq_invalid("an input is not 4-D");
    const int64_t *q = dims[Q], *kc = dims[KC], *vc = dims[VC], *kn = dims[KN], *vn = dims[VN], *kb = dims[KB],
                  *vb = dims[VB];
    const int64_t B = q[0], H = q[1], R = q[2], D = q[3], P = kc[2], S = kn[2];
    for (int k = 0; k < 4; k++)
        if (kn[k] != vn[k]) return cq_invalid("new keys and values differ in shape");
    if (kc[0] != B || kc[1] != H || vc[0] != B || vc[1] != H || vc[2] != P || kn[0] != B || kn[1] != H ||
        kn[3] != D || kb[0] != H || vb[0] != H || kb[1] != kc[3] || vb[1] != vc[3] || kb[1] * kb[3] != D ||
        vb[1] * vb[3] != D || P + S < 1)
        return cq_invalid("codes, new tokens or codebooks do not match q");
    if (D > 1024 || kb[2] < 1 || kb[2] > 256 || vb[2] < 1 || vb[2] > 256)
        return cq_invalid("head or codebook too large");
    const int64_t *cs = dims[COS], *sn = dims[SIN], *bi = dims[BIAS];
    for (int k = 0; k < 4; k++)
        if (cs[k] != sn[k]) return cq_invalid("cos and sin differ in shape");
    if ((cs[0] != B && cs[0] != 1) || cs[1] != 1 || cs[2] < P + S || cs[3] > D || cs[3] % 2)
        return cq_invalid("bad RoPE tables");
    if ((bi[0] != B && bi[0] != 1) || bi[1] != 1 || bi[2] != R || bi[3] < P + S) return cq_invalid("bad bias");
    if (rank[SCALE] > 1 || (rank[SCALE] == 1 && dims[SCALE][0] != 1)) return cq_invalid("scale is not one value");
    OrtValue *out = NULL;
    void *out_data = NULL;
    OrtStatus *status = ORT(KernelContext_GetOutput)(context, 0, q, 4, &out);
    if (!status) status = ORT(GetTensorMutableData)(out, &out_data);
    if (status) return status;
    const llmc_cq_attention_args args = {
        .q = data[Q], .key_codes = data[KC], .key_new = data[KN], .value_codes = data[VC], .value_new = data[VN],
        .key_codebooks = data[KB], .value_codebooks = data[VB], .cos = data[COS], .signed_sin = data[SIN],
        .bias = data[BIAS], .scale = *(const float *)data[SCALE], .B = B, .H = H, .R = R, .P = P, .S = S, .D = D,
        .Gk = kb[1], .Kk = kb[2], .ck = kb[3], .Gv = vb[1], .Kv = vb[2], .cv = vb[3], .rot = cs[3],
        .table_batch_stride = cs[0] == 1 ? 0 : cs[2] * cs[3], .bias_cols = bi[3],
        .bias_batch_stride = bi[0] == 1 ? 0 : R * bi[3], .out = out_data};
    if (llmc_cq_attention_run(&args, parallel_ort, context))
        return ORT(CreateStatus)(ORT_FAIL, "CQAttention: out of memory");
    return NULL;
}

static void cq_compute_v1(void *kernel, OrtKernelContext *context) { (void)cq_compute(kernel, context); }

static const OrtCustomOp cq_attention_op = {
    OP_API_VERSION, create_kernel, cq_name, op_provider, cq_input_type, cq_input_count, output_type,
    output_count, cq_compute_v1, kernel_destroy, required, required, default_memory, one, zero, one, zero,
    create_kernel_v2, cq_compute,
};

/* llmc.CQEncode (cq_ort.c): x, codebooks_t, norms -> uint8 codes. */
static const char *encode_name(const OrtCustomOp *op) { return (void)op, "CQEncode"; }
static size_t encode_input_count(const OrtCustomOp *op) { return (void)op, 3; }
static int encode_output_type(const OrtCustomOp *op, size_t i) { return (void)op, (void)i, TYPE_UINT8; }

static OrtStatus *encode_compute(void *kernel, OrtKernelContext *context) {
    (void)kernel;
    void *data[3];
    int64_t dims[3][MAX_RANK];
    size_t rank[3];
    for (size_t i = 0; i < 3; i++) {
        const OrtValue *value = NULL;
        OrtStatus *status = ORT(KernelContext_GetInput)(context, i, &value);
        if (!status) status = tensor(value, &data[i], dims[i], &rank[i]);
        if (status) return status;
    }
    const int64_t *x = dims[0], *cb = dims[1], *nm = dims[2];
    if (rank[0] != 4 || rank[1] != 4 || rank[2] != 3 || cb[0] != x[1] || cb[1] * cb[2] != x[3] || cb[3] < 1 ||
        cb[3] > 256 || nm[0] != cb[0] || nm[1] != cb[1] || nm[2] != cb[3])
        return ORT(CreateStatus)(ORT_INVALID_ARGUMENT, "CQEncode: expected x [B, H, S, G*c], codebooks_t [H, G, c, "
                                                       "K <= 256], norms [H, G, K]");
    const int64_t out_dims[4] = {x[0], x[1], x[2], cb[1]};
    OrtValue *out = NULL;
    void *codes = NULL;
    OrtStatus *status = ORT(KernelContext_GetOutput)(context, 0, out_dims, 4, &out);
    if (!status) status = ORT(GetTensorMutableData)(out, &codes);
    if (status) return status;
    const llmc_cq_encode_args args = {.x = data[0], .codebooks_t = data[1], .norms = data[2], .B = x[0], .H = x[1],
                                      .S = x[2], .G = cb[1], .K = cb[3], .c = cb[2], .codes = codes};
    const int small = x[0] * x[1] * x[2] * x[3] * cb[3] < PARALLEL_MIN_WORK;
    llmc_cq_encode_run(&args, small ? llmc_serial : parallel_ort, context);
    return NULL;
}

static void encode_compute_v1(void *kernel, OrtKernelContext *context) { (void)encode_compute(kernel, context); }

static const OrtCustomOp cq_encode_op = {
    OP_API_VERSION, create_kernel, encode_name, op_provider, input_type_float, encode_input_count,
    encode_output_type, output_count, encode_compute_v1, kernel_destroy, required, required, default_memory, one,
    zero, one, zero, create_kernel_v2, encode_compute,
};

/* llmc.CQCachedAttention (cq_ort.c): CQAttention that also writes the step's codes into the cache. 13 inputs:
   q [B, S, Hq * D] (the step's query heads, rotated; R = Hq / H * S rows a KV head); key, value [B, S, H * D] (the
   key before RoPE); past key / value codes [B, H, C, G], whose first
   P = T - S positions are the past (T: the bias's last dimension); key / value codebooks [H, G, K, c] and their
   squared norms [H, G, K] (the search reads the codebooks the attention reads); cos, signed_sin
   [B|1, 1, >= T, rot]; bias [B|1, 1, R, T]; scale [1]; optionally q_cos, q_signed_sin [B|1, 1, S, rot], the
   tables of the step's positions, with which the op rotates q itself (q then before RoPE). Without key and
   value, q is a packed projection [B, S, (Hq + 2 H) * D]: q, then the key, then the value. Outputs: out
   [B, S, Hq * D] and the present key / value codes [B, H, max(C, T), G]: the past's with the step's codes at
   [P, T). A present bound to its past's buffer (ONNX Runtime's IO binding)
   is that buffer written in place; any other is the past copied first. */
enum { CQC_Q, CQC_K, CQC_V, CQC_KC, CQC_VC, CQC_KB, CQC_VB, CQC_KN, CQC_VN, CQC_COS, CQC_SIN, CQC_BIAS, CQC_SCALE,
       CQC_QCOS, CQC_QSIN, CQC_INPUTS };
static const char *cqc_name(const OrtCustomOp *op) { return (void)op, "CQCachedAttention"; }
static int cqc_input_type(const OrtCustomOp *op, size_t i) {
    return (void)op, i == CQC_KC || i == CQC_VC ? TYPE_UINT8 : TYPE_FLOAT;
}
static size_t cqc_input_count(const OrtCustomOp *op) { return (void)op, CQC_INPUTS; }
static int cqc_input_characteristic(const OrtCustomOp *op, size_t i) {
    return (void)op, i < CQC_QCOS && i != CQC_K && i != CQC_V ? IO_REQUIRED : IO_OPTIONAL;
}
static int cqc_output_type(const OrtCustomOp *op, size_t i) { return (void)op, i == 0 ? TYPE_FLOAT : TYPE_UINT8; }
static size_t cqc_output_count(const OrtCustomOp *op) { return (void)op, 3; }

static OrtStatus *cqc_invalid(const char *what) {
    char message[512]; /* CreateStatus copies it */
    strcpy(message, "CQCachedAttention: expected q [B, S, Hq*D], key/value [B, S, H*D] (or neither and q packed "
                    "[B, S, (Hq+2H)*D]), past codes [B, H, C, G], "
                    "codebooks [H, G, K <= 256, c] and their norms [H, G, K] with G * c = D, "
                    "cos/sin [B|1, 1, >= T, rot], bias [B|1, 1, R, T] with S <= T <= C + S, scale [1], "
                    "optional q_cos/q_sin [B|1, 1, S, rot]; ");
    strncat(message, what, sizeof message - strlen(message) - 1);
    return ORT(CreateStatus)(ORT_INVALID_ARGUMENT, message);
}

/* The present codes: the past (unless they are one buffer), and in `encoding` the job that writes the codes of
   x's S tokens at [P, P + S) of it. */
static OrtStatus *cqc_present(OrtKernelContext *context, size_t index, const uint8_t *past, const int64_t *pc,
                              const float *x, int64_t x_token_stride, const float *book, const float *norms,
                              const int64_t *bd, int64_t S, int64_t P, int64_t T, llmc_cq_encode_args *encoding) {
    const int64_t B = pc[0], H = pc[1], C = pc[2], G = pc[3], capacity = C > T ? C : T;
    const int64_t dims[4] = {B, H, capacity, G};
    OrtValue *out = NULL;
    void *data = NULL;
    OrtStatus *status = ORT(KernelContext_GetOutput)(context, index, dims, 4, &out);
    if (!status) status = ORT(GetTensorMutableData)(out, &data);
    if (status) return status;
    uint8_t *present = (uint8_t *)data;
    if (present != past && C > 0)
        for (int64_t bh = 0; bh < B * H; bh++) memcpy(present + bh * capacity * G, past + bh * C * G, (size_t)(C * G));
    const int64_t D = G * bd[3];
    const llmc_cq_encode_args args = {.x = x, .codebooks = book, .norms = norms, .B = B, .H = H, .S = S, .G = G,
                                      .K = bd[2], .c = bd[3], .codes = present, .x_batch_stride = S * x_token_stride,
                                      .x_head_stride = D, .x_token_stride = x_token_stride, .codes_capacity = capacity,
                                      .codes_offset = P};
    *encoding = args;
    return NULL;
}

/* A CQCachedAttention kernel: its node's rope_halves attribute (0 when absent), which says that each row of the
   key tables repeats its first half (cos) or negates it (signed_sin), so the kernel reads half of every row. */
typedef struct {
    int64_t rope_halves;
} cqc_kernel;

static OrtStatus *cqc_create_kernel_v2(const OrtCustomOp *op, OrtApiTable api, const OrtKernelInfo *info,
                                       void **kernel) {
    (void)op, (void)api;
    cqc_kernel *k = (cqc_kernel *)calloc(1, sizeof *k);
    if (!k) return ORT(CreateStatus)(ORT_FAIL, "CQCachedAttention: out of memory");
    OrtStatus *absent = ORT(KernelInfoGetAttribute_int64)(info, "rope_halves", &k->rope_halves);
    if (absent) { /* exports made before the attribute existed */
        ORT(ReleaseStatus)(absent);
        k->rope_halves = 0;
    }
    *kernel = k;
    return NULL;
}
static void *cqc_create_kernel(const OrtCustomOp *op, OrtApiTable api, const OrtKernelInfo *info) {
    void *kernel = NULL;
    OrtStatus *status = cqc_create_kernel_v2(op, api, info, &kernel);
    if (status) ORT(ReleaseStatus)(status);
    return kernel;
}
static void cqc_destroy(void *kernel) { free(kernel); }

static OrtStatus *cqc_compute(void *kernel, OrtKernelContext *context) {
    void *data[CQC_INPUTS] = {NULL};
    int64_t dims[CQC_INPUTS][MAX_RANK];
    size_t rank[CQC_INPUTS] = {0};
    for (size_t i = 0; i < CQC_INPUTS; i++) {
        const OrtValue *value = NULL;
        OrtStatus *status = ORT(KernelContext_GetInput)(context, i, &value);
        if (!status && value) status = tensor(value, &data[i], dims[i], &rank[i]);
        if (status) return status;
    }
    const int packed = data[CQC_K] == NULL;
    if (packed != (data[CQC_V] == NULL)) return cqc_invalid("key and value must be given together");
    static const size_t ranks[CQC_SCALE] = {3, 3, 3, 4, 4, 4, 4, 3, 3, 4, 4, 4};
    for (size_t i = 0; i < CQC_SCALE; i++)
        if (rank[i] != ranks[i] && !(packed && (i == CQC_K || i == CQC_V)))
            return cqc_invalid("an input has the wrong rank");
    const int64_t *q = dims[CQC_Q], *kc = dims[CQC_KC], *vc = dims[CQC_VC];
    const int64_t *kb = dims[CQC_KB], *vb = dims[CQC_VB], *kn = dims[CQC_KN], *vn = dims[CQC_VN];
    const int64_t *cs = dims[CQC_COS], *sn = dims[CQC_SIN];
    const int64_t *bi = dims[CQC_BIAS];
    const int64_t B = q[0], S = q[1], H = kc[1], D = kb[1] * kb[3], C = kc[2], T = bi[3], P = T - S;
    const int64_t width = packed ? q[2] - 2 * H * D : q[2]; /* Hq * D */
    if (H < 1 || D < 1 || width < 1 || width % (H * D) || kc[0] != B || vc[0] != B || vc[1] != H || vc[2] != C)
        return cqc_invalid("q or codes do not match");
    if (!packed) {
        const int64_t *k = dims[CQC_K], *v = dims[CQC_V];
        for (int d = 0; d < 3; d++)
            if (k[d] != v[d]) return cqc_invalid("keys and values differ in shape");
        if (k[0] != B || k[1] != S || k[2] != H * D) return cqc_invalid("keys and values do not match q or the codes");
    }
    const int64_t R = width / (H * D) * S;
    /* where the step's keys and values are, and the floats from one token to the next */
    const float *key = packed ? (const float *)data[CQC_Q] + width : data[CQC_K];
    const float *value = packed ? key + H * D : data[CQC_V];
    const int64_t kv_stride = packed ? q[2] : H * D;
    if (kb[0] != H || vb[0] != H || kb[1] != kc[3] || vb[1] != vc[3] || kb[1] * kb[3] != D || vb[1] * vb[3] != D ||
        D > 1024 || kb[2] < 1 || kb[2] > 256 || vb[2] < 1 || vb[2] > 256)
        return cqc_invalid("codebooks do not match the codes or the head");
    for (int d = 0; d < 3; d++)
        if (kn[d] != kb[d] || vn[d] != vb[d]) return cqc_invalid("norms do not match the codebooks");
    for (int d = 0; d < 4; d++)
        if (cs[d] != sn[d]) return cqc_invalid("cos and sin differ in shape");
    if ((cs[0] != B && cs[0] != 1) || cs[1] != 1 || cs[2] < T || cs[3] > D || cs[3] % 2)
        return cqc_invalid("bad RoPE tables");
    if ((bi[0] != B && bi[0] != 1) || bi[1] != 1 || bi[2] != R || P < 0 || P > C || T < 1)
        return cqc_invalid("bad bias");
    if (rank[CQC_SCALE] > 1 || (rank[CQC_SCALE] == 1 && dims[CQC_SCALE][0] != 1))
        return cqc_invalid("scale is not one value");
    const int64_t *qc = dims[CQC_QCOS], *qs = dims[CQC_QSIN];
    const int rotate_q = data[CQC_QCOS] != NULL;
    if (rotate_q != (data[CQC_QSIN] != NULL))
        return cqc_invalid("q_cos and q_sin must be given together");
    if (rotate_q && (rank[CQC_QCOS] != 4 || rank[CQC_QSIN] != 4 || (qc[0] != B && qc[0] != 1) || qc[1] != 1 ||
                     qc[2] != S || qc[3] != cs[3] || qs[0] != qc[0] || qs[1] != 1 || qs[2] != S || qs[3] != qc[3]))
        return cqc_invalid("bad q RoPE tables");
    llmc_cq_encode_args keys, values;
    OrtStatus *status = cqc_present(context, 1, data[CQC_KC], kc, key, kv_stride, data[CQC_KB], data[CQC_KN], kb, S,
                                    P, T, &keys);
    if (!status)
        status = cqc_present(context, 2, data[CQC_VC], vc, value, kv_stride, data[CQC_VB], data[CQC_VN], vb, S, P,
                             T, &values);
    OrtValue *out = NULL;
    void *out_data = NULL;
    const int64_t out_dims[3] = {B, S, width};
    if (!status) status = ORT(KernelContext_GetOutput)(context, 0, out_dims, 3, &out);
    if (!status) status = ORT(GetTensorMutableData)(out, &out_data);
    if (status) return status;
    /* the past's codes are read from the past input: positions [0, P), which the present's writes leave alone */
    const llmc_cq_attention_args args = {
        .q = data[CQC_Q], .key_codes = data[CQC_KC], .key_new = key, .value_codes = data[CQC_VC], .value_new = value,
        .key_codebooks = data[CQC_KB], .value_codebooks = data[CQC_VB], .cos = data[CQC_COS],
        .signed_sin = data[CQC_SIN], .bias = data[CQC_BIAS], .scale = *(const float *)data[CQC_SCALE], .B = B, .H = H,
        .R = R, .P = P, .S = S, .D = D, .Gk = kb[1], .Kk = kb[2], .ck = kb[3], .Gv = vb[1], .Kv = vb[2], .cv = vb[3],
        .rot = cs[3], .table_batch_stride = cs[0] == 1 ? 0 : cs[2] * cs[3], .bias_cols = T,
        .bias_batch_stride = bi[0] == 1 ? 0 : R * T, .out = out_data, .new_batch_stride = S * kv_stride,
        .new_head_stride = D, .new_token_stride = kv_stride, .codes_capacity = C, .heads_last = 1,
        .q_token_stride = q[2], .q_cos = data[CQC_QCOS], .q_signed_sin = data[CQC_QSIN],
        .q_table_batch_stride = rotate_q && qc[0] != 1 ? S * qc[3] : 0,
        .rope_halves = kernel && ((const cqc_kernel *)kernel)->rope_halves};
    if (llmc_cq_cached_attention_run(&args, &keys, &values, parallel_ort, context))
        return ORT(CreateStatus)(ORT_FAIL, "CQCachedAttention: out of memory");
    return NULL;
}

static void cqc_compute_v1(void *kernel, OrtKernelContext *context) { (void)cqc_compute(kernel, context); }

static const OrtCustomOp cq_cached_attention_op = {
    OP_API_VERSION, cqc_create_kernel, cqc_name, op_provider, cqc_input_type, cqc_input_count, cqc_output_type,
    cqc_output_count, cqc_compute_v1, cqc_destroy, cqc_input_characteristic, required, default_memory, one, zero,
    one, zero, cqc_create_kernel_v2, cqc_compute,
};

/* llmc.BinaryBasesLinear (binary_bases_ort.c): x, signs, scales[, outlier index, outlier values] -> y. */
static const char *bb_name(const OrtCustomOp *op) { return (void)op, "BinaryBasesLinear"; }
static int bb_input_type(const OrtCustomOp *op, size_t i) {
    return (void)op, i == 1 ? TYPE_UINT8 : i == 3 ? TYPE_INT32 : TYPE_FLOAT;
}
static size_t bb_input_count(const OrtCustomOp *op) { return (void)op, 5; }
static int bb_input_characteristic(const OrtCustomOp *op, size_t i) {
    return (void)op, i < 3 ? IO_REQUIRED : IO_OPTIONAL;
}

static OrtStatus *bb_compute(void *kernel, OrtKernelContext *context) {
    (void)kernel;
    void *data[5] = {NULL};
    int64_t dims[5][MAX_RANK];
    size_t rank[5] = {0};
    for (size_t i = 0; i < 5; i++) {
        const OrtValue *value = NULL;
        OrtStatus *status = ORT(KernelContext_GetInput)(context, i, &value);
        if (!status && value) status = tensor(value, &data[i], dims[i], &rank[i]);
        if (status) return status;
    }
    const int64_t *s = dims[1], *sc = dims[2];
    if (rank[0] < 1 || rank[1] != 3 || rank[2] != 3 || dims[0][rank[0] - 1] != s[2] * 8 || sc[0] != s[0] ||
        sc[1] != s[1] || sc[2] < 1 || (s[2] * 8) % sc[2])
        return ORT(CreateStatus)(ORT_INVALID_ARGUMENT, "BinaryBasesLinear: expected x [..., K], signs [nb, N, K/8], "
                                                       "scales [nb, N, G] with G dividing K");
    const int with_outliers = data[3] != NULL;
    if (with_outliers != (data[4] != NULL) ||
        (with_outliers && (rank[3] != 2 || rank[4] != 2 || dims[3][0] != s[1] || dims[4][0] != s[1] ||
                           dims[3][1] != dims[4][1])))
        return ORT(CreateStatus)(ORT_INVALID_ARGUMENT, "BinaryBasesLinear: outlier index and values must both be "
                                                       "given, int32 [N, k] and float [N, k]");
    int64_t out_dims[MAX_RANK], T = 1;
    for (size_t d = 0; d + 1 < rank[0]; d++) T *= (out_dims[d] = dims[0][d]);
    out_dims[rank[0] - 1] = s[1];
    OrtValue *out = NULL;
    void *y = NULL;
    OrtStatus *status = ORT(KernelContext_GetOutput)(context, 0, out_dims, rank[0], &out);
    if (!status) status = ORT(GetTensorMutableData)(out, &y);
    if (status) return status;
    const llmc_bb_args args = {.x = data[0], .signs = data[1], .scales = data[2], .y = y, .T = T, .K = s[2] * 8,
                               .N = s[1], .nb = s[0], .G = sc[2], .outlier_index = data[3],
                               .outlier_values = data[4], .outliers = with_outliers ? dims[3][1] : 0};
    const int failed = llmc_binary_bases_linear_run(&args, parallel_ort, context);
    if (failed)
        return ORT(CreateStatus)(failed == 2 ? ORT_FAIL : ORT_INVALID_ARGUMENT,
                                 failed == 2 ? "BinaryBasesLinear: out of memory"
                                             : "BinaryBasesLinear: an outlier index outside the input width");
    return NULL;
}

static void bb_compute_v1(void *kernel, OrtKernelContext *context) { (void)bb_compute(kernel, context); }

static const OrtCustomOp binary_bases_op = {
    OP_API_VERSION, create_kernel, bb_name, op_provider, bb_input_type, bb_input_count, output_type,
    output_count, bb_compute_v1, kernel_destroy, bb_input_characteristic, required, default_memory, one, zero, one,
    zero, create_kernel_v2, bb_compute,
};

/* Entry point called by SessionOptions.register_custom_ops_library: adds domain "llmc" with VQLinear,
   CQAttention, CQEncode, CQCachedAttention and BinaryBasesLinear. */
OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    OrtApiTable api = base->GetApi(PARALLEL_API_VERSION);
    ort_parallel = api != NULL;
    if (!api) api = base->GetApi(OP_API_VERSION);
    if (!api) {
        OrtApiTable v1 = base->GetApi(1);
        if (!v1) return NULL; /* cannot happen: every runtime serves version 1 */
        return ((CreateStatus_t)v1[SLOT_CreateStatus])(ORT_FAIL, "llmc's custom ops need ONNX Runtime 1.16 or newer");
    }
    ort = api;
    OrtDomain *domain = NULL;
    OrtStatus *status = ORT(CreateCustomOpDomain)("llmc", &domain);
    if (!status) status = ORT(CustomOpDomain_Add)(domain, &vq_linear_op);
    if (!status) status = ORT(CustomOpDomain_Add)(domain, &cq_attention_op);
    if (!status) status = ORT(CustomOpDomain_Add)(domain, &cq_encode_op);
    if (!status) status = ORT(CustomOpDomain_Add)(domain, &cq_cached_attention_op);
    if (!status) status = ORT(CustomOpDomain_Add)(domain, &binary_bases_op);
    if (!status) status = ORT(AddCustomOpDomain)(options, domain);
    return status; /* the domain must outlive the sessions made with these options: it is never released */
}
