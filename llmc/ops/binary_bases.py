"""`llmc::binary_bases_linear`: a linear layer whose weight is a sum of scaled binary bases (QBB).

    W = Σ_i α_i ⊙ B_i,   B_i ∈ {−1, +1}^[N, K],   α_i one scale per output row (or per group of inputs)

Layout, per linear of weight [N, K] (out, in), `nb` bases, G scale groups per row (K/G inputs each):
  signs   uint8 [nb, N, K/8]   bit t of byte j is B_i[n, 8j + t] > 0 (1: +1, 0: −1), low bit first
  scales  float [nb, N, G]     (float16 as stored by qbb_quant; any float dtype is read as float32)
W[n, k] = Σ_i scales[i, n, k // (K/G)] · (2·bit(signs[i, n, k // 8], k % 8) − 1);  y = x @ Wᵀ.

A matrix-vector product needs additions and subtractions only, then nb·G multiplications per
output. Two implementations behind one op: dequantize-then-matmul (any batch; training and
prefill), and for a few tokens on CPU a lookup-table kernel: for every 8 inputs, the 256 signed
sums ±x₀ ± … ± x₇ form a table [K/8, 256] shared by every basis and every row, and output n is
Σ_i α_i[n] Σ_j table[j, signs[i, n, j]]: nb·K/8 one-byte lookups per row instead of K float
weights (it is `llmc::vq_linear` with nb fixed codebooks of the 256 sign patterns, g = 8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import numba
    import numpy as np
except ImportError:  # numba is optional: the op falls back to dequantize-then-matmul
    numba = None

# Decode sizes (tokens per call) at or below which the table kernel is used on CPU.
LUT_MAX_TOKENS = 4

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def sign_patterns(dtype: torch.dtype = torch.float32) -> Tensor:
    """[8, 256]: column p is the ±1 vector whose bit t (low first) is bit t of p."""
    p = torch.arange(256, dtype=torch.int32)
    bits = (p[None, :] >> torch.arange(8, dtype=torch.int32)[:, None]) & 1
    return (2 * bits - 1).to(dtype)


def pack_signs(B: Tensor) -> Tensor:
    """Signs [..., K] (bool: True is +1, or any real tensor: > 0 is +1), K a multiple of 8 -> uint8 [..., K/8]."""
    if B.shape[-1] % 8:
        raise ValueError(f"the input width must be a multiple of 8 to pack signs, got {B.shape[-1]}")
    bits = (B > 0) if B.dtype != torch.bool else B
    bits = bits.reshape(*B.shape[:-1], B.shape[-1] // 8, 8).to(torch.uint8)
    return (bits << _SHIFTS).sum(-1, dtype=torch.uint8)


def unpack_signs(signs: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 [..., K/8] -> ±1 [..., K] in `dtype` (inverse of `pack_signs`)."""
    bits = (signs.unsqueeze(-1) >> _SHIFTS) & 1
    return (bits.to(dtype) * 2 - 1).reshape(*signs.shape[:-1], signs.shape[-1] * 8)


_PATTERNS: dict = {}


def _patterns() -> Tensor:
    """[256, 8] float32: row p is the ±1 vector of the bits of p (a lookup table for unpacking)."""
    if "t" not in _PATTERNS:
        _PATTERNS["t"] = sign_patterns().t().contiguous()
    return _PATTERNS["t"]


