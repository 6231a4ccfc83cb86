"""Scalar weight-quantization algorithms shared by the passes that emit `llmc::nbits_linear`.

GPTQ (Frantar et al., ICLR 2023): a linear's input columns are quantized one at a time and each
column's rounding error is spread over the columns not yet quantized, weighted by the inverse
Hessian of the layer's output error, H = XᵀX over calibration inputs. With `act_order` the inputs
with the largest XᵀX diagonal go first, with every group's scale and zero point fixed beforehand
on the original contiguous groups ("static groups"), so the stored layout is that of round-to-
nearest and the same MatMulNBits kernel reads it. `gptq_quant` emits these codes directly;
`pv_quant` starts PV-Tuning from them.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from llmc.errors import ConfigError
from llmc.ops.nbits_linear import SUPPORTED_BITS, pack_blocks

logger = logging.getLogger(__name__)


class HessianNotPositiveDefinite(ValueError):
    """The damped XᵀX has no Cholesky factorization (raise `damp`)."""


def group_params(w: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point (float32, [...]) of each row of w [..., group]: the rule of `quantize_rtn`.

    Asymmetric: scale = (max − min) / (2**bits − 1) over the range widened to contain 0,
    zero = round(−min / scale). Symmetric: scale = absmax / 2**(bits−1), zero = 2**(bits−1).
    """
    qmax = (1 << bits) - 1
    if symmetric:
        half = 1 << (bits - 1)
        scale = w.abs().amax(-1) / half
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale, torch.full_like(scale, half)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, torch.round(-lo / scale).clamp(0, qmax)


def searched_group_params(w: Tensor, bits: int, symmetric: bool, importance: Tensor, grid: int,
                          min_ratio: float = 0.5) -> tuple[Tensor, Tensor]:
    """`group_params` of w [..., group] over a range shrunk by the ratio, of `grid` evenly spaced in
    [min_ratio, 1], whose rounding minimises Σ importance·(w − ŵ)² per group (importance
    broadcastable to w: the XᵀX diagonal, so the inputs that carry the most signal count most).
    Clipping a few large weights buys a finer step for all the others; at 3 bits that often pays."""
    qmax = (1 << bits) - 1
    best_s, best_z, best = None, None, None
    for r in torch.linspace(1.0, min_ratio, max(grid, 1)).tolist():
        s, z = group_params(w * r, bits, symmetric)
        q = torch.clamp(torch.round(w / s[..., None]) + z[..., None], 0, qmax)
        err = (((q - z[..., None]) * s[..., None] - w).square() * importance).sum(-1)
        if best is None:
            best_s, best_z, best = s, z, err
            continue
        better = err < best
        best_s, best_z, best = best_s.where(~better, s), best_z.where(~better, z), best.where(~better, err)
    return best_s, best_z


def _pack(q: Tensor, scales: Tensor, zeros: Tensor, bits: int, group: int):
    """MatMulNBits-layout tensors from integer-valued codes q [N, Kp] and per-group scales/zeros [N, G]."""
    N, G = scales.shape
    codes, zero_points = pack_blocks(q.reshape(N, G, group), zeros, bits)
    return codes, scales.float().contiguous(), zero_points


def _padded(weight: Tensor, H: Tensor, Kp: int, damp: float) -> tuple[Tensor, Tensor]:
    """W [N, Kp] float32 and H [Kp, Kp] float64 padded to whole groups, dampened by `damp` × the mean
    diagonal. Dead inputs (zero diagonal, and the padding) get H = 1 and weight 0, which quantizes to
    exactly 0 (as RTN pads)."""
    N, K = weight.shape
    W = torch.zeros(N, Kp, dtype=torch.float32)
    W[:, :K] = weight.detach().float()
    Hd = torch.zeros(Kp, Kp, dtype=torch.float64)
    Hd[:K, :K] = H.detach().double()
    diag = Hd.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    W[:, dead] = 0.0
    diag[:K] += damp * diag[:K].mean()
    return W, Hd


def _inverse_cholesky(Hd: Tensor, damp: float) -> Tensor:
    """U, the upper Cholesky factor of H⁻¹ (float32); HessianNotPositiveDefinite when H is too ill-conditioned."""
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info):
        raise HessianNotPositiveDefinite(f"XᵀX + {damp}·mean(diag)·I is not positive definite; raise damp")
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info):
        raise HessianNotPositiveDefinite(f"the inverse of XᵀX + {damp}·mean(diag)·I is not positive definite; "
                                         "raise damp")
    return U.float()


def error_feedback(W: Tensor, U: Tensor, col_of: list[int], block: int, round_column) -> None:
    """GPTQ's column loop, for any rounding: `round_column(block_w, i, col)` returns the value chosen for
    column i of the current block (a view [N, block] of the updated W; `col` is its column in the
    original order) and may record codes. Column i's scaled error e = (w_i − q_i) / U[i, i] is
    subtracted from the later columns as e ⊗ U[i, i+1:] within the block and as one matrix product
    for the columns after it. W [N, K] (in visiting order) is updated in place; U is the upper
    Cholesky factor of H⁻¹ in the same order.
    """
    N, K = W.shape
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2]  # a view: the in-block updates land in W
        U1 = U[i1:i2, i1:i2]
        E1 = torch.empty(N, i2 - i1, dtype=W.dtype)
        for i in range(i2 - i1):
            q = round_column(W1, i, col_of[i1 + i])
            err = (W1[:, i] - q) / U1[i, i]
            W1[:, i + 1:].addr_(err, U1[i, i + 1:], alpha=-1)
            E1[:, i] = err
        if i2 < K:
            W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1)


