"""Structured linear maps for `structured_ffn`: shapes from a budget, forward ops, initialisation.

Three parameterisations of y = W x with W [M, N] (Wei et al., NeurIPS 2024, §4.1 of the spec):

- LowRank:      y = U (V x).                      V [r, N], U [M, r];          params r (M + N)
- BlockDense:   y = U blockdiag(V_1..V_b) x.      V [b, N/b, r/b], U [M, r];  params r N/b + M r
- BlockShuffle: y = blockdiag(W2) P blockdiag(W1) x, with P the stride permutation that sends
  element c·b + i of the first stage's output (block i, position c) to position i·(h/b) + c
  (a [b, h/b] -> [h/b, b] transpose). W1 [b, N/b, h/b], W2 [b, h/b, M/b] with h = min(M, N);
  params h (M + N) / b.

Block factors are stored in-major ([blocks, in, out]) because they are applied with `matmul`;
LowRank's U, V and BlockDense's U are `aten.linear` weights ([out, in]). The reference repository
also permutes BlockShuffle's output; a fixed output permutation only reorders the rows the
factorisation has to fit, so it is left out here (one copy fewer per token).

Initialisation minimises ‖X (W − Ŵ)ᵀ‖_F, the error of the layer's outputs on calibration inputs
X, through H = XᵀX (H = I gives the plain truncated SVD). With H = L Lᵀ, the optimal rank-r Ŵ is
the truncated SVD of W L mapped back by L⁻¹. BlockDense and BlockShuffle factor each sub-block
with the whitening of its own input block, then refit the output factor by least squares under
the full H (the coupling between input blocks that the per-block SVD ignores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from llmc.errors import ConfigError

aten = torch.ops.aten
KINDS = ("lowrank", "blockdense", "blockshuffle")


@dataclass(frozen=True)
class Shape:
    """The structure chosen for one [M, N] weight: `rank` (the inner width) and `blocks`."""

    kind: str
    out_features: int
    in_features: int
    rank: int
    blocks: int = 1

    @property
    def params(self) -> int:
        M, N, r, b = self.out_features, self.in_features, self.rank, self.blocks
        if self.kind == "lowrank":
            return r * (M + N)
        if self.kind == "blockdense":
            return r * N // b + M * r
        return r * (M + N) // b

    @property
    def fraction(self) -> float:
        return self.params / (self.out_features * self.in_features)

    def factor_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the (input-side, output-side) factors as stored."""
        M, N, r, b = self.out_features, self.in_features, self.rank, self.blocks
        if self.kind == "lowrank":
            return (r, N), (M, r)
        if self.kind == "blockdense":
            return (b, N // b, r // b), (M, r)
        return (b, N // b, r // b), (b, r // b, M // b)

    def to_json(self) -> dict:
        return {"kind": self.kind, "shape": [self.out_features, self.in_features], "rank": self.rank,
                "blocks": self.blocks, "params": self.params, "fraction": round(self.fraction, 4)}


def plan(kind: str, out_features: int, in_features: int, budget: float, blocks: int = 2) -> Shape:
    """The largest structure of `kind` with at most `budget` × M·N parameters (§4.2 of the spec).

    LowRank: r = ⌊budget·MN / (M+N)⌋. BlockDense with `blocks` = b: r = ⌊budget·MN / (N/b + M)⌋
    rounded down to a multiple of b, at most N. BlockShuffle: the smallest b whose h(M+N)/b fits
    the budget and divides the shapes (N, M divisible by b; h divisible by b²).
    Raises ConfigError when no such structure exists.
    """
    M, N = out_features, in_features
    where = f"structured_ffn: a [{M}, {N}] weight"
    if kind == "lowrank":
        r = min(int(budget * M * N / (M + N) + 1e-9), min(M, N))
        if r < 1:
            raise ConfigError(f"{where} gets rank 0 at budget {budget}; raise the budget")
        return Shape(kind, M, N, r)
    if kind == "blockdense":
        b = blocks
        if b < 1 or N % b:
            raise ConfigError(f"{where} cannot be split into {b} input blocks ({N} % {b} != 0); choose blocks "
                              f"dividing {N}")
        r = int(budget * M * N / (N / b + M) + 1e-9)
        r = min(r - r % b, N - N % b)
        if r < b:
            raise ConfigError(f"{where} gets no rank at budget {budget} with {b} blocks; raise the budget or use "
                              "fewer blocks")
        return Shape(kind, M, N, r, b)
    if kind == "blockshuffle":
        h = min(M, N)
        for b in range(2, h + 1):
            if M % b or N % b or h % (b * b):
                continue
            s = Shape(kind, M, N, h, b)
            if s.params <= budget * M * N + 1e-9:
                return s
        raise ConfigError(f"{where} has no block-shuffle structure within budget {budget} (needs b dividing "
                          f"{M} and {N} with b² dividing {h}); raise the budget or use another kind")
    raise ConfigError(f"structured_ffn.kind must be one of {', '.join(KINDS)}, got '{kind}'")


def _eager(target, *args):
    return target(*args)


def structured_linear(kind: str, x, first, second, call=_eager, block_dims: tuple | None = None):
    """The structured map applied to x [..., N], as a sequence of aten ops.

    `call(op, *args)` runs each op: eagerly by default, or (with `graph.call_function`) emits the
    same sequence into an FX graph, so the graph and the eager math cannot drift apart. In a graph
    the factors are nodes, so `block_dims` gives the first factor's shape (b, N/b, r/b).
    """
    if kind == "lowrank":
        return call(aten.linear.default, call(aten.linear.default, x, first), second)
    b, q, rb = block_dims or first.shape
    # x [..., N] -> [..., b, S, q]: the b input blocks become a batch dim of one batched matmul
    h = call(aten.transpose.int, call(aten.unflatten.int, x, -1, [b, q]), -3, -2)
    h = call(aten.matmul.default, h, first)                     # [..., b, S, r/b]
    if kind == "blockdense":
        h = call(aten.flatten.using_ints, call(aten.transpose.int, h, -3, -2), -2, -1)   # [..., S, r]
        return call(aten.linear.default, h, second)
    # stride permutation: per token [b, r/b] -> [r/b, b] -> flat -> [b, r/b]
    h = call(aten.flatten.using_ints, call(aten.transpose.int, call(aten.transpose.int, h, -3, -2), -1, -2), -2, -1)
    h = call(aten.transpose.int, call(aten.unflatten.int, h, -1, [b, rb]), -3, -2)   # [..., b, S, r/b]
    y = call(aten.matmul.default, h, second)                    # [..., b, S, M/b]
    return call(aten.flatten.using_ints, call(aten.transpose.int, y, -3, -2), -2, -1)  # [..., S, M]


def merged_weight(kind: str, first: Tensor, second: Tensor) -> Tensor:
    """The dense [M, N] matrix of a structured map (its value on the identity, transposed)."""
    if kind == "lowrank":
        return second @ first
    n = first.shape[0] * first.shape[1]
    eye = torch.eye(n, dtype=first.dtype)
    return structured_linear(kind, eye[None], first, second)[0].t().contiguous()


# -- initialisation ----------------------------------------------------------------------------

def _damped(h: Tensor, damp: float) -> Tensor:
    """H + damp·mean(diag H)·I (batched over leading dims), so its Cholesky factor exists."""
    diag = h.diagonal(dim1=-2, dim2=-1)
    lam = damp * diag.mean(-1).clamp_min(1e-12)
    return h + lam[..., None, None] * torch.eye(h.shape[-1], dtype=h.dtype)


def _top_factors(a: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Batched best rank-`rank` factors (P√S [.., M, r], √S Qᵀ [.., r, N]) of a [.., M, N].

    Through the eigendecomposition of the smaller Gram matrix (aᵀa or aaᵀ, float64): LAPACK's
    float64 SVD of a 3072 × 576 matrix takes seconds on two cores, this takes a fraction of one.
    Directions with a zero singular value get zero factors.
    """
    tall = a.shape[-2] >= a.shape[-1]
    g = a.transpose(-1, -2) @ a if tall else a @ a.transpose(-1, -2)
    evals, evecs = torch.linalg.eigh(g)                               # ascending
    evals = evals.flip(-1)[..., :rank].clamp_min(0)
    vecs = evecs.flip(-1)[..., :rank]                                 # Q (tall) or P (wide)
    root = evals.sqrt().sqrt()                                        # √s, with s = √eval
    inv = torch.where(evals > evals[..., :1] * 1e-24, 1 / root, torch.zeros_like(root))
    if tall:  # P√S = a Q / √s
        return (a @ vecs) * inv[..., None, :], root[..., :, None] * vecs.transpose(-1, -2)
    return vecs * root[..., None, :], inv[..., :, None] * (vecs.transpose(-1, -2) @ a)


def _whitened_svd(w: Tensor, h: Tensor | None, rank: int, damp: float) -> tuple[Tensor, Tensor]:
    """Batched rank-`rank` factors (A [.., M, r], B [.., r, N]) minimising ‖(W − A B) L‖, H = L Lᵀ.

    With H = None, L = I: the truncated SVD. The singular values are split evenly between the
    two factors (√S on each), which keeps their scales balanced for training.
    """
    if h is None:
        return _top_factors(w, rank)
    chol = torch.linalg.cholesky(_damped(h, damp))               # L [.., N, N], lower
    a, bl = _top_factors(w @ chol, rank)                         # W L ≈ a (B L)
    # B = (B L) L⁻¹  <=>  Bᵀ = L⁻ᵀ (B L)ᵀ
    bt = torch.linalg.solve_triangular(chol.transpose(-1, -2), bl.transpose(-1, -2), upper=True)
    return a, bt.transpose(-1, -2)


def _block_diag_h(h: Tensor, b: int) -> Tensor:
    """The b diagonal blocks [b, N/b, N/b] of H [N, N]."""
    q = h.shape[0] // b
    idx = torch.arange(b)
    return h.view(b, q, b, q)[idx, :, idx, :]


def _refit_output(w: Tensor, h: Tensor, feats: Tensor, damp: float) -> Tensor:
    """Least-squares output factor: argmin_U ‖X (Wᵀ − Z Uᵀ)‖ with Z = feats [.., N, k] (batched).

    w: [.., M', N] the rows this output factor produces. Returns Uᵀ [.., k, M'].
    """
    zh = feats.transpose(-1, -2) @ h                              # [.., k, N]
    gram = _damped(zh @ feats, damp)                              # [.., k, k]
    rhs = zh @ w.transpose(-1, -2)                                # [.., k, M']
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(gram))


def factorize(shape: Shape, weight: Tensor, h: Tensor | None = None, damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """Factors (input-side, output-side) of `weight` [M, N] in `shape`'s layout.

    h: XᵀX [N, N] of the layer's calibration inputs (activation-aware), or None (plain SVD).
    Computed in float64 and returned in the weight's dtype.
    """
    dtype = weight.dtype
    w = weight.detach().double()
    h = None if h is None else h.double()
    M, N, r, b = shape.out_features, shape.in_features, shape.rank, shape.blocks
    if shape.kind == "lowrank":
        u, v = _whitened_svd(w, h, r, damp)
        return v.to(dtype).contiguous(), u.to(dtype).contiguous()
    q, rb = N // b, r // b
    hb = None if h is None else _block_diag_h(h, b)
    if shape.kind == "blockdense":
        # W = [U_1 V_1, ..., U_b V_b]: column block i is fitted at rank r/b
        a, bb = _whitened_svd(w.view(M, b, q).transpose(0, 1), hb, rb, damp)   # a [b, M, rb], bb [b, rb, q]
        first = bb.transpose(1, 2).contiguous()                                  # [b, q, rb]
        second = a.transpose(0, 1).reshape(M, r)                                  # U [M, r]
        if h is not None:
            feats = structured_linear("blockdense", torch.eye(N, dtype=w.dtype)[None], first,
                                      torch.eye(r, dtype=w.dtype))[0]             # Z [N, r]
            second = _refit_output(w, h, feats, damp).t()
        return first.to(dtype).contiguous(), second.to(dtype).contiguous()
    # BlockShuffle: output group j (rows j·m..) reads input block i through t = h/b² shared
    # channels, so sub-block (j, i) [m, q] is an independent rank-t problem.
    m, t = M // b, r // (b * b)
    blocks = w.view(b, m, b, q).permute(0, 2, 1, 3)                             # [j, i, m, q]
    hh = None if hb is None else hb[None].expand(b, b, q, q)
    a, bb = _whitened_svd(blocks, hh, t, damp)                                    # a [j,i,m,t], bb [j,i,t,q]
    # channel c·b + i of group j carries pair (j, i)'s c-th component (see the module docstring)
    second = a.permute(0, 3, 1, 2).reshape(b, t * b, m)                           # W2 [j, (c, i), m]
    first = bb.permute(1, 3, 0, 2).reshape(b, q, b * t)                           # W1 [i, q, (j, c)]
    if h is not None:
        # Z_j [N, r/b]: how each channel of group j depends on x, from the first stage alone
        eye = torch.eye(N, dtype=w.dtype)[None]
        h1 = structured_linear("blockdense", eye, first, torch.eye(r, dtype=w.dtype))[0]   # [N, r]
        z = h1.view(N, b, rb).transpose(1, 2).reshape(N, b, rb).permute(1, 0, 2)           # [j, N, rb]
        second = _refit_output(w.view(b, m, N), h[None].expand(b, N, N), z, damp)          # [j, rb, m]
    return first.to(dtype).contiguous(), second.to(dtype).contiguous()


def cosine_alpha(step: int, guided_steps: int) -> float:
    """Weight of the dense guide after `step` optimizer steps: ½(1 + cos(π·step/T_g)), 0 after T_g (§4.4)."""
    if guided_steps <= 0 or step >= guided_steps:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * step / guided_steps))
