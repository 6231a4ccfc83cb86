"""`llmc::nbits_linear`: a linear layer with blockwise 2/3/4/8-bit scalar codes, in MatMulNBits layout.

Layout (ONNX Runtime's `com.microsoft::MatMulNBits`, so lowering is a pure op mapping at 2, 4 and 8
bits; 3-bit codes, 8 per 3 bytes, are widened to 4-bit ones in the ONNX graph):
  codes       uint8 [N, K/block, block*bits/8]   along K as one bit stream, low bits first (4-bit: even k
                                                 in the low nibble)
  scales      float [N, K/block]
  zero_points uint8 [N, ceil(G/c)*c*bits/8]      packed along the G = K/block blocks the same way, padded
                                                 to whole chunks of c values (c = 8 // bits; 8 at 3 bits)
W[n, k] = (q[n, k] - zero[n, k // block]) * scale[n, k // block];  y = x @ Wᵀ.

With `int8_act`, the input is first rounded to int8 per block of `block` along K (symmetric,
scale = absmax/127, round half to even): what MatMulNBits computes with `accuracy_level=4`, its
integer-dot-product path (checked against ONNX Runtime 1.31 to ~1e-6 at 2, 4 and 8 bits).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 3, 4, 8)


def ort_bits(bits: int) -> int:
    """The MatMulNBits width that runs `bits`-bit codes: ONNX Runtime has kernels for 2, 4 and 8 bits,
    so 3-bit codes (stored 8 per 3 bytes) run as 4-bit ones, widened when the session loads."""
    return 4 if bits == 3 else bits


def _chunk(bits: int) -> tuple[int, int]:
    """(values, bytes) of the smallest whole-byte run of `bits`-bit values: (8 // bits, 1) when bits
    divides 8, (8, 3) at 3 bits."""
    values = 8 // math.gcd(8, bits)
    return values, values * bits // 8


def pack_along_last(q: Tensor, bits: int) -> Tensor:
    """Pack integers < 2**bits along the last dim into uint8 as one little-endian bit stream (value i
    at bits [i*bits, (i+1)*bits), so at 4 bits even k is the low nibble). q: [..., n], n a multiple
    of the chunk (8 // bits values; 8 values in 3 bytes at 3 bits)."""
    values, nbytes = _chunk(bits)
    q = q.to(torch.int64).reshape(*q.shape[:-1], q.shape[-1] // values, values)
    stream = (q << (torch.arange(values) * bits)).sum(-1, keepdim=True)  # <= 24 bits per chunk
    out = (stream >> (torch.arange(nbytes) * 8)) & 0xFF
    return out.to(torch.uint8).reshape(*q.shape[:-2], -1)


def unpack_along_last(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack_along_last`: uint8 [..., m] -> int32 [..., n] (the first n values)."""
    values, nbytes = _chunk(bits)
    if nbytes == 1:  # bits divides 8: shift the bytes themselves (uint8; dequantize runs on every call)
        stream = packed.unsqueeze(-1)
    else:
        b = packed.to(torch.int32).reshape(*packed.shape[:-1], -1, nbytes)
        stream = (b << (torch.arange(nbytes, dtype=torch.int32) * 8)).sum(-1, keepdim=True, dtype=torch.int32)
    q = (stream >> (torch.arange(values, dtype=stream.dtype) * bits)) & ((1 << bits) - 1)
    return q.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.int32)


def pack_blocks(q: Tensor, zeros: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """MatMulNBits-layout codes [N, G, block*bits/8] and zero points [N, ceil(G/chunk)*chunk*bits/8]
    from integer-valued codes q [N, G, block] and zero points [N, G] (padded to whole chunks)."""
    values, _ = _chunk(bits)
    G = zeros.shape[-1]
    zeros = torch.nn.functional.pad(zeros, (0, -(-G // values) * values - G))
    return pack_along_last(q, bits), pack_along_last(zeros, bits)


def dequantize(codes: Tensor, scales: Tensor, zero_points: Tensor, K: int, bits: int, block_size: int) -> Tensor:
    """Float weight [N, K] from MatMulNBits-layout tensors."""
    N, n_blocks, _ = codes.shape
    q = unpack_along_last(codes, bits, block_size)  # [N, n_blocks, block]
    z = unpack_along_last(zero_points, bits, n_blocks)  # [N, n_blocks]
    w = (q - z[..., None]).to(scales.dtype) * scales[..., None]
    return w.reshape(N, n_blocks * block_size)[:, :K]


def int8_act_supported(bits: int, block_size: int) -> bool:
    """Whether MatMulNBits has an int8-compute kernel for these codes (ONNX Runtime 1.31 CPU, measured:
    4 and 8 bits at blocks 16..256; 2 bits at 32..128 only; elsewhere it silently computes in float)."""
    bits = ort_bits(bits)
    return (bits in (4, 8) and 16 <= block_size <= 256) or (bits == 2 and 32 <= block_size <= 128)


def quantize_activations_int8(x: Tensor, K: int, block_size: int) -> Tensor:
    """x [..., K] rounded to int8 levels per block of `block_size` along K (scale = absmax/127,
    round half to even), returned dequantized in x's dtype. A block of zeros stays zero."""
    n_blocks = -(-K // block_size)
    xf = torch.nn.functional.pad(x.float(), (0, n_blocks * block_size - K))
    xb = xf.reshape(*x.shape[:-1], n_blocks, block_size)
    amax = xb.abs().amax(-1, keepdim=True)
    # Bit-exact with the kernel: x * (127 / amax) with a true float32 division (not `1 / scale`, and not
    # `127 / tensor`, which torch evaluates as 127 * reciprocal), then round half to even. One ulp of
    # difference flips an int8 level wherever x lands on a half step, and such ties are common.
    inverse = torch.where(amax > 0, torch.div(torch.full_like(amax, 127.0), amax), torch.zeros_like(amax))
    q = torch.round(xb * inverse) * (amax / 127)
    return q.reshape(*x.shape[:-1], n_blocks * block_size)[..., :K].to(x.dtype)


@torch.library.custom_op("llmc::nbits_linear", mutates_args=())
def nbits_linear(x: Tensor, codes: Tensor, scales: Tensor, zero_points: Tensor, K: int, N: int, bits: int,
                 block_size: int, int8_act: bool = False) -> Tensor:
    """y = x @ dequantize(codes, scales, zero_points)ᵀ, x rounded to int8 per block first if `int8_act`.
    x: [..., K] -> [..., N]."""
    if int8_act:
        x = quantize_activations_int8(x, K, block_size)
    return torch.nn.functional.linear(x, dequantize(codes, scales, zero_points, K, bits, block_size))


@nbits_linear.register_fake
def _(x, codes, scales, zero_points, K, N, bits, block_size, int8_act=False):
    return x.new_empty(*x.shape[:-1], N)


def quantize_rtn(weight: Tensor, bits: int, block_size: int, symmetric: bool = False):
    """Round-to-nearest blockwise quantization of weight [N, K] into MatMulNBits-layout tensors.

    Asymmetric: per block, scale = (max - min) / (2**bits - 1), zero = round(-min / scale).
    Symmetric: scale = absmax / 2**(bits-1), zero = 2**(bits-1) (the MatMulNBits default).
    Returns codes, scales (float32), zero_points.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    N, K = weight.shape
    n_blocks = -(-K // block_size)
    w = weight.detach().float()
    if n_blocks * block_size != K:  # pad K with zeros to whole blocks
        w = torch.nn.functional.pad(w, (0, n_blocks * block_size - K))
    w = w.reshape(N, n_blocks, block_size)
    qmax = (1 << bits) - 1
    if symmetric:
        half = 1 << (bits - 1)
        scale = w.abs().amax(-1) / half
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.full_like(scale, half)
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scale = (hi - lo) / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.round(-lo / scale).clamp(0, qmax)
    q = torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, qmax)
    codes, zero_points = pack_blocks(q, zero, bits)
    return codes, scale.float(), zero_points


def _setup_context(ctx, inputs, output):
    x, codes, scales, zero_points, K, N, bits, block_size, *_ = inputs
    ctx.save_for_backward(codes, scales, zero_points)
    ctx.meta = (K, bits, block_size)


def _backward(ctx, grad):
    """Gradient w.r.t. the input only (codes are discrete; calibration passes differentiate through x;
    the int8 rounding of x, if any, passes the gradient straight through)."""
    codes, scales, zero_points = ctx.saved_tensors
    K, bits, block_size = ctx.meta
    w = dequantize(codes, scales, zero_points, K, bits, block_size)
    return grad @ w.to(grad.dtype), None, None, None, None, None, None, None, None


nbits_linear.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("llmc::nbits_embedding", mutates_args=())
def nbits_embedding(ids: Tensor, codes: Tensor, scales: Tensor, zero_points: Tensor, K: int, bits: int,
                    block_size: int) -> Tensor:
    """Rows `ids` of the [N, K] table stored as MatMulNBits-layout codes: ids [...] -> [..., K].

    Only the looked-up rows are dequantized. A tied lm_head's `nbits_linear` can share the tensors.
    """
    flat = ids.reshape(-1)
    rows = dequantize(codes[flat], scales[flat], zero_points[flat], K, bits, block_size)
    return rows.reshape(*ids.shape, K)


@nbits_embedding.register_fake
def _(ids, codes, scales, zero_points, K, bits, block_size):
    return scales.new_empty(*ids.shape, K)
