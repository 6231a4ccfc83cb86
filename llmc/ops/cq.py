"""Coupled quantization (CQ) of KV-cache tensors: `llmc::cq_encode`, `llmc::cq_decode`, weighted k-means.

A head's `D` channels split into `G = D / c` contiguous groups of `c` channels; each group has its
own codebook of `K = 2**b` centroids, and one `b`-bit code per group and token replaces the `c`
floats (b / c bits per channel). Tensor layouts:

  x          float [B, H, S, D]      keys (before RoPE) or values, per KV head
  codebooks  float [H, G, K, c]      one codebook per (head, channel group)
  codes      uint8 [B, H, S, G]      (int16 when 8 < b <= 15, int32 when b = 16)

Encoding is a nearest-centroid search, written as ||C||² - 2 x·C (the ||x||² term does not change
the argmin), the same formula the ONNX lowering uses, so both pick the same centroid.
"""

from __future__ import annotations

import torch
from torch import Tensor

MAX_BITS = 16


def code_dtype(bits: int) -> torch.dtype:
    """Smallest integer dtype holding a `bits`-bit code (ONNX Runtime has no uint16 Gather)."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"code bits must be in 1..{MAX_BITS}, got {bits}")
    return torch.uint8 if bits <= 8 else torch.int16 if bits <= 15 else torch.int32


def code_bits(num_codes: int) -> int:
    """Bits of a code that indexes `num_codes` centroids."""
    return max(1, (num_codes - 1).bit_length())


def encode(x: Tensor, codebooks: Tensor) -> Tensor:
    """Nearest-centroid codes [B, H, S, G] of x [B, H, S, D] (reference of `llmc::cq_encode`)."""
    H, G, K, c = codebooks.shape
    B, _, S, _ = x.shape
    xg = x.reshape(B, H, S, G, c)
    scores = torch.einsum("bhsgc,hgkc->bhsgk", xg, codebooks)
    dist = codebooks.pow(2).sum(-1)[None, :, None] - 2 * scores  # [B, H, S, G, K]
    return dist.argmin(-1).to(code_dtype(code_bits(K)))


def decode(codes: Tensor, codebooks: Tensor) -> Tensor:
    """x̂ [B, H, T, D] from codes [B, H, T, G] (reference of `llmc::cq_decode`): one gather per group."""
    H, G, K, c = codebooks.shape
    B, _, T, _ = codes.shape
    offsets = (torch.arange(H * G, device=codes.device) * K).view(H, 1, G)
    flat = codes.long() + offsets  # index into the [H*G*K, c] table
    return torch.nn.functional.embedding(flat, codebooks.reshape(H * G * K, c)).reshape(B, H, T, G * c)


@torch.library.custom_op("llmc::cq_encode", mutates_args=())
def cq_encode(x: Tensor, codebooks: Tensor) -> Tensor:
    """Codes [B, H, S, D/c] of x [B, H, S, D]: the nearest of each group's 2**b centroids."""
    return encode(x, codebooks)


@cq_encode.register_fake
def _(x, codebooks):
    H, G, K, c = codebooks.shape
    return x.new_empty(*x.shape[:-1], G, dtype=code_dtype(code_bits(K)))


@torch.library.custom_op("llmc::cq_decode", mutates_args=())
def cq_decode(codes: Tensor, codebooks: Tensor) -> Tensor:
    """Dequantized [B, H, T, D] from codes [B, H, T, D/c]: each code replaced by its centroid."""
    return decode(codes, codebooks)


@cq_decode.register_fake
def _(codes, codebooks):
    H, G, K, c = codebooks.shape
    return codebooks.new_empty(*codes.shape[:-1], G * c)


# ---------------------------------------------------------------------------------------------
# Learning the codebooks


