"""Stage 3 of QBB: calibration of the scales (optionally also of the norm weights, and a V step on the signs),
whole network, against the FP teacher.

The student is the graph with every quantized weight replaced by its dense Ŵ = Σ αᵢ ⊙ Bᵢ (a
parameter), so one backward pass gives ∂L/∂Ŵ for all of them, pulled back to the scales as
∂L/∂αᵢ[n, g] = Σ_{k in g} Bᵢ[n, k] ∂L/∂Ŵ[n, k]. The scales are trained as factors (initially 1) of
their stage-2 values with Adam, so one learning rate suits every layer. With `norms` (beyond the paper, as
PV-Tuning's P step does) the norm weights are trained the same way, as factors of their FP values.

With `sign_change` > 0, each step is also a V step of PV-Tuning for the signs: the weights are
re-rounded towards a gradient step (`Student.flip_signs`), at most a `sign_change` fraction of each
matrix's weights changing levels, those that gain the most. (Flipping one sign moves a weight by
2αᵢ, far beyond where a first-order loss estimate holds; a level change here is one that a small
gradient step asks for.)

Data ("generated", the paper's data-free setting): the FP model samples `candidates` sequences
from random first tokens; each is scored by the teacher–student discrepancy of the initial
student (the same loss as training) and the `samples` most divergent are kept. Or windows of a
data set. The loss matches logits: "mse" (KD-MSE, mean squared difference of the logits; the
paper's best) or "kl" (KL(teacher ‖ student)).

Checkpointed every `checkpoint_every` steps (factors, Adam state, step; with the V step also the
signs, its averaged gradients and its counts); a run re-started with the same fingerprint
continues from there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from llmc.calibration import autocast, decode_inputs, kl_to_teacher, load_checkpoint, save_checkpoint
from llmc.graph import attr_tensor, set_attr_tensor
from llmc.ops.binary_bases import pack_signs, unpack_signs
from llmc.passes.qbb_quant.bases import expand, round_to_levels
from llmc.progress import bar, log


@dataclass(frozen=True)
class ScalePlan:
    steps: int = 100
    batch_size: int = 4
    lr: float = 1e-3
    loss: str = "mse"
    checkpoint_every: int = 10
    seed: int = 0
    sign_change: float = 0.0  # > 0: a V step on the signs after every step (at most this fraction changed)
    sign_step: float = 0.3    # the V step's target: a gradient step of this times the matrix's rms weight
    norms: bool = False       # also train the norm weights (as factors, like the scales), as PV-Tuning's P step does
    amp: bool = False         # teacher and student under bfloat16 autocast


def logit_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """KD-MSE (mean over tokens and vocabulary of the squared logit difference) or KL(teacher ‖ student)."""
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    return kl_to_teacher(student, teacher)


class Student:
    """The graph with dense weights Ŵ(α) for every quantized matrix: `set()` writes them from the factors."""

    def __init__(self, gm: fx.GraphModule, state: dict, empty_cache, norms: bool = False):
        self.gm, self.empty = gm, empty_cache
        self.targets = sorted(state)
        # the gains of the norms (1-d "norm" weights; a LayerNorm's bias is left alone), trained as factors of
        # their values when `norms`
        self.norms = sorted(n for n, p in gm.named_parameters()
                            if norms and p.dim() == 1 and "norm" in n and n.endswith("weight"))
        self.signs = {t: state[t]["B"] for t in self.targets}  # int8 ±1 [nb, N, K]
        self.base = {t: state[t]["scales"].float() for t in self.targets}
        self.original = {t: attr_tensor(gm, t) for t in self.targets + self.norms}
        self.base.update({n: self.original[n].detach().float() for n in self.norms})
        self.factors = {t: torch.ones_like(self.base[t]) for t in self.targets + self.norms}
        self.outliers = {t: state[t].get("outliers") for t in self.targets}
        self.momentum: dict = {}  # the averaged dense gradients of the V step

    @property
    def trained(self) -> list[str]:
        """Every tensor with factors: the quantized matrices' scales, then the norms."""
        return self.targets + self.norms

    def scales(self, t: str) -> torch.Tensor:
        """The scales of matrix `t` (or the weight of norm `t`) as trained so far."""
        return self.base[t] * self.factors[t]

    def set(self, grad: bool) -> None:
        for t in self.targets:
            B = self.signs[t]
            w = (B.float() * expand(self.scales(t), B.shape[-1])).sum(0)
            if self.outliers[t] is not None:
                idx, vals = self.outliers[t]
                w = w.scatter_add(1, idx.long(), vals.float())
            set_attr_tensor(self.gm, t, w, parameter=True)
            attr_tensor(self.gm, t).requires_grad_(grad)
        for n in self.norms:
            set_attr_tensor(self.gm, n, self.scales(n).to(self.original[n].dtype))
            attr_tensor(self.gm, n).requires_grad_(grad)

    def restore(self) -> None:
        for t in self.trained:
            set_attr_tensor(self.gm, t, self.original[t])

    def factor_grads(self) -> dict:
        """∂L/∂factor from the dense weights' gradients."""
        out = {}
        for t in self.targets:
            dW = attr_tensor(self.gm, t).grad
            B = self.signs[t]
            nb, N, K = B.shape
            G = self.base[t].shape[-1]
            dscale = (B.float() * dW.reshape(1, N, K)).reshape(nb, N, G, K // G).sum(-1)
            out[t] = dscale * self.base[t]
        for n in self.norms:
            out[n] = attr_tensor(self.gm, n).grad.float() * self.base[n]
        return out

    def flip_signs(self, fraction: float, step: float, beta: float = 0.9) -> int:
        """The V step: re-round the matrices towards a gradient step, changing at most `fraction` of each
        matrix's weights; returns how many weights changed. Needs the dense gradients of the last backward.

        The target is T = Ŵ − step · rms(Ŵ) · clamp(M / rms(M), −1, 1) (M the averaged gradient, Ŵ the bases'
        part without kept outliers: a step of at most `step` times the matrix's typical weight; without the
        clamp the largest gradients sent their weights to the extreme levels, and the first step of a SmolLM2
        run multiplied its loss by 300); every weight's nearest level Σᵢ ±αᵢ to T is found (all its signs at
        once), and of the weights whose level changes, those that come closest to T gain the most,
        (T − Ŵ)² − (T − Ŵ')², are moved: at most `fraction` of them, never a kept outlier."""
        changed = 0
        for t in self.targets:
            B = self.signs[t]
            nb, N, K = B.shape
            dW = attr_tensor(self.gm, t).grad
            m = self.momentum.get(t)
            self.momentum[t] = m = dW.clone() if m is None else m.mul_(beta).add_(dW, alpha=1 - beta)
            count = int(fraction * N * K)
            if count < 1:
                continue
            S = self.scales(t).detach()
            W = (B.float() * expand(S, K)).sum(0)
            u = (m / m.square().mean().sqrt().clamp_min(1e-30)).clamp(-1.0, 1.0)  # at most one step per weight
            target = W - step * W.square().mean().sqrt() * u
            newB, newW = round_to_levels(target, S)
            gain = ((target - W).square() - (target - newW).square()).where((newB != B).any(0), 0.0)
            if self.outliers[t] is not None:
                gain.scatter_(1, self.outliers[t][0].long(), 0.0)
            top = gain.flatten().topk(count)
            idx = top.indices[top.values > 0]
            flat = B.view(nb, -1)
            flat[:, idx] = newB.view(nb, -1)[:, idx].to(B.dtype)
            changed += idx.numel()
        return changed

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        mask, pos = decode_inputs(ids)
        return self.gm(ids, mask, pos, self.empty(ids.shape[0]))[0]


@torch.no_grad()
def most_divergent(student: Student, teacher, rows: torch.Tensor, keep: int, loss: str,
                   progress: bool) -> tuple[torch.Tensor, list[float]]:
    """The `keep` rows of `rows` [n, L] on which the student's logits differ most from the teacher's."""
    student.set(grad=False)
    scores = []
    for r in bar(rows.split(1), desc="qbb_quant scoring samples", unit="seq", enabled=progress):
        scores.append(float(logit_loss(student.logits(r), teacher(r), loss)))
    order = torch.tensor(scores).argsort(descending=True, stable=True)[:keep]
    return rows[order.sort().values], [round(scores[i], 5) for i in order.tolist()]


def calibrate_scales(student: Student, teacher, rows: torch.Tensor, plan: ScalePlan, progress: bool,
                     path: str | None, fingerprint: str) -> dict:
    """`plan.steps` Adam steps on the scale factors over batches of `rows` [n, L]; returns stats.

    Leaves the trained factors in `student.factors` (with `plan.sign_change`, the flipped signs in
    `student.signs`) and the graph's weights restored."""
    t0 = time.perf_counter()
    params = [student.factors[t].requires_grad_(True) for t in student.trained]
    opt = torch.optim.Adam(params, lr=plan.lr)
    losses: list[float] = []
    flips: list[int] = []
    start = 0
    saved = load_checkpoint(path, fingerprint, "qbb_quant scales")
    if saved is not None:
        with torch.no_grad():
            for t, p in zip(student.trained, params):
                p.copy_(saved["factors"][t])
        opt.load_state_dict(saved["optimizer"])
        losses, start = list(saved["losses"]), int(saved["step"])
        flips = list(saved.get("flips", []))
        if plan.sign_change:
            for t in student.targets:
                student.signs[t].copy_(unpack_signs(saved["signs"][t], torch.int8))
                student.momentum[t] = saved["momentum"][t]
        log(f"qbb_quant: scale calibration resumed at step {start}")
    flags = {p: p.requires_grad for p in student.gm.parameters()}
    for p in student.gm.parameters():
        p.requires_grad_(False)
    n = rows.shape[0]
    try:
        for step in bar(range(start, plan.steps), desc="qbb_quant scale calibration", unit="step", enabled=progress):
            gen = torch.Generator().manual_seed(plan.seed * 100003 + step)
            batch = rows[torch.randperm(n, generator=gen)[:plan.batch_size]]
            with torch.no_grad(), autocast(plan.amp):
                target = teacher(batch)
            student.set(grad=True)
            with autocast(plan.amp):
                logits = student.logits(batch)
            loss = logit_loss(logits, target, plan.loss)
            loss.backward()
            grads = student.factor_grads()
            opt.zero_grad(set_to_none=True)
            for t, p in zip(student.trained, params):
                p.grad = grads[t]
            opt.step()
            if plan.sign_change:
                with torch.no_grad():
                    flips.append(student.flip_signs(plan.sign_change, plan.sign_step))
            losses.append(round(float(loss.detach()), 6))
            if path and ((step + 1) % plan.checkpoint_every == 0 or step + 1 == plan.steps):
                extra = {"flips": flips, "signs": {t: pack_signs(student.signs[t]) for t in student.targets},
                         "momentum": student.momentum} if plan.sign_change else {}
                save_checkpoint(path, fingerprint, factors={t: p.detach().clone() for t, p in
                                                            zip(student.trained, params)},
                                optimizer=opt.state_dict(), losses=losses, step=step + 1, **extra)
    finally:
        student.restore()
        for p, f in flags.items():
            p.requires_grad_(f)
        for p in params:
            p.requires_grad_(False)
    return {"steps": plan.steps, "loss": plan.loss, "lr": plan.lr, "batch_size": plan.batch_size,
            "norms": len(student.norms), "amp": plan.amp,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "losses": losses, "seconds": round(time.perf_counter() - t0, 1),
            **({"sign_change": plan.sign_change, "sign_step": plan.sign_step, "weights_changed": sum(flips),
                "changed_per_step": flips}
               if plan.sign_change else {})}
