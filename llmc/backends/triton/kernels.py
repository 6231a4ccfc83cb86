"""Triton kernels of llmc's custom ops, and the Python functions that launch them.

One kernel (or a small family) per op of `llmc.ops`, reading each op's tensors in the layout the op
defines (see the op's module docstring):

| op                   | kernels                                                                    |
|----------------------|----------------------------------------------------------------------------|
| llmc::nbits_linear   | `nbits_gemv_packed` (a few rows, 2/4/8 bits: packed byte tiles unpacked by   |
|                      | shifts, y += s·(Σqx − zΣx) per block); `nbits_gemv` (3-bit, any block)      |
|                      | `nbits_gemm` (prompts: dequantizes a [K, N] tile, then a tensor-core dot)   |
| llmc::nbits_embedding| `nbits_embedding` (dequantizes only the looked-up rows)                     |
| llmc::vq_linear      | `vq_gemv_grouped` (one code load per group and codebook, codeword gather);  |
|                      | `vq_gemv` (groups of other sizes)                                           |
|                      | `vq_gemm` (prompts: the same lookup into a tile, then a dot)                |
| llmc::binary_bases_linear | `binary_bases_gemv` / `binary_bases_gemm` (±1 from packed sign bits,    |
|                      | times per-row/group scales, summed over the bases, then a dot)              |
| llmc::cq_encode      | `cq_encode` (distances ||C||² - 2 x·C to every centroid, argmin)            |
| llmc::cq_decode      | `cq_decode` (one centroid gather per code)                                  |
| llmc::kivi_append    | `kivi_fake_quant` (min/max quantization of the entries leaving the float tail) |
| (fused attention)    | `cq_query_table` + `cq_attention` (decode attention over uint8 codes: scores  |
|                      | from a per-query table of query·centroid products, values gathered from codebooks) |

Every kernel runs on CUDA tensors as compiled Triton (block sizes autotuned per layer shape where it
matters) and on CPU tensors in Triton's interpreter (numpy; for tests at small shapes). Scalar codes
are one little-endian bit stream per row (value i at bit i*bits): the packed GEMV unpacks whole bytes
by shifts at 2/4/8 bits; the generic kernels address each value's bits, so 3-bit values that
straddle two bytes read both.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

# Tokens (rows of x) up to which a linear takes the GEMV kernels; above, the dequantize-GEMM ones.
GEMV_MAX_ROWS = 4


def interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


# ---------------------------------------------------------------------------------------------
# Kernel bodies (plain functions: `_kernel` makes them Triton JIT functions or interpreted ones)


def _nbits_gemv_body(x_ptr, codes_ptr, scales_ptr, zp_ptr, y_ptr, N, K, G, row_bytes, zp_row_bytes, stride_xm,
                     stride_ym, BITS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        mask2 = n_mask[:, None] & k_mask[None, :]
        x = tl.load(x_ptr + m * stride_xm + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        bit = offs_k * BITS
        byte = bit >> 3
        cptr = codes_ptr + rows[:, None] * row_bytes + byte[None, :]
        b = tl.load(cptr, mask=mask2, other=0).to(tl.int32)
        if BITS == 3:  # a 3-bit value may straddle two bytes
            b1 = tl.load(cptr + 1, mask=mask2 & (byte + 1 < row_bytes)[None, :], other=0).to(tl.int32)
            b = b | (b1 << 8)
        q = (b >> (bit & 7)[None, :]) & ((1 << BITS) - 1)
        grp = offs_k // BLOCK
        s = tl.load(scales_ptr + rows[:, None] * G + grp[None, :], mask=mask2, other=0.0).to(tl.float32)
        zbit = grp * BITS
        zbyte = zbit >> 3
        zptr = zp_ptr + rows[:, None] * zp_row_bytes + zbyte[None, :]
        z = tl.load(zptr, mask=mask2, other=0).to(tl.int32)
        if BITS == 3:
            z1 = tl.load(zptr + 1, mask=mask2 & (zbyte + 1 < zp_row_bytes)[None, :], other=0).to(tl.int32)
            z = z | (z1 << 8)
        z = (z >> (zbit & 7)[None, :]) & ((1 << BITS) - 1)
        w = (q - z).to(tl.float32) * s
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(y_ptr + m * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


def _nbits_gemv_packed_body(x_ptr, codes_ptr, scales_ptr, zp_ptr, y_ptr, N, K, G, row_bytes, zp_row_bytes,
                            stride_xm, stride_ym, BITS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    """The decode GEMV at 2/4/8 bits: a [BLOCK_N, BLOCK_K*BITS/8] tile of packed bytes is loaded once and
    unpacked by shifts; per quantization block, y += s * (Σ q·x - z Σ x). BLOCK_K is a multiple of BLOCK."""
    PER: tl.constexpr = 8 // BITS
    BKB: tl.constexpr = BLOCK_K // PER
    GT: tl.constexpr = BLOCK_K // BLOCK
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64)
    shifts = tl.arange(0, PER) * BITS
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, G * BLOCK, BLOCK_K):
        offs_b = k0 // PER + tl.arange(0, BKB)
        b = tl.load(codes_ptr + rows[:, None] * row_bytes + offs_b[None, :],
                    mask=n_mask[:, None] & (offs_b < row_bytes)[None, :], other=0).to(tl.int32)
        q = (b[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # [BLOCK_N, BKB, PER]: k = byte*PER + p
        q = tl.reshape(q, [BLOCK_N, GT, BLOCK]).to(tl.float32)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        x = tl.reshape(x, [GT, BLOCK])
        qx = tl.sum(q * x[None, :, :], axis=2)  # [BLOCK_N, GT]
        xs = tl.sum(x, axis=1)  # [GT]
        offs_g = k0 // BLOCK + tl.arange(0, GT)
        gmask = n_mask[:, None] & (offs_g < G)[None, :]
        s = tl.load(scales_ptr + rows[:, None] * G + offs_g[None, :], mask=gmask, other=0.0).to(tl.float32)
        zbit = offs_g * BITS
        z = tl.load(zp_ptr + rows[:, None] * zp_row_bytes + (zbit >> 3)[None, :], mask=gmask, other=0).to(tl.int32)
        z = ((z >> (zbit & 7)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        acc += tl.sum(s * (qx - z * xs[None, :]), axis=1)
    tl.store(y_ptr + m * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


def _nbits_gemm_body(x_ptr, codes_ptr, scales_ptr, zp_ptr, y_ptr, M, N, K, G, row_bytes, zp_row_bytes, stride_xm,
                     stride_ym, BITS: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    cols = offs_n.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        mask2 = k_mask[:, None] & n_mask[None, :]  # the weight tile is [BLOCK_K, BLOCK_N]
        bit = offs_k * BITS
        byte = bit >> 3
        cptr = codes_ptr + cols[None, :] * row_bytes + byte[:, None]
        b = tl.load(cptr, mask=mask2, other=0).to(tl.int32)
        if BITS == 3:
            b1 = tl.load(cptr + 1, mask=mask2 & (byte + 1 < row_bytes)[:, None], other=0).to(tl.int32)
            b = b | (b1 << 8)
        q = (b >> (bit & 7)[:, None]) & ((1 << BITS) - 1)
        grp = offs_k // BLOCK
        s = tl.load(scales_ptr + cols[None, :] * G + grp[:, None], mask=mask2, other=0.0).to(tl.float32)
        zbit = grp * BITS
        zbyte = zbit >> 3
        zptr = zp_ptr + cols[None, :] * zp_row_bytes + zbyte[:, None]
        z = tl.load(zptr, mask=mask2, other=0).to(tl.int32)
        if BITS == 3:
            z1 = tl.load(zptr + 1, mask=mask2 & (zbyte + 1 < zp_row_bytes)[:, None], other=0).to(tl.int32)
            z = z | (z1 << 8)
        z = (z >> (zbit & 7)[:, None]) & ((1 << BITS) - 1)
        w = (q - z).to(tl.float32) * s
        if IEEE:
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def _nbits_embedding_body(ids_ptr, codes_ptr, scales_ptr, zp_ptr, out_ptr, K, G, row_bytes, zp_row_bytes,
                          BITS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    i = tl.program_id(0)
    kb = tl.program_id(1)
    row = tl.load(ids_ptr + i).to(tl.int64)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    bit = offs_k * BITS
    byte = bit >> 3
    b = tl.load(codes_ptr + row * row_bytes + byte, mask=k_mask, other=0).to(tl.int32)
    if BITS == 3:
        b1 = tl.load(codes_ptr + row * row_bytes + byte + 1, mask=k_mask & (byte + 1 < row_bytes), other=0)
        b = b | (b1.to(tl.int32) << 8)
    q = (b >> (bit & 7)) & ((1 << BITS) - 1)
    grp = offs_k // BLOCK
    s = tl.load(scales_ptr + row * G + grp, mask=k_mask, other=0.0).to(tl.float32)
    zbit = grp * BITS
    zbyte = zbit >> 3
    z = tl.load(zp_ptr + row * zp_row_bytes + zbyte, mask=k_mask, other=0).to(tl.int32)
    if BITS == 3:
        z1 = tl.load(zp_ptr + row * zp_row_bytes + zbyte + 1, mask=k_mask & (zbyte + 1 < zp_row_bytes), other=0)
        z = z | (z1.to(tl.int32) << 8)
    z = (z >> (zbit & 7)) & ((1 << BITS) - 1)
    w = (q - z).to(tl.float32) * s
    tl.store(out_ptr + i.to(tl.int64) * K + offs_k, w.to(out_ptr.dtype.element_ty), mask=k_mask)


def _vq_gemv_body(x_ptr, codes_ptr, cb_ptr, scales_ptr, y_ptr, N, K, stride_xm, stride_ym,
                  NUM_CB: tl.constexpr, CODEWORDS: tl.constexpr, GS: tl.constexpr, WIDE: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64)
    J = K // GS
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        mask2 = n_mask[:, None] & k_mask[None, :]
        x = tl.load(x_ptr + m * stride_xm + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        j = offs_k // GS
        e = offs_k % GS
        w = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for cb in tl.static_range(NUM_CB):
            code = tl.load(codes_ptr + (rows[:, None] * J + j[None, :]) * NUM_CB + cb, mask=mask2, other=0)
            code = code.to(tl.int32)
            if WIDE:  # int16 storage of codes up to 16 bits
                code = code & 0xFFFF
            w += tl.load(cb_ptr + (cb * CODEWORDS + code) * GS + e[None, :], mask=mask2, other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    s = tl.load(scales_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, (acc * s).to(y_ptr.dtype.element_ty), mask=n_mask)


def _vq_gemv_grouped_body(x_ptr, codes_ptr, cb_ptr, scales_ptr, y_ptr, N, K, stride_xm, stride_ym,
                          NUM_CB: tl.constexpr, CODEWORDS: tl.constexpr, GS: tl.constexpr, WIDE: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    """The decode GEMV over vector codes (GS a power of two): one code load per group and codebook, a
    [BLOCK_N, BLOCK_J, GS] codeword gather from the (cache-resident) codebooks, a dot per group."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64)
    J = K // GS
    offs_e = tl.arange(0, GS)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j0 in range(0, J, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_mask = offs_j < J
        mask2 = n_mask[:, None] & j_mask[None, :]
        x = tl.load(x_ptr + m * stride_xm + offs_j[:, None] * GS + offs_e[None, :], mask=j_mask[:, None],
                    other=0.0).to(tl.float32)  # [BLOCK_J, GS]
        w = tl.zeros([BLOCK_N, BLOCK_J, GS], dtype=tl.float32)
        for cb in tl.static_range(NUM_CB):
            code = tl.load(codes_ptr + (rows[:, None] * J + offs_j[None, :]) * NUM_CB + cb, mask=mask2, other=0)
            code = code.to(tl.int32)
            if WIDE:
                code = code & 0xFFFF
            w += tl.load(cb_ptr + ((cb * CODEWORDS + code) * GS)[:, :, None] + offs_e[None, None, :],
                         mask=mask2[:, :, None], other=0.0).to(tl.float32)
        acc += tl.sum(tl.sum(w * x[None, :, :], axis=2), axis=1)
    s = tl.load(scales_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, (acc * s).to(y_ptr.dtype.element_ty), mask=n_mask)


def _vq_gemm_body(x_ptr, codes_ptr, cb_ptr, scales_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                  NUM_CB: tl.constexpr, CODEWORDS: tl.constexpr, GS: tl.constexpr, WIDE: tl.constexpr,
                  IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    cols = offs_n.to(tl.int64)
    J = K // GS
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        mask2 = k_mask[:, None] & n_mask[None, :]
        j = offs_k // GS
        e = offs_k % GS
        w = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for cb in tl.static_range(NUM_CB):
            code = tl.load(codes_ptr + (cols[None, :] * J + j[:, None]) * NUM_CB + cb, mask=mask2, other=0)
            code = code.to(tl.int32)
            if WIDE:
                code = code & 0xFFFF
            w += tl.load(cb_ptr + (cb * CODEWORDS + code) * GS + e[:, None], mask=mask2, other=0.0).to(tl.float32)
        if IEEE:
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    s = tl.load(scales_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    acc = acc * s[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def _binary_bases_body(x_ptr, signs_ptr, scales_ptr, y_ptr, M, N, K, G, stride_xm, stride_ym,
                       NB: tl.constexpr, GEMM: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = x @ (Σ_i scales_i ⊙ B_i)ᵀ, B_i ±1 read from packed sign bits: a GEMV (GEMM=False: program
    axis 1 is the row of x) or a dequantize-GEMM over [BLOCK_K, BLOCK_N] weight tiles."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    cols = offs_n.to(tl.int64)
    J = K // 8
    per = K // G
    if GEMM:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        mask2 = k_mask[:, None] & n_mask[None, :]  # weight tile [BLOCK_K, BLOCK_N]
        w = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(NB):
            byte = tl.load(signs_ptr + (i * N + cols[None, :]) * J + (offs_k // 8)[:, None], mask=mask2, other=0)
            sign = ((byte.to(tl.int32) >> (offs_k % 8)[:, None]) & 1).to(tl.float32) * 2 - 1
            s = tl.load(scales_ptr + (i * N + cols[None, :]) * G + (offs_k // per)[:, None], mask=mask2, other=0.0)
            w += sign * s.to(tl.float32)
        if GEMM:
            x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w.to(x.dtype), acc)
        else:
            x1 = tl.load(x_ptr + pid_m * stride_xm + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            acc1 += tl.sum(w * x1[:, None], axis=0)
    if GEMM:
        tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
                 acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    else:
        tl.store(y_ptr + pid_m * stride_ym + offs_n, acc1.to(y_ptr.dtype.element_ty), mask=n_mask)


def _cq_encode_body(x_ptr, cb_ptr, out_ptr, H, S, G, C: tl.constexpr, NUM_C: tl.constexpr, C_PAD: tl.constexpr,
                    BLOCK_G: tl.constexpr):
    row = tl.program_id(0)  # over B*H*S
    gb = tl.program_id(1)
    h = (row // S) % H
    offs_g = gb * BLOCK_G + tl.arange(0, BLOCK_G)
    g_mask = offs_g < G
    offs_k = tl.arange(0, NUM_C)
    offs_e = tl.arange(0, C_PAD)
    e_mask = offs_e < C
    x = tl.load(x_ptr + row.to(tl.int64) * G * C + offs_g[:, None] * C + offs_e[None, :],
                mask=g_mask[:, None] & e_mask[None, :], other=0.0).to(tl.float32)
    cptr = cb_ptr + ((h * G + offs_g[:, None, None]) * NUM_C + offs_k[None, :, None]) * C + offs_e[None, None, :]
    cb = tl.load(cptr, mask=g_mask[:, None, None] & e_mask[None, None, :], other=0.0).to(tl.float32)
    dist = tl.sum(cb * cb, axis=2) - 2 * tl.sum(cb * x[:, None, :], axis=2)  # [BLOCK_G, NUM_C]
    code = tl.argmin(dist, axis=1)
    tl.store(out_ptr + row.to(tl.int64) * G + offs_g, code.to(out_ptr.dtype.element_ty), mask=g_mask)


def _cq_decode_body(codes_ptr, cb_ptr, out_ptr, H, T, G, NUM_C, C: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    h = bh % H
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < G * C
    mask2 = t_mask[:, None] & d_mask[None, :]
    g = offs_d // C
    e = offs_d % C
    rows = bh.to(tl.int64) * T + offs_t
    code = tl.load(codes_ptr + rows[:, None] * G + g[None, :], mask=mask2, other=0).to(tl.int64)
    val = tl.load(cb_ptr + ((h * G + g[None, :]) * NUM_C + code) * C + e[None, :], mask=mask2, other=0.0)
    tl.store(out_ptr + rows[:, None] * (G * C) + offs_d[None, :], val.to(out_ptr.dtype.element_ty), mask=mask2)


def _cq_query_table_body(q_ptr, cb_ptr, table_ptr, HQ, GROUP, G, C: tl.constexpr, NUM_C: tl.constexpr,
                         C_PAD: tl.constexpr, BLOCK_G: tl.constexpr):
    bq = tl.program_id(0)  # over B*HQ
    gb = tl.program_id(1)
    hkv = (bq % HQ) // GROUP
    offs_g = gb * BLOCK_G + tl.arange(0, BLOCK_G)
    g_mask = offs_g < G
    offs_k = tl.arange(0, NUM_C)
    offs_e = tl.arange(0, C_PAD)
    e_mask = offs_e < C
    q = tl.load(q_ptr + bq.to(tl.int64) * G * C + offs_g[:, None] * C + offs_e[None, :],
                mask=g_mask[:, None] & e_mask[None, :], other=0.0).to(tl.float32)
    cptr = cb_ptr + ((hkv * G + offs_g[:, None, None]) * NUM_C + offs_k[None, :, None]) * C + offs_e[None, None, :]
    cb = tl.load(cptr, mask=g_mask[:, None, None] & e_mask[None, None, :], other=0.0).to(tl.float32)
    tab = tl.sum(cb * q[:, None, :], axis=2)  # [BLOCK_G, NUM_C]: q_g · centroid_k
    tl.store(table_ptr + (bq.to(tl.int64) * G + offs_g[:, None]) * NUM_C + offs_k[None, :], tab,
             mask=g_mask[:, None])


def _cq_attention_body(table_ptr, kc_ptr, vc_ptr, vcb_ptr, valid_ptr, m_ptr, l_ptr, acc_ptr, HQ, HKV, GROUP, T,
                       GK, GV, sm_scale, t_per_split, NUM_CK: tl.constexpr, NUM_CV: tl.constexpr, CV: tl.constexpr,
                       GK_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    bq = tl.program_id(0)  # over B*HQ
    split = tl.program_id(1)
    b = bq // HQ
    hkv = (bq % HQ) // GROUP
    kv_row = (b * HKV + hkv).to(tl.int64) * T
    offs_g = tl.arange(0, GK_PAD)
    g_mask = offs_g < GK
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < GV * CV
    gv = offs_d // CV
    ev = offs_d % CV
    m_i = tl.full([1], -float("inf"), tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    t_start = split * t_per_split
    t_stop = tl.minimum(t_start + t_per_split, T)
    for t0 in range(t_start, t_stop, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < t_stop
        valid = tl.load(valid_ptr + b.to(tl.int64) * T + offs_t, mask=t_mask, other=0) != 0
        kc = tl.load(kc_ptr + (kv_row + offs_t[:, None]) * GK + offs_g[None, :],
                     mask=t_mask[:, None] & g_mask[None, :], other=0).to(tl.int64)
        # score_t = sum_g table[g, code_tg]: the query's dot with each key, read from its codes
        part = tl.load(table_ptr + (bq.to(tl.int64) * GK + offs_g[None, :]) * NUM_CK + kc,
                       mask=t_mask[:, None] & g_mask[None, :], other=0.0)
        s = tl.sum(part, axis=1) * sm_scale
        s = tl.where(valid, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)
        vc = tl.load(vc_ptr + (kv_row + offs_t[:, None]) * GV + gv[None, :],
                     mask=t_mask[:, None] & d_mask[None, :], other=0).to(tl.int64)
        v = tl.load(vcb_ptr + ((hkv * GV + gv[None, :]) * NUM_CV + vc) * CV + ev[None, :],
                    mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    out = bq.to(tl.int64) * tl.num_programs(1) + split
    one = tl.arange(0, 1)
    tl.store(m_ptr + out + one, m_i)
    tl.store(l_ptr + out + one, l_i)
    tl.store(acc_ptr + out * (GV * CV) + offs_d, acc, mask=d_mask)


def _fake_quant_body(x_ptr, out_ptr, L, C, qmax, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0)  # x viewed as [R, L, C]: quantize along L, per (r, c)
    cb = tl.program_id(1)
    offs_l = tl.arange(0, BLOCK_L)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_l < L)[:, None] & (offs_c < C)[None, :]
    ptr = r.to(tl.int64) * L * C + offs_l[:, None] * C + offs_c[None, :]
    x = tl.load(x_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    lo = tl.min(tl.where(mask, x, float("inf")), axis=0)
    hi = tl.max(tl.where(mask, x, -float("inf")), axis=0)
    scale = tl.maximum((hi - lo) / qmax, 1e-8)
    v = (x - lo[None, :]) / scale[None, :]
    q = tl.floor(v + 0.5)  # round half to even, as torch.round
    q = tl.where((q - v == 0.5) & (q % 2 != 0), q - 1, q)
    q = tl.minimum(tl.maximum(q, 0.0), qmax)
    tl.store(out_ptr + ptr, (q * scale[None, :] + lo[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Compiling: a JIT function on CUDA (autotuned where listed), an interpreted one on CPU


def _configs(**grid):
    """triton.Config for every combination of the given block sizes (and num_warps)."""
    import itertools

    warps = grid.pop("num_warps", [4])
    keys = list(grid)
    return [triton.Config(dict(zip(keys, vals)), num_warps=w)
            for vals in itertools.product(*grid.values()) for w in warps]


_AUTOTUNE = {
    "nbits_gemv": dict(configs=_configs(BLOCK_N=[16, 32, 64], BLOCK_K=[128, 256, 512], num_warps=[4, 8]),
                       key=["N", "K", "BITS", "BLOCK"]),
    "nbits_gemv_packed": dict(configs=_configs(BLOCK_N=[8, 16, 32, 64], BLOCK_K=[256, 512], num_warps=[4]),
                              key=["N", "K", "BITS", "BLOCK"]),
    "vq_gemv_grouped": dict(configs=_configs(BLOCK_N=[8, 16, 32, 64], BLOCK_J=[16, 32], num_warps=[4]),
                            key=["N", "K", "NUM_CB", "GS"]),
    "nbits_gemm": dict(configs=_configs(BLOCK_M=[16, 64], BLOCK_N=[64, 128], BLOCK_K=[64], num_warps=[4]),
                       key=["M", "N", "K", "BITS", "BLOCK"]),
    "vq_gemv": dict(configs=_configs(BLOCK_N=[16, 32, 64], BLOCK_K=[64, 128, 256], num_warps=[4, 8]),
                    key=["N", "K", "NUM_CB", "GS"]),
    "binary_bases_gemv": dict(configs=_configs(BLOCK_N=[32, 64, 128], BLOCK_K=[64, 128, 256], num_warps=[4, 8]),
                              key=["N", "K", "NB", "G"]),
    "binary_bases_gemm": dict(configs=_configs(BLOCK_M=[16, 64], BLOCK_N=[64, 128], BLOCK_K=[32, 64],
                                               num_warps=[4, 8]), key=["M", "N", "K", "NB", "G"]),
    "vq_gemm": dict(configs=_configs(BLOCK_M=[16, 64], BLOCK_N=[64, 128], BLOCK_K=[32], num_warps=[4]),
                    key=["M", "N", "K", "NUM_CB", "GS"]),
}

_BODIES = {
    "nbits_gemv": _nbits_gemv_body, "nbits_gemv_packed": _nbits_gemv_packed_body, "nbits_gemm": _nbits_gemm_body,
    "vq_gemv_grouped": _vq_gemv_grouped_body, "nbits_embedding": _nbits_embedding_body,
    "vq_gemv": _vq_gemv_body, "vq_gemm": _vq_gemm_body, "binary_bases_gemv": _binary_bases_body,
    "binary_bases_gemm": _binary_bases_body, "cq_encode": _cq_encode_body,
    "cq_decode": _cq_decode_body, "cq_query_table": _cq_query_table_body, "cq_attention": _cq_attention_body,
    "kivi_fake_quant": _fake_quant_body,
}

KERNELS = tuple(_BODIES)


@functools.lru_cache(maxsize=None)
def _kernel(name: str, device_type: str, min_block_k: int = 0):
    """The kernel `name` for a device type: interpreted on CPU; JIT-compiled on CUDA, autotuned over the
    configurations of _AUTOTUNE (those with BLOCK_K >= min_block_k)."""
    body = _BODIES[name]
    if device_type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(body)
    fn = triton.jit(body)
    if name in _AUTOTUNE:
        tune = dict(_AUTOTUNE[name])
        tune["configs"] = [c for c in tune["configs"] if c.kwargs.get("BLOCK_K", min_block_k) >= min_block_k]
        fn = triton.autotune(**tune)(fn)
    return fn


def _check_device(*tensors) -> str:
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise ValueError(f"Triton kernels need every tensor on one device, got {dev} and {t.device}")
    if dev.type == "cpu":
        if not interpreter_enabled():
            raise RuntimeError("Triton kernels on CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 "
                               "(slow; meant for tests), or run on a CUDA GPU")
        if not _language_interpreted():
            raise RuntimeError("Triton was imported before TRITON_INTERPRET=1 was set, so its language is compiled "
                               "for a GPU: set TRITON_INTERPRET=1 in the environment before starting Python")
    if dev.type not in ("cpu", "cuda"):
        raise RuntimeError(f"Triton kernels run on CUDA tensors (or CPU ones under TRITON_INTERPRET=1), not {dev}")
    return dev.type


def _language_interpreted() -> bool:
    """Whether triton.language's own JIT functions (tl.sum, ...) were built for the interpreter: triton
    decides when it is imported, from TRITON_INTERPRET."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def _pow2(n: int, lo: int = 1, hi: int = 1 << 30) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


# ---------------------------------------------------------------------------------------------
# Launchers: same arguments and results as the reference ops


def nbits_linear(x, codes, scales, zero_points, K: int, N: int, bits: int, block_size: int):
    """x @ dequantize(codes, scales, zero_points)ᵀ for x [..., K] -> [..., N] (llmc::nbits_linear,
    MatMulNBits layout), without materializing the float weight."""
    dev = _check_device(x, codes, scales, zero_points)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    codes, scales, zero_points = codes.contiguous(), scales.contiguous(), zero_points.contiguous()
    G = codes.shape[1]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.reshape(*lead, N)
    args = (x2, codes, scales, zero_points, y)
    shape = (G, codes.shape[1] * codes.shape[2], zero_points.shape[-1], x2.stride(0), y.stride(0))
    packed = bits in (2, 4, 8) and 8 <= block_size <= 512 and block_size & (block_size - 1) == 0
    if M <= GEMV_MAX_ROWS and packed:  # whole bytes per value group: load packed tiles, unpack by shifts
        kern = _kernel("nbits_gemv_packed", dev, block_size)
        if dev == "cuda":
            kern[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)](*args, N, K, *shape, BITS=bits, BLOCK=block_size)
        else:
            bn, bk = _pow2(N, 16, 256), max(block_size, _pow2(K, 16, 1024))
            kern[(triton.cdiv(N, bn), M)](*args, N, K, *shape, BITS=bits, BLOCK=block_size, BLOCK_N=bn, BLOCK_K=bk)
    elif M <= GEMV_MAX_ROWS:
        kern = _kernel("nbits_gemv", dev)
        if dev == "cuda":
            kern[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)](*args, N, K, *shape, BITS=bits, BLOCK=block_size)
        else:  # the interpreter: few, large programs (numpy does the vector work)
            bn, bk = _pow2(N, 16, 256), _pow2(K, 16, 1024)
            kern[(triton.cdiv(N, bn), M)](*args, N, K, *shape, BITS=bits, BLOCK=block_size, BLOCK_N=bn, BLOCK_K=bk)
    else:
        kern = _kernel("nbits_gemm", dev)
        ieee = x.dtype == torch.float32
        if dev == "cuda":
            kern[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))](
                *args, M, N, K, *shape, BITS=bits, BLOCK=block_size, IEEE=ieee)
        else:
            bm, bn, bk = _pow2(M, 16, 256), _pow2(N, 16, 256), _pow2(K, 16, 512)
            kern[(triton.cdiv(M, bm), triton.cdiv(N, bn))](*args, M, N, K, *shape, BITS=bits, BLOCK=block_size,
                                                          IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return y.reshape(*lead, N)


def nbits_embedding(ids, codes, scales, zero_points, K: int, bits: int, block_size: int):
    """Rows `ids` of the [N, K] table stored as MatMulNBits-layout codes (llmc::nbits_embedding)."""
    dev = _check_device(ids, codes, scales, zero_points)
    flat = ids.reshape(-1).contiguous()
    codes, scales, zero_points = codes.contiguous(), scales.contiguous(), zero_points.contiguous()
    out = torch.empty(flat.numel(), K, dtype=scales.dtype, device=scales.device)
    if flat.numel():
        bk = _pow2(K, 16, 1024 if dev == "cpu" else 256)
        _kernel("nbits_embedding", dev)[(flat.numel(), triton.cdiv(K, bk))](
            flat, codes, scales, zero_points, out, K, codes.shape[1], codes.shape[1] * codes.shape[2],
            zero_points.shape[-1], BITS=bits, BLOCK=block_size, BLOCK_K=bk)
    return out.reshape(*ids.shape, K)


def vq_linear(x, codes, codebooks, scales):
    """x @ dequantize(codes, codebooks, scales)ᵀ (llmc::vq_linear, AQLM layout) for x [..., K] -> [..., N]."""
    dev = _check_device(x, codes, codebooks, scales)
    N, J, M_cb = codes.shape
    _, C, _, g = codebooks.shape
    K = J * g
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the codes cover {J} groups of {g}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    codes, codebooks, scales = codes.contiguous(), codebooks.contiguous(), scales.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.reshape(*lead, N)
    wide = codes.dtype == torch.int16
    args = (x2, codes, codebooks, scales, y)
    if M <= GEMV_MAX_ROWS and g & (g - 1) == 0:
        kern = _kernel("vq_gemv_grouped", dev)
        meta = dict(NUM_CB=M_cb, CODEWORDS=C, GS=g, WIDE=wide)
        if dev == "cuda":
            kern[lambda m: (triton.cdiv(N, m["BLOCK_N"]), M)](*args, N, K, x2.stride(0), y.stride(0), **meta)
        else:
            bn, bj = _pow2(N, 16, 256), _pow2(J, 1, max(1, 1024 // g))
            kern[(triton.cdiv(N, bn), M)](*args, N, K, x2.stride(0), y.stride(0), **meta, BLOCK_N=bn, BLOCK_J=bj)
    elif M <= GEMV_MAX_ROWS:
        kern = _kernel("vq_gemv", dev)
        meta = dict(NUM_CB=M_cb, CODEWORDS=C, GS=g, WIDE=wide)
        if dev == "cuda":
            kern[lambda m: (triton.cdiv(N, m["BLOCK_N"]), M)](*args, N, K, x2.stride(0), y.stride(0), **meta)
        else:
            bn, bk = _pow2(N, 16, 256), _pow2(K, 16, 1024)
            kern[(triton.cdiv(N, bn), M)](*args, N, K, x2.stride(0), y.stride(0), **meta, BLOCK_N=bn, BLOCK_K=bk)
    else:
        kern = _kernel("vq_gemm", dev)
        meta = dict(NUM_CB=M_cb, CODEWORDS=C, GS=g, WIDE=wide, IEEE=x.dtype == torch.float32)
        if dev == "cuda":
            kern[lambda m: (triton.cdiv(M, m["BLOCK_M"]), triton.cdiv(N, m["BLOCK_N"]))](
                *args, M, N, K, x2.stride(0), y.stride(0), **meta)
        else:
            bm, bn, bk = _pow2(M, 16, 256), _pow2(N, 16, 256), _pow2(K, 16, 512)
            kern[(triton.cdiv(M, bm), triton.cdiv(N, bn))](*args, M, N, K, x2.stride(0), y.stride(0), **meta,
                                                          BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return y.reshape(*lead, N)


def binary_bases_linear(x, signs, scales):
    """x @ (Σ_i scales_i ⊙ B_i)ᵀ (llmc::binary_bases_linear): signs uint8 [nb, N, K/8], scales [nb, N, G]."""
    dev = _check_device(x, signs, scales)
    nb, N, J = signs.shape
    K, G = J * 8, scales.shape[-1]
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the signs cover {K}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    signs, scales = signs.contiguous(), scales.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.reshape(*lead, N)
    args = (x2, signs, scales, y, M, N, K, G, x2.stride(0), y.stride(0))
    gemm = M > GEMV_MAX_ROWS
    name = "binary_bases_gemm" if gemm else "binary_bases_gemv"
    meta = dict(NB=nb, GEMM=gemm, IEEE=x.dtype == torch.float32)
    kern = _kernel(name, dev)
    if dev == "cuda":
        if gemm:
            kern[lambda m: (triton.cdiv(M, m["BLOCK_M"]), triton.cdiv(N, m["BLOCK_N"]))](*args, **meta)
        else:
            kern[lambda m: (M, triton.cdiv(N, m["BLOCK_N"]))](*args, **meta, BLOCK_M=1)
    else:
        bm, bn, bk = (_pow2(M, 16, 256) if gemm else 1), _pow2(N, 16, 256), _pow2(K, 16, 512)
        grid = (triton.cdiv(M, bm), triton.cdiv(N, bn)) if gemm else (M, triton.cdiv(N, bn))
        kern[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return y.reshape(*lead, N)


# Codebooks of at most this many centroids are searched by the kernel (uint8 codes).
CQ_MAX_CENTROIDS = 256


def _cq_code_dtype(num_c: int) -> torch.dtype:
    bits = max(1, (num_c - 1).bit_length())
    return torch.uint8 if bits <= 8 else torch.int16 if bits <= 15 else torch.int32


def cq_encode(x, codebooks):
    """Nearest-centroid codes [B, H, S, G] of x [B, H, S, D] (llmc::cq_encode); codebooks [H, G, K, c]."""
    dev = _check_device(x, codebooks)
    H, G, NUM_C, c = codebooks.shape
    if NUM_C > CQ_MAX_CENTROIDS:
        raise ValueError(f"the cq_encode kernel searches at most {CQ_MAX_CENTROIDS} centroids, got {NUM_C}")
    B, _, S, _ = x.shape
    x = x.contiguous()
    codebooks = codebooks.contiguous()
    out = torch.empty(B, H, S, G, dtype=_cq_code_dtype(NUM_C), device=x.device)
    if out.numel():
        bg = _pow2(max(1, 2048 // (NUM_C * _pow2(c))), 1, _pow2(G))
        if dev == "cpu":
            bg = _pow2(G)
        _kernel("cq_encode", dev)[(B * H * S, triton.cdiv(G, bg))](
            x, codebooks, out, H, S, G, C=c, NUM_C=_pow2(NUM_C), C_PAD=_pow2(c), BLOCK_G=bg)
    return out


def cq_decode(codes, codebooks):
    """x̂ [B, H, T, D] from codes [B, H, T, G] (llmc::cq_decode): each code replaced by its centroid."""
    dev = _check_device(codes, codebooks)
    H, G, NUM_C, c = codebooks.shape
    B, _, T, _ = codes.shape
    codes = codes.contiguous()
    codebooks = codebooks.contiguous()
    out = torch.empty(B, H, T, G * c, dtype=codebooks.dtype, device=codes.device)
    if out.numel():
        bd = _pow2(G * c)
        bt = _pow2(T, 1, 1024 if dev == "cpu" else max(1, 4096 // bd))
        _kernel("cq_decode", dev)[(B * H, triton.cdiv(T, bt))](codes, codebooks, out, H, T, G, NUM_C, C=c,
                                                               BLOCK_T=bt, BLOCK_D=bd)
    return out


def cq_attention(q, key_codes, value_codes, key_codebooks, value_codebooks, valid=None, scale=None,
                 splits: int | None = None):
    """Decode attention over a CQ-coded cache, without dequantizing it.

    q [B, Hq, D] (one query position), key_codes [B, Hkv, T, Gk] and value_codes [B, Hkv, T, Gv]
    (uint8), codebooks [Hkv, G, C, c]; keys coded in the query's frame (no rotation between);
    valid [B, T] (nonzero: attend). Scores come from a per-query table of query·centroid products
    ([B, Hq, Gk, C], one small kernel), so a key costs Gk byte reads and table lookups instead of D
    multiply-adds over a dequantized float key; values are gathered from their codebook and summed
    in registers. Splits T across programs (flash-decoding) and merges the partial softmaxes.
    Returns [B, Hq, D] in q's dtype.
    """
    dev = _check_device(q, key_codes, value_codes, key_codebooks, value_codebooks)
    B, HQ, D = q.shape
    _, HKV, T, GK = key_codes.shape
    _, GK2, CK, ck = key_codebooks.shape
    _, GV, CV, cv = value_codebooks.shape
    if GK2 != GK or GK * ck != D or GV * cv != D or value_codes.shape[-1] != GV or HQ % HKV:
        raise ValueError("cq_attention: the shapes of q, codes and codebooks do not agree")
    if CK > CQ_MAX_CENTROIDS or CV > CQ_MAX_CENTROIDS:
        raise ValueError(f"cq_attention reads uint8 codes (at most {CQ_MAX_CENTROIDS} centroids)")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.int8, device=q.device)
    valid = valid.to(torch.int8).contiguous()
    q = q.contiguous()
    table = torch.empty(B, HQ, GK, CK, dtype=torch.float32, device=q.device)
    bg = _pow2(GK) if dev == "cpu" else _pow2(max(1, 2048 // (CK * _pow2(ck))), 1, _pow2(GK))
    _kernel("cq_query_table", dev)[(B * HQ, triton.cdiv(GK, bg))](
        q, key_codebooks.contiguous(), table, HQ, HQ // HKV, GK, C=ck, NUM_C=CK, C_PAD=_pow2(ck), BLOCK_G=bg)
    if splits is None:
        splits = 1 if dev == "cpu" else max(1, min(triton.cdiv(T, 256), 264 // max(1, B * HQ) or 1))
    bt = _pow2(T, 16, 512) if dev == "cpu" else 64
    per = triton.cdiv(triton.cdiv(T, splits), bt) * bt
    splits = max(1, triton.cdiv(T, per))
    m = torch.empty(B * HQ, splits, dtype=torch.float32, device=q.device)
    lse = torch.empty_like(m)
    acc = torch.empty(B * HQ, splits, D, dtype=torch.float32, device=q.device)
    _kernel("cq_attention", dev)[(B * HQ, splits)](
        table, key_codes.contiguous(), value_codes.contiguous(), value_codebooks.contiguous(), valid, m, lse, acc,
        HQ, HKV, HQ // HKV, T, GK, GV, scale, per, NUM_CK=CK, NUM_CV=CV, CV=cv, GK_PAD=_pow2(GK), D_PAD=_pow2(D),
        BLOCK_T=bt)
    top = m.amax(1, keepdim=True)
    w = torch.exp(m - torch.where(torch.isinf(top), torch.zeros_like(top), top))  # 0 for empty splits
    out = (acc * w[..., None]).sum(1) / (lse * w).sum(1, keepdim=True)
    return out.reshape(B, HQ, D).to(q.dtype)


def kivi_append(past, new, bits: int, group: int, value_group: int, residual: int, keys: bool):
    """cat(past, new) of a simulated KIVI cache (llmc::kivi_append): the positions leaving the float tail
    quantized by the kernel (keys per channel over `group` tokens, values per token over channel groups)."""
    dev = _check_device(past, new)
    present = torch.cat([past, new], 2)

    def qlen(n):
        return max(n - residual, 0) // group * group

    n0, n1 = qlen(past.shape[2]), qlen(present.shape[2])
    if n1 == n0:
        return present
    seg = present[:, :, n0:n1].contiguous()
    B, H, L, D = seg.shape
    if keys:
        R, Lr, C = B * H * (L // group), group, D
    else:
        R, Lr, C = B * H * L * (D // value_group), value_group, 1
    out = torch.empty_like(seg)
    bc = _pow2(C, 1, 1024 if dev == "cpu" else 64)
    _kernel("kivi_fake_quant", dev)[(R, triton.cdiv(C, bc))](seg, out, Lr, C, float(2 ** bits - 1),
                                                            BLOCK_L=_pow2(Lr), BLOCK_C=bc)
    present[:, :, n0:n1] = out
    return present
