"""`llmc::vq_linear`: a linear layer whose weight is an additive vector quantization (AQLM layout).

Layout, per linear of weight [N, K] (out, in), input groups of g weights, M codebooks of 2^B codewords:
  codes      [N, K/g, M]      uint8 (B <= 8) or int16 (B <= 16, the code is the low 16 bits)
  codebooks  [M, 2^B, 1, g]   float
  scales     [N, 1, 1, 1]     float, one per output row
W[n, j*g:(j+1)*g] = scales[n] * sum_m codebooks[m, codes[n, j, m], 0, :];  y = x @ Wᵀ (+ bias).

Two implementations behind one op: dequantize-then-matmul (any batch; training and prefill), and for
a few tokens on CPU a lookup-table kernel (`llmc.ops.vq_kernels`): per input group, the dot products
of x with every codeword (`[K/g, M, 2^B]`, a small table), then each output is a gather-and-sum over
its codes, reading 1 byte per codebook per group instead of g float32 weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_BITS = 16


def code_dtype(bits: int) -> torch.dtype:
    """Storage dtype of codes of `bits` bits: uint8 up to 8, int16 (two's complement of the low 16 bits) up to 16."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"codebook bits must be in 1..{MAX_BITS}, got {bits}")
    return torch.uint8 if bits <= 8 else torch.int16


def store_codes(codes: Tensor, bits: int) -> Tensor:
    """Integer codes (any int dtype, values < 2^bits) in their storage dtype."""
    if bits <= 8:
        return codes.to(torch.uint8)
    c = codes.to(torch.int32)
    return torch.where(c >= 1 << 15, c - (1 << 16), c).to(torch.int16)


def load_codes(codes: Tensor) -> Tensor:
    """Stored codes -> int64 code values (undoes the int16 wrap)."""
    c = codes.to(torch.int64)
    return c & 0xFFFF if codes.dtype == torch.int16 else c


def dequantize(codes: Tensor, codebooks: Tensor, scales: Tensor) -> Tensor:
    """Weight [N, K] from AQLM-layout tensors; differentiable in codebooks and scales."""
    N, J, M = codes.shape
    _, K_cb, _, g = codebooks.shape
    offsets = torch.arange(M, device=codes.device) * K_cb
    flat = codebooks.reshape(M * K_cb, g)
    idx = (load_codes(codes) + offsets).reshape(N * J, M)
    w = F.embedding_bag(idx, flat, mode="sum")  # [N*J, g]
    return w.reshape(N, J * g) * scales.reshape(N, 1)


def bits_per_weight(N: int, K: int, M: int, bits: int, g: int, value_bits: int = 16) -> float:
    """AQLM's accounting: codes + codebooks + row scales (16-bit values), per weight of the layer."""
    return (N * K / g * M * bits + M * (1 << bits) * g * value_bits + N * value_bits) / (N * K)


# Decode sizes (tokens per call) at or below which the lookup-table kernel is used on CPU.
LUT_MAX_TOKENS = 4


@torch.library.custom_op("llmc::vq_linear", mutates_args=())
def vq_linear(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor) -> Tensor:
    """y = x @ dequantize(codes, codebooks, scales)ᵀ. x: [..., K] -> [..., N]."""
    tokens = x.numel() // max(x.shape[-1], 1)
    if tokens <= LUT_MAX_TOKENS and x.device.type == "cpu" and codes.dtype == torch.uint8:
        from llmc.ops import vq_kernels

        if vq_kernels.available():
            return vq_kernels.lut_linear(x, codes, codebooks, scales)
    return F.linear(x, dequantize(codes, codebooks, scales).to(x.dtype))


@vq_linear.register_fake
def _(x, codes, codebooks, scales):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


def _setup_context(ctx, inputs, output):
    x, codes, codebooks, scales = inputs
    ctx.save_for_backward(codes, codebooks, scales)


def _backward(ctx, grad):
    """Gradient w.r.t. the input only (codes are discrete; calibration passes differentiate through x)."""
    codes, codebooks, scales = ctx.saved_tensors
    w = dequantize(codes, codebooks, scales)
    return grad @ w.to(grad.dtype), None, None, None


vq_linear.register_autograd(_backward, setup_context=_setup_context)
