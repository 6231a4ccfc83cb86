"""The per-matrix math of QBB: cascaded initialisation (stage 1), scale refits, and the layer-wise
gradient refinement with a progressive curriculum (stage 2).

A matrix W [N, K] is approximated by Ŵ = Σ_i α_i ⊙ B_i, B_i ∈ {−1, +1}^[N, K] (kept here as ±1
float32 tensors [nb, N, K]) and α [nb, N, G]: one scale per output row and basis, or per group of
K/G inputs. The error of an approximation is relative: ‖W − Ŵ‖² / ‖W‖² in weight space, or
tr(E H Eᵀ) / tr(W H Wᵀ) with E = W − Ŵ and H = XᵀX the layer's input second moment (`objective=input`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmc.quantization import HessianNotPositiveDefinite, gptq_round


def expand(scales: Tensor, K: int) -> Tensor:
    """[nb, N, G] -> [nb, N, K]: each group's scale over its K/G inputs."""
    return scales.repeat_interleave(K // scales.shape[-1], dim=-1)


def approx(B: Tensor, scales: Tensor) -> Tensor:
    """Σ_i α_i ⊙ B_i: [N, K] from B [nb, N, K] and scales [nb, N, G]."""
    return (B * expand(scales, B.shape[-1])).sum(0)


def relative_error(W: Tensor, What: Tensor, H: Tensor | None = None) -> float:
    """‖W − Ŵ‖² / ‖W‖² (H None), tr(E H Eᵀ) / tr(W H Wᵀ) (H [K, K]) or with H a diagonal given as [K], in float64."""
    E = (W - What).double()
    if H is None:
        return float((E * E).sum() / (W.double() ** 2).sum().clamp_min(1e-30))
    if H.dim() == 1:
        d = H.double()
        return float((E * E * d).sum() / (W.double() ** 2 * d).sum().clamp_min(1e-30))
    Hd = H.double()
    return float(((E @ Hd) * E).sum() / ((W.double() @ Hd) * W.double()).sum().clamp_min(1e-30))


def row_outliers(W: Tensor, k: int) -> Tensor:
    """Column indices [N, k] (int64, ascending) of the k largest-magnitude weights of each row."""
    return W.abs().topk(k, dim=1).indices.sort(dim=1).values


def _group_mean_abs(R: Tensor, G: int) -> Tensor:
    N, K = R.shape
    return R.abs().reshape(N, G, K // G).mean(-1)


def cascaded_init(W: Tensor, bases: int, groups: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Stage 1: R₁ = W; Bᵢ = sign(Rᵢ) (sign 0 := +1), αᵢ = mean |Rᵢ| over each row (or group), Rᵢ₊₁ = Rᵢ − αᵢ Bᵢ.

    Returns B [nb, N, K] (±1 float32), scales [nb, N, G] and the residuals R [nb, N, K] each basis was fitted
    to (stage 2 starts its latent sign variables from them). Every basis lowers ‖R‖ (αᵢ is the optimal
    scale for the signs of Rᵢ, and it is > 0 unless Rᵢ is 0 on that row).
    """
    W = W.detach().float()
    N, K = W.shape
    B = torch.empty(bases, N, K)
    S = torch.empty(bases, N, groups)
    Rs = torch.empty(bases, N, K)
    R = W.clone()
    for i in range(bases):  # bases are few (1-8); every step is a whole-matrix operation
        Rs[i] = R
        B[i] = torch.where(R >= 0, 1.0, -1.0)
        S[i] = _group_mean_abs(R, groups)
        R = R - B[i] * expand(S[i:i + 1], K)[0]
    return B, S, Rs


def fit_scales(W: Tensor, B: Tensor, groups: int, H: Tensor | None = None) -> Tensor:
    """The least-squares scales [nb, N, G] of signs B for W (weight space, under a diagonal H [K], or under a
    full H [K, K]).

    Per row (and group) the nb×nb normal equations Σ_k bᵢ bⱼ · α = Σ_k bᵢ w, solved in float64 with a
    small ridge (a rank-deficient row, e.g. two equal bases, keeps a finite solution); under a full H
    with several groups, one (nb·G)² system per row (`_fit_grouped_scales`).
    """
    nb, N, K = B.shape
    W = W.detach().double()
    Bd = B.double()
    if H is None or H.dim() == 1:
        Bg = Bd.reshape(nb, N, groups, K // groups)
        Wg = W.reshape(N, groups, K // groups)
        Dg = Bg if H is None else Bg * H.double().reshape(1, 1, groups, K // groups)
        M = torch.einsum("inck,jnck->ncij", Dg, Bg)  # [N, G, nb, nb]
        r = torch.einsum("inck,nck->nci", Dg, Wg)  # [N, G, nb]
    elif groups != 1:
        return _fit_grouped_scales(W, B, groups, H)
    else:
        BH = Bd @ H.double()  # [nb, N, K]
        M = torch.einsum("ink,jnk->nij", BH, Bd)[:, None]
        r = torch.einsum("ink,nk->ni", BH, W)[:, None]
    ridge = 1e-9 * M.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    M = M + ridge[..., None, None] * torch.eye(nb, dtype=M.dtype)
    a = torch.linalg.solve(M, r.unsqueeze(-1)).squeeze(-1)  # [N, G, nb]
    return a.permute(2, 0, 1).float().contiguous()


def _fit_grouped_scales(W: Tensor, B: Tensor, groups: int, H: Tensor, chunk: int = 32) -> Tensor:
    """`fit_scales` under a full H with several groups a row: H couples the groups, so each row solves one
    (nb·G)² system, M[(i, g), (j, h)] = Σ_{a∈g, b∈h} Bᵢ[a] H[a, b] Bⱼ[b], built for `chunk` rows at a time
    (memory chunk·K·nb·G floats; work N·K²·nb multiply-adds, built in float32, so the solution is as
    accurate as float32 sums of K terms; solved in float64)."""
    nb, N, K = B.shape
    Kg = K // groups
    Hb = H.float().reshape(groups, Kg, groups, Kg)
    HW = (W.float() @ H.float()).reshape(N, groups, Kg)
    out = torch.empty(N, nb, groups, dtype=torch.float64)
    for r in range(0, N, chunk):
        Bc = B[:, r:r + chunk].float().reshape(nb, -1, groups, Kg)
        R = Bc.shape[1]
        HB = torch.einsum("gahb,jrhb->rgajh", Hb, Bc)  # [R, G, Kg, nb, G]
        M = torch.einsum("irga,rgajh->rigjh", Bc, HB).reshape(R, nb * groups, nb * groups).double()
        rhs = torch.einsum("irga,rga->rig", Bc, HW[r:r + R]).reshape(R, nb * groups, 1).double()
        ridge = 1e-9 * M.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
        M = M + ridge[:, None, None] * torch.eye(nb * groups, dtype=M.dtype)
        out[r:r + R] = torch.linalg.solve(M, rhs).reshape(R, nb, groups)
    return out.permute(1, 0, 2).float().contiguous()


class _SignSTE(torch.autograd.Function):
    """sign(x) (0 := +1) forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):
        return torch.where(x >= 0, 1.0, -1.0)

    @staticmethod
    def backward(ctx, g):
        return g


@dataclass(frozen=True)
class RefinePlan:
    mode: str = "alternate"  # of `refine`: "gd", the paper's straight-through descent; "alternate", exact sign updates
    rounds: int = 8          # passes over the bases (each pass is one phase per basis)
    steps: int = 50          # gd: Adam steps per phase
    lr: float = 0.01         # gd: Adam, on the latent signs (in units of their basis' scale) and on the scale factors
    refit: bool = True       # least-squares scales after each phase


def refine(W: Tensor, B: Tensor, scales: Tensor, latents: Tensor, plan: RefinePlan,
           H: Tensor | None = None) -> tuple[Tensor, Tensor, list[float]]:
    """Stage 2: layer-wise refinement of ‖W − Σ αᵢBᵢ‖² (or its H-weighted form) with the progressive
    curriculum: phase p changes the signs of basis p only, and all the scales in every phase.

    mode "gd" (the paper's): Bₚ = sign(Lₚ) with straight-through gradients, Adam on Lₚ and on factors of the
    phase's starting scales (one learning rate fits every layer); Lₚ starts from the stage-1 residual Rₚ in
    units of its scale. mode "alternate": in weight space the phase's problem is separable, and its exact
    minimiser is Bₚ = sign(αₚ · (W − Σ_{i≠p} αᵢBᵢ)) (rows/groups with αₚ = 0 keep their signs); under H
    it is not, and this mode is refused there. After a phase the scales are refit by least squares
    (`plan.refit`, always in "alternate") and the phase is kept only if it lowered the error, so the error
    never rises. Returns the new B, scales and the error after stage 1 and after each round of phases.
    """
    if plan.mode not in ("gd", "alternate"):
        raise ValueError(f"refine mode must be gd or alternate, got {plan.mode!r}")
    if plan.mode == "alternate" and H is not None and H.dim() != 1:
        raise ValueError("exact sign updates are for a separable objective (weight space or a diagonal H); use mode "
                         "gd with a full H")
    W = W.detach().float()
    nb, N, K = B.shape
    G = scales.shape[-1]
    Hf = None if H is None else (torch.diag(H.float()) if H.dim() == 1 else H.float())
    norm = float((W * W).sum()) if H is None else float(((W @ Hf) * W).sum())
    norm = max(norm, 1e-30)
    B, scales = B.clone(), scales.clone()
    best = relative_error(W, approx(B, scales), H)
    errors = [best]
    for r in range(plan.rounds):
        for p in range(nb):
            others = torch.cat([B[:p], B[p + 1:]])
            with torch.no_grad():
                newB = B.clone()
            if plan.mode == "alternate":
                rest = approx(others, torch.cat([scales[:p], scales[p + 1:]]))
                a = expand(scales[p:p + 1], K)[0]
                target = (W - rest) * a
                newB[p] = torch.where(target > 0, 1.0, torch.where(target < 0, -1.0, B[p]))
                news = scales
            else:
                newB[p], news = _gd_phase(W, B, others, scales, latents[p] if r == 0 else B[p] * (W - approx(
                    others, torch.cat([scales[:p], scales[p + 1:]]))).abs(), p, plan, Hf, norm)
            with torch.no_grad():
                if plan.mode == "alternate" or (plan.refit and (H is None or H.dim() == 1 or G == 1)):
                    news = fit_scales(W, newB, G, H)
                err = relative_error(W, approx(newB, news), H)
                if err < best:
                    B, scales, best = newB, news, err
        errors.append(best)
    return B, scales, errors


def _gd_phase(W, B, others, scales, latent0, p, plan, Hf, norm):
    """One gd phase: Adam on basis p's latent signs and on factors of every scale; returns (Bₚ, scales)."""
    K = W.shape[1]
    base = scales.clone()
    div = expand(base[p:p + 1], K)[0].abs().clamp_min(1e-12)
    latent = (latent0 / div).clone().requires_grad_(True)
    factor = torch.ones_like(base, requires_grad=True)
    opt = torch.optim.Adam([latent, factor], lr=plan.lr)
    for _ in range(plan.steps):
        opt.zero_grad(set_to_none=True)
        s = base * factor
        Bp = _SignSTE.apply(latent)
        rest = torch.cat([s[:p], s[p + 1:]])
        What = (others * expand(rest, K)).sum(0) + Bp * expand(s[p:p + 1], K)[0]
        E = W - What
        loss = ((E * E).sum() if Hf is None else ((E @ Hf) * E).sum()) / norm
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.where(latent >= 0, 1.0, -1.0), (base * factor).detach()


def level_patterns(bases: int) -> Tensor:
    """[2^nb, nb] ±1: row c holds the signs of code c (bit i of c set: basis i is +1)."""
    c = torch.arange(2 ** bases)
    return torch.where((c[:, None] >> torch.arange(bases)) & 1 == 1, 1.0, -1.0)


def levels(scales: Tensor) -> Tensor:
    """The 2^nb values Σᵢ ±αᵢ a row (group) can take: [N, G, 2^nb] from scales [nb, N, G], in code order."""
    return torch.einsum("ing,ci->ngc", scales, level_patterns(scales.shape[0]))


def grid_scales(W: Tensor, bases: int, groups: int = 1, importance: Tensor | None = None,
                ratios: tuple[float, ...] = tuple(r / 20 for r in range(8, 21))) -> Tensor:
    """Scales [nb, N, G] whose levels are a uniform grid: αᵢ = 2^(nb−1−i)·Δ gives Σᵢ ±αᵢ = Δ·{±1, ±3, …,
    ±(2^nb − 1)}, with Δ = ratio · max |w| / (2^nb − 1) per row (group) and the ratio (a clipping of the range)
    chosen per row (group) to minimise the importance-weighted rounding error (importance [K], default 1).
    """
    W = W.detach().float()
    N, K = W.shape
    top = 2 ** bases - 1
    Wg = W.reshape(N, groups, K // groups)
    d = torch.ones(K) if importance is None else importance.float()
    d = d.reshape(1, groups, K // groups)
    amax = Wg.abs().amax(-1).clamp_min(1e-12)  # [N, G]
    best_err, best_delta = None, None
    for r in ratios:
        delta = (r * amax / top)[..., None]
        q = delta * torch.clamp(2 * torch.floor(Wg / (2 * delta)) + 1, -top, top)
        err = (d * (Wg - q) ** 2).sum(-1)
        if best_err is None:
            best_err, best_delta = err, delta[..., 0]
        else:
            better = err < best_err
            best_err, best_delta = best_err.where(~better, err), best_delta.where(~better, delta[..., 0])
    powers = 2.0 ** torch.arange(bases - 1, -1, -1, dtype=torch.float32)
    return powers[:, None, None] * best_delta[None]


def round_to_levels(W: Tensor, scales: Tensor, H: Tensor | None = None, keep: Tensor | None = None,
                    damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """The signs of every basis at once, given the scales: each weight becomes the nearest of its row's
    (group's) 2^nb levels Σᵢ ±αᵢ (the exact minimiser over all sign combinations of a separable error); with
    H [K, K], GPTQ's error feedback carries each column's rounding error onto the columns not yet rounded
    (`llmc.quantization.gptq_round`, act-order), so the rounding minimises tr(E H Eᵀ) greedily.

    keep [N, K] (bool): positions stored exactly elsewhere (outliers); they take the updated weight as is (an
    input that never fired in the calibration data, XᵀX diagonal 0, has its column rounded from 0, as GPTQ does).
    Returns B [nb, N, K] (±1) and Q [N, K], the value each weight was rounded to (the updated weight at kept
    positions), from which a kept position's stored value is Q − Σᵢ αᵢBᵢ.
    """
    W = W.detach().float()
    nb, N, G = scales.shape
    K = W.shape[1]
    lv = levels(scales.float())  # [N, G, L]
    group_of = torch.arange(K) // (K // G)
    codes = torch.empty(N, K, dtype=torch.long)
    Q = torch.empty(N, K)
    if H is None:
        step = max(1, (1 << 22) // (K * lv.shape[-1]))  # [rows, K, L] distances, about 16 MB a chunk
        for r in range(0, N, step):
            lvk = lv[r:r + step][:, group_of]
            c = (W[r:r + step, :, None] - lvk).abs().argmin(-1)
            codes[r:r + step] = c
            Q[r:r + step] = lvk.gather(-1, c[..., None])[..., 0]
        if keep is not None:
            Q = torch.where(keep, W, Q)
    else:
        def round_column(w: Tensor, col: int) -> Tensor:
            lvc = lv[:, group_of[col]]
            c = (w[:, None] - lvc).abs().argmin(1)
            q = lvc.gather(1, c[:, None])[:, 0]
            if keep is not None:
                q = torch.where(keep[:, col], w, q)
            codes[:, col] = c
            Q[:, col] = q
            return q

        for attempt in range(4):  # raise the damping tenfold where XᵀX is too ill-conditioned
            try:
                gptq_round(W, H.double(), round_column, damp=damp * 10 ** attempt)
                break
            except HessianNotPositiveDefinite:
                if attempt == 3:
                    raise
    B = level_patterns(nb)[codes].permute(2, 0, 1).contiguous()
    return B, Q


def refine_joint(W: Tensor, scales: Tensor, rounds: int, H: Tensor | None = None, keep: Tensor | None = None,
                 best: float = float("inf")) -> tuple[Tensor, Tensor, Tensor, list[float]] | None:
    """Stage 2 by joint sign rounding (`refine=gptq`): from scales [nb, N, G], `rounds` times round every
    weight to its levels (`round_to_levels`, error feedback under a full H) and refit the scales by least
    squares (under H, with the kept positions' values, Q, fixed). Keeps the best round by the error of the
    whole approximation (kept positions included); returns (B, scales, Q, the best error after each round),
    or None if no round beat `best`.
    """
    W = W.detach().float()
    G = scales.shape[-1]
    full = H if H is not None and H.dim() == 2 else None  # a diagonal H keeps the rounding separable
    result, errors = None, []
    for _ in range(rounds):
        B, Q = round_to_levels(W, scales, full, keep)
        for S in (scales, None):  # the rounding's own scales, then their least-squares refit
            if S is None:  # Ŵ = Q at kept positions whatever the scales: fit the rest, W − Q left there
                S = fit_scales(W if keep is None else torch.where(keep, W - Q, W),
                               B if keep is None else B.masked_fill(keep, 0.0), G, H)
            What = approx(B, S)
            if keep is not None:
                What = torch.where(keep, Q, What)
            err = relative_error(W, What, H)
            if err < best:
                best, result = err, (B, S, Q)
        scales = S
        errors.append(best)
    return None if result is None else (*result, errors)
