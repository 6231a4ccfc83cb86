"""Attention over a float KV cache in one op: `llmc::cached_attention`.

The traced decoder writes each layer's attention as separate steps: the step's keys and values
concatenated after the past (the concatenations are the present cache the graph returns), the
query heads of each KV head folded into rows, scaled-dot-product attention with an additive bias,
then the heads unfolded into the hidden dimension. `cached_attention` is those steps as one
function, so a backend can lower them to one fused node (ONNX Runtime's GroupQueryAttention,
backends/onnxruntime/gqa.py). Layouts:

  q            [B, H, S, D]        the step's query heads, rotated
  key, value   [B, Hkv, S, D]      the step's keys (rotated) and values
  past_*       [B, Hkv, C, D]      the cache before the step: its first P = T - S positions
  bias         [B, S, T]           additive mask (padding, causality, windows), 0 where attended
  returns      out [B, S, H * D], present_key, present_value [B, Hkv, max(C, T), D]

The past's valid length P comes from the mask (T = P + S), not from the past's length C: the past
may be a buffer of capacity C >= P whose positions from P on are free, and the step's keys and
values are written at [P, T) of it (ONNX Runtime's GroupQueryAttention then shares one buffer
between past and present). With C = P this is the plain concatenation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def attend(q: Tensor, key: Tensor, value: Tensor, past_key: Tensor, past_value: Tensor, bias: Tensor,
           scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of `llmc::cached_attention`, computed as the traced graph computes it (query groups folded
    into rows, so K and V are never repeated per query head)."""
    B, H, S, D = q.shape
    Hkv = key.shape[1]
    G = H // Hkv
    T = bias.shape[-1]
    P = T - S
    present_key = torch.cat([past_key[:, :, :P], key, past_key[:, :, T:]], dim=2)
    present_value = torch.cat([past_value[:, :, :P], value, past_value[:, :, T:]], dim=2)
    rows = q.reshape(B, Hkv, G * S, D)
    mask = bias[:, None, None].expand(B, 1, G, S, T).reshape(B, 1, G * S, T)
    out = torch.nn.functional.scaled_dot_product_attention(rows, present_key[:, :, :T], present_value[:, :, :T],
                                                           attn_mask=mask, scale=scale)
    out = out.unflatten(2, (G, S)).permute(0, 3, 1, 2, 4).reshape(B, S, H * value.shape[3])
    return out, present_key, present_value


@torch.library.custom_op("llmc::cached_attention", mutates_args=())
def cached_attention(q: Tensor, key: Tensor, value: Tensor, past_key: Tensor, past_value: Tensor, bias: Tensor,
                     scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Attention of q over the past and the step's keys/values; also returns the present cache (`attend`)."""
    return attend(q, key, value, past_key, past_value, bias, scale)


@cached_attention.register_fake
def _(q, key, value, past_key, past_value, bias, scale):
    B, H, S, D = q.shape
    Hkv, length = past_key.shape[1], torch.sym_max(past_key.shape[2], bias.shape[-1])
    return (q.new_empty(B, S, H * value.shape[3]), past_key.new_empty(B, Hkv, length, D),
            past_value.new_empty(B, Hkv, length, value.shape[3]))