def nearest(points: Tensor, centroids: Tensor, block_bytes: int = 1 << 22) -> tuple[Tensor, Tensor]:
    """Nearest centroid and squared distance, per point. points [R, N, c], centroids [R, K, c].

    The [r, n, K] distance blocks are kept to about `block_bytes` (4 MiB) so they stay in cache
    while the argmin reads them; one [R, N, K] block is 3x slower on this CPU, from memory traffic.
    """
    R, N, _ = points.shape
    K = centroids.shape[1]
    n = min(N, max(1, block_bytes // (4 * K)))
    r = max(1, block_bytes // (4 * n * K))
    idx = torch.empty(R, N, dtype=torch.long)
    d2 = torch.empty(R, N)
    norms = centroids.pow(2).sum(-1).unsqueeze(1)  # [R, 1, K]
    cent_t = centroids.transpose(1, 2)
    for r0 in range(0, R, r):
        for n0 in range(0, N, n):
            p = points[r0:r0 + r, n0:n0 + n]
            best, arg = torch.baddbmm(norms[r0:r0 + r], p, cent_t[r0:r0 + r], alpha=-2).min(-1)
            idx[r0:r0 + r, n0:n0 + n] = arg
            d2[r0:r0 + r, n0:n0 + n] = (best + p.pow(2).sum(-1)).clamp_min(0)
    return idx, d2


def kmeans_plus_plus(points: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding, independently per row: points [R, N, c] -> centroids [R, k, c]."""
    R, N, c = points.shape
    rows = torch.arange(R)
    cent = torch.empty(R, k, c)
    first = torch.randint(0, N, (R,), generator=gen)
    cent[:, 0] = points[rows, first]
    d2 = (points - cent[:, :1]).pow(2).sum(-1)
    for j in range(1, k):
        # sample a point with probability d2 / sum(d2): invert the cumulative sum at a uniform draw
        cdf = d2.cumsum(-1)
        u = torch.rand(R, 1, generator=gen) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, u).squeeze(1).clamp_max(N - 1)
        cent[:, j] = points[rows, pick]
        d2 = torch.minimum(d2, (points - cent[:, j:j + 1]).pow(2).sum(-1))
    return cent


def weighted_kmeans(points: Tensor, k: int, weights: Tensor | None = None, iters: int = 30, tol: float = 1e-5,
                    seed: int = 0, minibatch: int = 0, steps: int = 0) -> tuple[Tensor, dict]:
    """k-means with per-point weights, run independently for each of R rows at once.

    points [R, N, c]; weights [R, N] (None: all ones) scale each point's squared error, so a
    centroid is a weighted mean. k-means++ seeding (unweighted). With `minibatch` (points per row)
    and `steps`, seeding looks at a random `max(minibatch, k)` points per row and `steps` mini-batch
    updates follow (Sculley, "Web-scale k-means clustering": each centroid moves toward the weighted
    mean of the batch points it serves, by their weight over all the weight it has served so far);
    then up to `iters` Lloyd iterations over all points (`steps + iters` of them when a mini-batch
    would hold every point), which stop early when every row's weighted error improves by less than
    `tol` (relative). In Lloyd's M step an empty cluster is re-seeded with the point of its row
    that is worst served. Returns centroids [R, k, c] and stats (the final weighted and unweighted
    squared errors among them).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small kernels: thread barriers cost more than they give (15x on a busy CPU)
    try:
        return _weighted_kmeans(points, k, weights, iters, tol, seed, minibatch, steps)
    finally:
        torch.set_num_threads(threads)


def _rows_sample(points: Tensor, w: Tensor, m: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """m points per row drawn uniformly with replacement, and their weights."""
    R, N, c = points.shape
    pick = torch.randint(0, N, (R, m), generator=gen)
    return points.gather(1, pick.unsqueeze(-1).expand(R, m, c)), w.gather(1, pick)


def _weighted_kmeans(points, k, weights, iters, tol, seed, minibatch, steps):
    points = points.float().contiguous()
    R, N, c = points.shape
    if N < k:
        raise ValueError(f"k-means needs at least k={k} points per group, got {N}")
    w = torch.ones(R, N) if weights is None else weights.float().contiguous()
    gen = torch.Generator().manual_seed(seed)
    m = max(minibatch, k)
    if minibatch and m < N:
        sub = torch.stack([torch.randperm(N, generator=gen)[:m] for _ in range(R)])  # distinct points to seed from
        cent = kmeans_plus_plus(points.gather(1, sub.unsqueeze(-1).expand(R, m, c)), k, gen)
        served = torch.zeros(R, k)
        for _ in range(steps):
            p, pw = _rows_sample(points, w, minibatch, gen)
            idx, _ = nearest(p, cent)
            sums = torch.zeros(R, k, c).scatter_add_(1, idx.unsqueeze(-1).expand_as(p), p * pw.unsqueeze(-1))
            mass = torch.zeros(R, k).scatter_add_(1, idx, pw)
            served += mass
            cent = cent + (sums - mass.unsqueeze(-1) * cent) / served.clamp_min(1e-30).unsqueeze(-1)
    else:  # every point fits in one mini-batch: the steps are Lloyd iterations
        cent = kmeans_plus_plus(points, k, gen)
        iters += steps if minibatch else 0
    prev = None
    history = []
    for it in range(iters):
        idx, d2 = nearest(points, cent)
        err = (w * d2).sum(-1)  # per row: rows differ in scale, so each converges on its own terms
        history.append(float(err.sum()))
        if prev is not None and bool((prev - err <= tol * prev.clamp_min(1e-30)).all()):
            break
        prev = err
        sums = torch.zeros(R, k, c).scatter_add_(1, idx.unsqueeze(-1).expand(R, N, c), points * w.unsqueeze(-1))
        mass = torch.zeros(R, k).scatter_add_(1, idx, w)
        empty = mass <= 0
        cent = torch.where(empty.unsqueeze(-1), cent, sums / mass.clamp_min(1e-30).unsqueeze(-1))
        if empty.any():  # re-seed each empty centroid with a far point of its row
            worst = (w * d2).topk(min(k, N), dim=-1).indices  # [R, k]
            rows, cols = empty.nonzero(as_tuple=True)
            rank = empty.cumsum(-1)[rows, cols] - 1  # j-th empty centroid of a row takes its j-th worst point
            cent[rows, cols] = points[rows, worst[rows, rank]]
    idx, d2 = nearest(points, cent)
    final = float((w * d2).sum())
    return cent, {"iterations": len(history), "weighted_error": final, "squared_error": float(d2.sum()),
                  "first_error": history[0] if history else final}


# ---------------------------------------------------------------------------------------------
# Attention over a coded cache


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """RoPE of the first Drot = cos.shape[-1] channels of x [B, H, T, D] with tables [B|1, 1, T, Drot]:
    x·cos + roll(x, Drot/2)·signed_sin (signed_sin holds -sin on its first half), the rest as it is."""
    rot = cos.shape[-1]
    x_rot = x[..., :rot]
    rotated = x_rot * cos + x_rot.roll(rot // 2, dims=-1) * signed_sin
    return rotated if rot == x.shape[-1] else torch.cat((rotated, x[..., rot:]), dim=-1)


def attention(q: Tensor, key_codes: Tensor, key_new: Tensor, key_codebooks: Tensor, value_codes: Tensor,
              value_new: Tensor, value_codebooks: Tensor, cos: Tensor, signed_sin: Tensor, bias: Tensor,
              scale: float) -> Tensor:
    """Reference of `llmc::cq_attention`: the past keys and values decoded from their codes, this step's
    as they are, every key rotated at its position, then scaled-dot-product attention with `bias`.

    q [B, H, R, D] (a KV head's query heads folded into rows), codes [B, H, P, G], new [B, H, S, D],
    cos / signed_sin [B, 1, P+S, Drot], bias [B, 1, R, P+S]."""
    k = torch.cat([decode(key_codes, key_codebooks).to(key_new.dtype), key_new], dim=2)
    v = torch.cat([decode(value_codes, value_codebooks).to(value_new.dtype), value_new], dim=2)
    return torch.nn.functional.scaled_dot_product_attention(q, rotate(k, cos, signed_sin), v, attn_mask=bias,
                                                            scale=scale)


@torch.library.custom_op("llmc::cq_attention", mutates_args=())
def cq_attention(q: Tensor, key_codes: Tensor, key_new: Tensor, key_codebooks: Tensor, value_codes: Tensor,
                 value_new: Tensor, value_codebooks: Tensor, cos: Tensor, signed_sin: Tensor, bias: Tensor,
                 scale: float) -> Tensor:
    """Attention of q over a cache whose past is CQ codes and whose newest tokens are float (`attention`)."""
    return attention(q, key_codes, key_new, key_codebooks, value_codes, value_new, value_codebooks, cos,
                     signed_sin, bias, scale)


@cq_attention.register_fake
def _(q, key_codes, key_new, key_codebooks, value_codes, value_new, value_codebooks, cos, signed_sin, bias, scale):
    return torch.empty_like(q)


def cached_attention(q: Tensor, key: Tensor, value: Tensor, past_key_codes: Tensor, past_value_codes: Tensor,
                     key_codebooks: Tensor, value_codebooks: Tensor, cos: Tensor, signed_sin: Tensor, bias: Tensor,
                     scale: float, q_cos: Tensor | None = None,
                     q_signed_sin: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of `llmc::cq_cached_attention`: `attention` over the past's codes and this step's keys and values,
    which it also encodes into the cache, as one op, with the heads in the hidden dimension on both sides.

    q [B, Hq, S, D] (the step's query heads, rotated unless q_cos is given; each KV head's Hq / H query heads are
    folded into rows as `attention` takes them), key (before RoPE) and value [B, S, H * D], past codes [B, H, C, G]
    whose first P = T - S positions are the past (T = bias.shape[-1]: the past's length comes from the mask, so the
    codes may be a buffer with room to spare), cos / signed_sin [B|1, 1, T, Drot], bias [B|1, 1, R, T]
    (R = Hq / H * S rows, as `attention`). With q_cos / q_signed_sin [B|1, 1, S, Drot] (the tables of the step's
    positions), q is before RoPE and rotated here. Returns out [B, S, Hq * D] and the present codes [B, H, max(C, T), G]: the
    past's, with the step's at [P, T)."""
    if (q_cos is None) != (q_signed_sin is None):
        raise ValueError("cq_cached_attention: q_cos and q_signed_sin go together")
    if q_cos is not None:
        q = rotate(q, q_cos, q_signed_sin)
    B, Hq, S, D = q.shape
    H, T = past_key_codes.shape[1], bias.shape[-1]
    P, G = T - S, Hq // H
    key_new = key.reshape(B, S, H, D).transpose(1, 2)
    value_new = value.reshape(B, S, H, D).transpose(1, 2)
    present_key = torch.cat([past_key_codes[:, :, :P], encode(key_new, key_codebooks), past_key_codes[:, :, T:]], 2)
    present_value = torch.cat([past_value_codes[:, :, :P], encode(value_new, value_codebooks),
                               past_value_codes[:, :, T:]], 2)
    out = attention(q.reshape(B, H, G * S, D), past_key_codes[:, :, :P], key_new, key_codebooks,
                    past_value_codes[:, :, :P], value_new, value_codebooks, cos[:, :, :T], signed_sin[:, :, :T], bias,
                    scale)
    return out.unflatten(2, (G, S)).permute(0, 3, 1, 2, 4).reshape(B, S, Hq * D), present_key, present_value


@torch.library.custom_op("llmc::cq_cached_attention", mutates_args=())
def cq_cached_attention(q: Tensor, key: Tensor, value: Tensor, past_key_codes: Tensor, past_value_codes: Tensor,
                        key_codebooks: Tensor, value_codebooks: Tensor, cos: Tensor, signed_sin: Tensor, bias: Tensor,
                        scale: float, q_cos: Tensor | None = None, q_signed_sin: Tensor | None = None,
                        rope_halves: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Attention over a CQ cache that also writes the step's codes into it (`cached_attention`). rope_halves says
    that every row of cos is two equal halves and every row of signed_sin a negated half and that half (RoPE's
    tables), so that a kernel may read half of each row; the result is the same."""
    return cached_attention(q, key, value, past_key_codes, past_value_codes, key_codebooks, value_codebooks, cos,
                            signed_sin, bias, scale, q_cos, q_signed_sin)


@cq_cached_attention.register_fake
def _(q, key, value, past_key_codes, past_value_codes, key_codebooks, value_codebooks, cos, signed_sin, bias, scale,
      q_cos=None, q_signed_sin=None, rope_halves=False):
    B, Hq, S, D = q.shape
    H, C = past_key_codes.shape[1:3]
    length = torch.sym_max(C, bias.shape[-1])
    return (q.new_empty(B, S, Hq * D), past_key_codes.new_empty(B, H, length, past_key_codes.shape[3]),
            past_value_codes.new_empty(B, H, length, past_value_codes.shape[3]))
