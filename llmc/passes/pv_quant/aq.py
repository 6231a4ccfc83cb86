"""Additive quantization of one weight matrix (AQLM, Egiazarian et al., ICML 2024).

A weight W [N, K] is cut into input groups of g; each group of row n is `s_n · Σ_m C_m[b_njm]`,
M codebooks of 2^B codewords (`llmc.ops.vq` holds the layout). The objective is the layer's output
error on calibration inputs, through the input second moment A = XᵀX / T (the "half Hessian"):

    L(Ŵ) = tr((W − Ŵ) A (W − Ŵ)ᵀ)

`quantize_matrix` initialises with residual k-means on the row-normalised weight (s_n = ‖W_n‖),
then alternates Adam on codebooks and scales (codes fixed) with a greedy coordinate search over
codes (codebooks fixed) until the relative improvement of an epoch falls under `tol`.

The code search is beam search of width 1 over (input group, codebook) coordinates in a seeded
random order: every row tries all 2^B codewords of one coordinate at once and keeps the best. With
P = (W − Ŵ) A kept up to date, swapping u = C_m[b] for c = C_m[k] in row n changes L by
    −2 s_n (c − u)·P[n, J] + s_n² (c − u) A_JJ (c − u)ᵀ,
so one coordinate costs two [N, g]x[g, 2^B] products and a rank-g update of P: a pass over all
coordinates is about 2·M·N·K² flops, well under a second for SmolLM2's layers on one core.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmc.calibration import output_error
from llmc.ops.cq import nearest, weighted_kmeans
from llmc.ops.vq import dequantize


@dataclass(frozen=True)
class AQConfig:
    """How one matrix is quantized: M codebooks of 2^bits codewords over input groups of `group`."""

    codebooks: int = 2
    bits: int = 8
    group: int = 8
    kmeans_iters: int = 30
    adam_steps: int = 20
    lr: float = 3e-4
    max_epochs: int = 6
    tol: float = 0.01
    seed: int = 0


def init_kmeans(W: Tensor, A: Tensor, cfg: AQConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Row-norm scales and residual k-means codebooks over the normalised rows' groups.

    Each group is weighted by s_n² · mean(diag A over its inputs), its share of the output error
    to first order, so codewords go where errors cost most. Returns codes [N, J, M] int64,
    codebooks [M, 2^B, 1, g], scales [N, 1, 1, 1].
    """
    N, K = W.shape
    g, M, Kc = cfg.group, cfg.codebooks, 1 << cfg.bits
    J = K // g
    scales = W.norm(dim=1) + 1e-9
    residual = (W / scales[:, None]).reshape(N * J, g).clone()
    importance = (scales[:, None] ** 2 * A.diagonal().reshape(J, g).mean(-1)[None, :]).reshape(N * J)
    codes = torch.empty(N * J, M, dtype=torch.long)
    books = torch.empty(M, Kc, 1, g)
    for m in range(M):
        cent, _ = weighted_kmeans(residual[None], Kc, importance[None], iters=cfg.kmeans_iters,
                                  seed=cfg.seed + 7919 * m)
        idx, _ = nearest(residual[None], cent)
        codes[:, m] = idx[0]
        books[m, :, 0] = cent[0]
        residual -= cent[0][idx[0]]
    return codes.reshape(N, J, M), books, scales.reshape(N, 1, 1, 1)


def fit_codebooks(W: Tensor, A: Tensor, codes: Tensor, books: Tensor, scales: Tensor, steps: int,
                  lr: float) -> tuple[Tensor, Tensor]:
    """Adam on codebooks and scales (codes fixed) against the output error (AQLM: β = (0, 0.95), AMSGrad)."""
    books = books.clone().requires_grad_(True)
    scales = scales.clone().requires_grad_(True)
    opt = torch.optim.Adam([books, scales], lr=lr, betas=(0.0, 0.95), amsgrad=True)
    norm = 1.0 / W.shape[0]
    with torch.enable_grad():
        for _ in range(steps):
            loss = output_error(W, dequantize(codes, books, scales), A) * norm
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return books.detach(), scales.detach()


def search_codes(W: Tensor, A: Tensor, codes: Tensor, books: Tensor, scales: Tensor,
                 gen: torch.Generator) -> Tensor:
    """One greedy pass over every (group, codebook) coordinate; never increases the output error."""
    N, J, M = codes.shape
    g = books.shape[-1]
    codes = codes.clone()
    s = scales.reshape(N, 1)
    P = (W - dequantize(codes, books, scales)) @ A  # [N, K]
    C_all = books[:, :, 0, :]  # [M, 2^B, g]
    for j in torch.randperm(J, generator=gen).tolist():
        cols = slice(j * g, (j + 1) * g)
        A_jj = A[cols, cols]
        for m in torch.randperm(M, generator=gen).tolist():
            C = C_all[m]
            b = codes[:, j, m]
            u = C[b]  # [N, g]
            q = ((C @ A_jj) * C).sum(-1)  # [2^B]: c A_JJ cᵀ
            score = -2 * s * (P[:, cols] @ C.T) + s * s * (q[None, :] - 2 * (u @ A_jj) @ C.T)
            k = score.argmin(-1)
            changed = k != b
            if not bool(changed.any()):
                continue
            delta = s * (C[k] - u)  # [N, g]: the change of Ŵ[:, cols]
            P -= delta @ A[cols, :]
            codes[:, j, m] = k
    return codes


def quantize_matrix(W: Tensor, A: Tensor, cfg: AQConfig) -> tuple[Tensor, Tensor, Tensor, dict]:
    """AQLM calibration of one matrix W [N, K] against input moments A [K, K] (both float32).

    Returns codes [N, K/g, M] int64, codebooks [M, 2^B, 1, g], scales [N, 1, 1, 1] and stats with
    the relative output error ‖(W − Ŵ)X‖² / ‖WX‖² after initialisation and after each epoch.
    """
    W, A = W.float(), A.float()
    N, K = W.shape
    if K % cfg.group:
        raise ValueError(f"input size {K} is not a multiple of the group size {cfg.group}")
    gen = torch.Generator().manual_seed(cfg.seed)
    reference = float(output_error(W, torch.zeros_like(W), A))
    codes, books, scales = init_kmeans(W, A, cfg)

    def rel(c, b, s):
        return float(output_error(W, dequantize(c, b, s), A)) / max(reference, 1e-30)

    history = [rel(codes, books, scales)]
    for _ in range(cfg.max_epochs):
        books, scales = fit_codebooks(W, A, codes, books, scales, cfg.adam_steps, cfg.lr)
        codes = search_codes(W, A, codes, books, scales, gen)
        history.append(rel(codes, books, scales))
        if history[-1] > history[-2] * (1 - cfg.tol):
            break
    return codes, books, scales, {"relative_error": [round(h, 6) for h in history]}


def rtn_relative_error(W: Tensor, A: Tensor, bits: int, group: int) -> float:
    """The same relative output error for round-to-nearest asymmetric groupwise quantization (a baseline)."""
    N, K = W.shape
    w = W.float().reshape(N, K // group, group)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    step = ((hi - lo) / ((1 << bits) - 1)).clamp_min(1e-12)
    w_hat = (torch.round((w - lo) / step) * step + lo).reshape(N, K)
    W, A = W.float(), A.float()
    return float(output_error(W, w_hat, A)) / float(output_error(W, torch.zeros_like(W), A))


def bits_per_weight(N: int, K: int, cfg: AQConfig) -> float:
    from llmc.ops.vq import bits_per_weight as bpw

    return bpw(N, K, cfg.codebooks, cfg.bits, cfg.group)

