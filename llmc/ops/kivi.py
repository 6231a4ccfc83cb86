"""KIVI-style uniform KV-cache quantization, simulated in a float cache: `llmc::kivi_append`.

A KIVI cache (Liu et al., "KIVI: a tuning-free asymmetric 2bit quantization for KV cache")
stores keys quantized per channel over groups of `group` consecutive tokens and values per token
over groups of `value_group` channels, each group with its own min/max (asymmetric: a scale and a
zero point), and keeps the newest tokens in full precision: the `residual` most recent ones and
those of a key group that is not complete yet. Cache position p is quantized once the cache holds
S tokens with

    p < quantized_length(S) = floor(max(S - residual, 0) / group) * group

`kivi_append(past, new, ...)` is the cache write `cat(past, new)` of such a cache, simulated: the
result is float and holds exactly what the real cache would return. The positions that leave the
float tail in this append, [quantized_length(S_past), quantized_length(S)), are quantized and
dequantized; older positions were quantized by an earlier append and are passed through.

The cache must start at position 0 of every row (no left padding): groups are aligned to cache
positions, not to token positions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def quantized_length(length: int, group: int, residual: int) -> int:
    """How many leading positions of a cache of `length` tokens hold quantized entries."""
    return max(length - residual, 0) // group * group


def fake_quant(x: Tensor, bits: int, dim: int) -> Tensor:
    """Asymmetric min/max quantization of x along `dim` to `bits` bits, dequantized."""
    qmax = 2 ** bits - 1
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    return torch.clamp(torch.round((x - lo) / scale), 0, qmax) * scale + lo


def append(past: Tensor, new: Tensor, bits: int, group: int, value_group: int, residual: int,
           keys: bool) -> Tensor:
    """Reference of `llmc::kivi_append`: cat(past, new) [B, H, S, D] with the entries leaving the
    float tail quantized (keys: per channel over `group` tokens; values: per token over
    `value_group` channels)."""
    present = torch.cat([past, new], 2)
    n0 = quantized_length(past.shape[2], group, residual)
    n1 = quantized_length(present.shape[2], group, residual)
    if n1 == n0:
        return present
    seg = present[:, :, n0:n1]
    B, H, L, D = seg.shape
    if keys:
        q = fake_quant(seg.reshape(B, H, L // group, group, D), bits, 3)
    else:
        q = fake_quant(seg.reshape(B, H, L, D // value_group, value_group), bits, 4)
    return torch.cat([present[:, :, :n0], q.reshape(seg.shape), present[:, :, n1:]], 2)


@torch.library.custom_op("llmc::kivi_append", mutates_args=())
def kivi_append(past: Tensor, new: Tensor, bits: int, group: int, value_group: int, residual: int,
                keys: bool) -> Tensor:
    """cat(past, new) of a simulated KIVI cache: positions leaving the float tail are quantized."""
    return append(past, new, bits, group, value_group, residual, keys)


@kivi_append.register_fake
def _(past, new, bits, group, value_group, residual, keys):
    B, H, _, D = past.shape
    return past.new_empty(B, H, past.shape[2] + new.shape[2], D)