def gptq_round(weight: Tensor, H: Tensor, round_column, damp: float = 0.01, block: int = 128,
               act_order: bool = True) -> None:
    """GPTQ's error feedback around a caller's rounding: weight [N, K] against H = XᵀX [K, K] (dampened
    and with dead inputs handled as `gptq_quantize` does), columns visited in order of decreasing H
    diagonal (`act_order`) or left to right; `round_column(w, col)` gets the updated column `col` [N]
    and returns the value it rounds it to (recording its codes itself). Raises
    HessianNotPositiveDefinite when H is too ill-conditioned.
    """
    N, K = weight.shape
    W, Hd = _padded(weight, H, K, damp)
    if act_order:
        perm = torch.argsort(Hd.diagonal(), descending=True, stable=True)
        W, Hd = W[:, perm].contiguous(), Hd[perm][:, perm]
        col_of = perm.tolist()
    else:
        col_of = list(range(K))
    error_feedback(W, _inverse_cholesky(Hd, damp), col_of, block, lambda bw, i, col: round_column(bw[:, i], col))


def gptq_quantize(weight: Tensor, H: Tensor, bits: int, group: int, symmetric: bool = False, damp: float = 0.01,
                  block: int = 128, act_order: bool = False, clip_grid: int = 0):
    """GPTQ of weight [N, K] against H = XᵀX [K, K] into the MatMulNBits layout of `quantize_rtn`.

    Returns codes (uint8 [N, K/group, group*bits/8]), scales (float32 [N, K/group]) and zero_points
    (uint8 [N, ceil((K/group)*bits/8)]), readable with `llmc.ops.nbits_linear.dequantize`.

    H is dampened by `damp` × its mean diagonal; inputs that never fire (zero diagonal) get H = 1 and
    weight 0. With U the upper Cholesky factor of H⁻¹, columns are quantized left to right; column
    j's scaled error e = (w_j − q_j) / U[j, j] is subtracted from the later columns as e ⊗ U[j, j+1:],
    immediately within a block of `block` columns and as one matrix product for the columns after
    it. Without act_order a group's scale and zero point are chosen (min/max, as RTN) from the
    updated weights when its first column is reached; `block` is rounded up to a multiple of
    `group` so a group never straddles two blocks. With act_order columns are visited in order of
    decreasing H diagonal, and the groups' scales/zeros are fixed beforehand on the original
    contiguous groups ("static groups"), so the stored layout is the same. With H a multiple of the
    identity no error is propagated and the result equals `quantize_rtn` bit for bit.

    `clip_grid` > 1 chooses each group's scale and zero point by `searched_group_params` (a range
    shrunk by one of `clip_grid` ratios down to 0.5, weighted by the XᵀX diagonal) instead of min/max.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group < 1 or group * bits % 8:
        raise ValueError(f"group must be >= 1 and fill whole bytes at {bits} bits, got {group}")
    if block < 1 or damp < 0:
        raise ValueError(f"block must be >= 1 and damp >= 0, got block={block}, damp={damp}")
    N, K = weight.shape
    if tuple(H.shape) != (K, K):
        raise ValueError(f"H must be [{K}, {K}] for a weight [{N}, {K}], got {list(H.shape)}")
    qmax = (1 << bits) - 1
    G = -(-K // group)
    Kp = G * group
    W, Hd = _padded(weight, H, Kp, damp)
    diag = Hd.diagonal()

    scales = torch.empty(N, G, dtype=torch.float32)
    zeros = torch.empty(N, G, dtype=torch.float32)

    def params(w: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
        if clip_grid > 1:
            return searched_group_params(w, bits, symmetric, diag[cols].float(), clip_grid)
        return group_params(w, bits, symmetric)

    if act_order:  # static groups, before any update
        s, z = params(W.reshape(N, G, group), torch.arange(Kp).reshape(G, group))
        scales.copy_(s)
        zeros.copy_(z)
        perm = torch.argsort(diag, descending=True, stable=True)
        W = W[:, perm]
        Hd = Hd[perm][:, perm]
        col_of = perm.tolist()
    else:
        col_of = list(range(Kp))
        block = -(-block // group) * group

    def round_column(block_w: Tensor, i: int, col: int) -> Tensor:
        g = col // group
        if not act_order and col % group == 0:
            s, z = params(block_w[:, i:i + group], torch.arange(col, col + group))
            scales[:, g] = s
            zeros[:, g] = z
        s, z = scales[:, g], zeros[:, g]
        q = torch.clamp(torch.round(block_w[:, i] / s) + z, 0, qmax)
        Q[:, col] = q
        return (q - z) * s

    Q = torch.empty(N, Kp, dtype=torch.float32)
    error_feedback(W, _inverse_cholesky(Hd, damp), col_of, block, round_column)
    return _pack(Q, scales, zeros, bits, group)


def gptq_quantize_damped(weight: Tensor, H: Tensor, bits: int, group: int, symmetric: bool = False,
                         damp: float = 0.01, act_order: bool = True, clip_grid: int = 0, what: str = "a linear"):
    """`gptq_quantize`, raising damp tenfold (up to 3 times) where XᵀX is too ill-conditioned.

    Returns (codes, scales, zero_points, damp used).
    """
    for attempt in range(4):
        try:
            return (*gptq_quantize(weight, H, bits, group, symmetric, damp, act_order=act_order,
                                   clip_grid=clip_grid), damp)
        except HessianNotPositiveDefinite:
            if attempt == 3:
                raise ConfigError(f"GPTQ: XᵀX of {what} is not positive definite even with damp={damp}; "
                                  "use more calibration data or a larger damp") from None
            damp *= 10
            logger.warning("GPTQ: %s: XᵀX not positive definite, retrying with damp=%g", what, damp)