def dequantize(signs: Tensor, scales: Tensor) -> Tensor:
    """Weight [N, K] (float32) from signs [nb, N, K/8] and scales [nb, N, G]; differentiable in the scales.

    Unpacks one basis at a time through a [256, 8] table of sign patterns (a gather per byte; 2.5x
    faster than shifting bits, and the memory of one basis at a time)."""
    nb, N, J = signs.shape
    G = scales.shape[-1]
    table = _patterns().to(signs.device)
    w = None
    for i in range(nb):  # a few bases (<= 8)
        t = table[signs[i].long()].reshape(N, G, J * 8 // G) * scales[i].float().unsqueeze(-1)
        w = t if w is None else (w + t if scales.requires_grad else w.add_(t))
    return w.reshape(N, J * 8)


def bits_per_weight(bases: int, K: int, groups: int = 1, scale_bits: int = 16) -> float:
    """Stored bits per weight: one bit per basis, plus `bases * groups` scales of `scale_bits` per row of K inputs."""
    return bases + bases * groups * scale_bits / K


def _check(signs: Tensor, scales: Tensor) -> None:
    if signs.dtype != torch.uint8 or signs.dim() != 3:
        raise TypeError(f"signs must be uint8 [bases, N, K/8], got {signs.dtype} {list(signs.shape)}")
    nb, N, J = signs.shape
    if scales.dim() != 3 or tuple(scales.shape[:2]) != (nb, N) or (J * 8) % scales.shape[2]:
        raise ValueError(f"scales must be [bases, N, G] = [{nb}, {N}, G] with G dividing {J * 8}, got "
                         f"{list(scales.shape)}")
    if (J * 8 // scales.shape[2]) % 8:
        raise ValueError(f"scale groups must span whole bytes of signs (multiples of 8 inputs), got "
                         f"{J * 8 // scales.shape[2]}")


def _table_rows(lut, signs, scales, out, start, stop):
    """out[t, n] = Σ_i Σ_g scales[i, n, g] Σ_{j in g} lut[t, j, signs[i, n, j]] for start <= n < stop.

    lut [T, J, 256] float32, signs [nb, N, J] uint8, scales [nb, N, G] float32, out [T, N] float32.
    """
    T, J, _ = lut.shape
    nb = signs.shape[0]
    G = scales.shape[2]
    per = J // G
    for n in range(start, stop):
        for t in range(T):
            table = lut[t]
            acc = np.float32(0.0)
            for i in range(nb):
                row = signs[i, n]
                for g in range(G):
                    s = np.float32(0.0)
                    for j in range(g * per, (g + 1) * per):
                        s += table[j, row[j]]
                    acc += scales[i, n, g] * s
            out[t, n] = acc


def _table_parallel(lut, signs, scales, out, blocks):
    N = signs.shape[1]
    for b in numba.prange(blocks):
        _table_rows(lut, signs, scales, out, b * N // blocks, (b + 1) * N // blocks)


def _jit(fn, **options):
    options.update(fastmath=True, nogil=True)
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError:  # no writable cache locator: compile without the disk cache
        return numba.njit(**options)(fn)


if numba is not None:  # compiled on first call
    _table_rows = _jit(_table_rows)
    _table_parallel = _jit(_table_parallel, parallel=True)


def kernel_available() -> bool:
    """Whether the table kernel can run (numba imports)."""
    return numba is not None


def _threads() -> int:
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    try:
        if numba.threading_layer() == "workqueue":  # its sleeping workers lose the cores to torch's OpenMP
            return 1
    except ValueError:  # no parallel region has run yet
        pass
    return threads


def table_linear(x: Tensor, signs: Tensor, scales: Tensor) -> Tensor:
    """x @ dequantize(signs, scales)ᵀ through the 256-entry signed-sum tables. x [..., K] -> [..., N].

    For a few tokens on CPU (the cost is linear in the tokens); computes in float32, returns x's dtype.
    """
    if numba is None:
        raise RuntimeError("the binary-bases table kernel needs numba (pip install numba)")
    _check(signs, scales)
    nb, N, J = signs.shape
    if x.shape[-1] != J * 8:
        raise ValueError(f"x has {x.shape[-1]} features, the signs cover {J * 8}")
    xg = x.detach().reshape(-1, 8).to(torch.float32)
    T = xg.shape[0] // J
    lut = (xg @ sign_patterns()).reshape(T, J, 256)  # lut[t, j, p] = Σ_k ±x[t, 8j+k]
    out = torch.empty(T, N, dtype=torch.float32)
    arrays = (lut.numpy(), signs.detach().contiguous().numpy(),
              scales.detach().to(torch.float32).contiguous().numpy(), out.numpy())
    threads = _threads()
    if threads > 1:
        numba.set_num_threads(threads)
        _table_parallel(*arrays, threads)
    else:
        _table_rows(*arrays, 0, N)
    return out.reshape(*x.shape[:-1], N).to(x.dtype)


def reference_linear(x: Tensor, signs: Tensor, scales: Tensor) -> Tensor:
    """The reference: y = x @ dequantize(signs, scales)ᵀ."""
    return F.linear(x, dequantize(signs, scales).to(x.dtype))


@torch.library.custom_op("llmc::binary_bases_linear", mutates_args=())
def binary_bases_linear(x: Tensor, signs: Tensor, scales: Tensor) -> Tensor:
    """y = x @ (Σ_i scales_i ⊙ B_i)ᵀ with B_i read from packed signs. x: [..., K] -> [..., N]."""
    tokens = x.numel() // max(x.shape[-1], 1)
    if tokens <= LUT_MAX_TOKENS and x.device.type == "cpu" and numba is not None and not x.requires_grad:
        return table_linear(x, signs, scales)
    return reference_linear(x, signs, scales)


@binary_bases_linear.register_fake
def _(x, signs, scales):
    return x.new_empty(*x.shape[:-1], signs.shape[1])


def _setup_context(ctx, inputs, output):
    x, signs, scales = inputs
    ctx.save_for_backward(x, signs, scales)


def _backward(ctx, grad):
    """Gradients w.r.t. the input and the scales (the signs are discrete): with dW = gradᵀ x,
    ∂L/∂scales[i, n, g] = Σ_{k in g} B_i[n, k] dW[n, k]."""
    x, signs, scales = ctx.saved_tensors
    gx = gs = None
    if ctx.needs_input_grad[0]:
        gx = grad @ dequantize(signs, scales).to(grad.dtype)
    if ctx.needs_input_grad[2]:
        nb, N, J = signs.shape
        G = scales.shape[-1]
        dW = grad.reshape(-1, N).float().t() @ x.reshape(-1, J * 8).float()  # [N, K]
        B = unpack_signs(signs).reshape(nb, N, G, J * 8 // G)
        gs = (B * dW.reshape(1, N, G, J * 8 // G)).sum(-1).to(scales.dtype)
    return gx, None, gs


binary_bases_linear.register_autograd(_backward, setup_context=_setup_context)


def outlier_sum(x: Tensor, index: Tensor, values: Tensor) -> Tensor:
    """Σ_j values[n, j] · x[..., index[n, j]] for every output n: x [..., K], index int [N, k], values [N, k]."""
    N, k = index.shape
    picked = x.index_select(-1, index.reshape(N * k).long()).unflatten(-1, (N, k))
    return (picked * values.to(x.dtype)).sum(-1)


@torch.library.custom_op("llmc::binary_bases_linear_outliers", mutates_args=())
def binary_bases_linear_outliers(x: Tensor, signs: Tensor, scales: Tensor, outlier_index: Tensor,
                                 outlier_values: Tensor) -> Tensor:
    """binary_bases_linear plus the kept outliers of each row (`outlier_sum`): one op for backends that run both
    together (written by the ONNX Runtime backend's kernel lowering; qbb_quant emits the two parts)."""
    return binary_bases_linear(x, signs, scales) + outlier_sum(x, outlier_index, outlier_values)


@binary_bases_linear_outliers.register_fake
def _(x, signs, scales, outlier_index, outlier_values):
    return x.new_empty(*x.shape[:-1], signs.shape[1])
