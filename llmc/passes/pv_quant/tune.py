"""PV-Tuning (Malinovskii et al., NeurIPS 2024): global fine-tuning of an AQLM model, codes included.

The student is the graph with every quantized weight replaced by its dequantized dense copy Ŵ, so
one backward pass of KL(teacher ‖ student) over calibration text gives ∂L/∂Ŵ for all of them. Each
step then does:

  P step  the continuous tensors of the codes (codebooks and scales; scales for scalar codes) get
          ∂L/∂Ŵ pulled back through Ŵ = s · Σ_m C_m[codes] (plus the own gradients of the norms
          and of the non-quantized parameters chosen by `extra`) and one LAMB step: a layer-wise
          relative update, every tensor moving by lr · ‖p‖ in norm;
  V step  a straight-through buffer X per matrix (initialised to Ŵ) takes a LAMB step with
          β1 = 0 on ∂L/∂Ŵ; the groups where X has moved furthest from Ŵ, the top `code_change`
          fraction, are re-encoded towards X by greedy search over the codebooks, and changes are
          kept in that order while ‖ΔŴ‖ stays within `trust_ratio` · ‖Ŵ‖ (the subspace linearised
          V step with a trust region). "Furthest" is measured in each group's own grid, ‖X − Ŵ‖ / s
          with s its scale (`code_select="scaled"`): the buffer's LAMB step moves every weight by
          about the same amount, so ranked in plain weight units (`"absolute"`, as AQLM's reference
          code does) the top groups are those of the largest-scale rows, whose codes that move does
          not change;
  and rewrites Ŵ from the new codes, codebooks and scales. With `schedule="cosine"` both learning
  rates decay from their set value to 0 over the run.

`mode="ste"` is the straight-through baseline at the same cost per step: every group is re-encoded
to the nearest code of X every step, with no subspace and no trust region.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import torch
from torch import fx

from llmc.calibration import autocast, flat_inputs, kl_to_teacher, load_checkpoint, save_checkpoint
from llmc.graph import attr_tensor, set_attr_tensor
from llmc.passes.pv_quant.representations import compact_codes
from llmc.progress import bar, log


@dataclass(frozen=True)
class TunePlan:
    steps: int = 50
    batch_size: int = 4           # sequences per step
    micro_batch: int = 8          # sequences per forward/backward; gradients accumulate over a step's micro-batches
    lr: float = 3e-4              # LAMB, codebooks / scales / norms / extra
    code_lr: float = 1e-2         # LAMB (β1 = 0), straight-through buffers
    code_change: float = 0.01     # fraction of groups re-encoded per matrix per step
    code_select: str = "scaled"   # rank groups by ‖X − Ŵ‖ in units of their grid scale ("scaled") or of weight ("absolute")
    trust_ratio: float = 0.01     # max ‖ΔŴ‖ / ‖Ŵ‖ from code changes per step; 0 = no trust region
    mode: str = "pv"              # "pv" or "ste"
    tune_norms: bool = True
    schedule: str = "constant"    # "constant" or "cosine": both learning rates decay to 0 over `steps`
    extra: str = ""               # regex of other non-quantized parameters tuned with the P step (e.g. embeddings)
    amp: bool = True              # teacher and student forward/backward under bfloat16 autocast
    checkpoint_every: int = 10
    seed: int = 0


class Lamb:
    """Adam moments with a per-tensor trust ratio: each step moves p by lr · ‖p‖ along m̂ / (√v̂ + ε)."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas=(0.9, 0.95), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.step_count = 0
        self.m = [torch.zeros_like(p) for p in params] if betas[0] > 0 else None
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        self.step_count += 1
        b1, b2 = self.betas
        c2 = 1 - b2 ** self.step_count
        c1 = 1 - b1 ** self.step_count if b1 > 0 else 1.0
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:
                continue
            self.v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
            if self.m is not None:
                self.m[i].mul_(b1).add_(g, alpha=1 - b1)
                m = self.m[i] / c1
            else:
                m = g
            update = m / ((self.v[i] / c2).sqrt_() + self.eps)
            p_norm, u_norm = float(p.norm()), float(update.norm())
            ratio = p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0
            p.add_(update, alpha=-self.lr * ratio)

    def state_dict(self) -> dict:
        return {"step": self.step_count, "m": self.m, "v": self.v}

    def load_state_dict(self, d: dict) -> None:
        self.step_count = int(d["step"])
        if self.m is not None:
            for a, b in zip(self.m, d["m"]):
                a.copy_(b)
        for a, b in zip(self.v, d["v"]):
            a.copy_(b)


def lr_factor(plan: TunePlan, step: int) -> float:
    """The learning-rate multiplier at `step` (0-based) of `plan.steps`."""
    if plan.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / plan.steps))
    return 1.0


@torch.no_grad()
def v_step(q, X: torch.Tensor, W_hat: torch.Tensor, plan: TunePlan, gen, stats: dict | None = None) -> int:
    """Move some of q's codes towards the buffer X; returns how many code groups changed.

    q is any `pv_quant_repr` representation: its groups of `q.group` consecutive input weights are
    ranked by ‖X − Ŵ‖² (divided by their grid scale², with code_select="scaled") and the top
    `code_change` fraction re-encoded (all of them with mode=ste).
    `stats["proposed"]`, if given, is increased by the groups whose code the search changed before
    the trust region turned some of them back.
    """
    g = q.group
    diff = (X - W_hat).reshape(-1, g)
    if plan.mode == "ste":
        sel = torch.arange(diff.shape[0])
    else:
        k = max(1, math.ceil(plan.code_change * diff.shape[0]))
        distance = diff.pow(2).sum(-1)
        if plan.code_select == "scaled":  # how far in the group's own grid: what decides whether its code moves
            distance /= q.grid_scale().pow(2).clamp_min(torch.finfo(distance.dtype).tiny)
        sel = distance.topk(k).indices  # descending: the furthest groups first
    flat = q.flat_codes()
    old = flat[sel]
    new = q.encode(sel, X.reshape(-1, g)[sel], old, gen)
    changed = (new != old).any(-1)
    if stats is not None:
        stats["proposed"] = stats.get("proposed", 0) + int(changed.sum())
    if plan.mode != "ste" and plan.trust_ratio > 0:
        step = (q.decode(sel, new) - q.decode(sel, old)).pow(2).sum(-1) * changed  # ‖ΔŴ_group‖²
        budget = (plan.trust_ratio * float(W_hat.norm())) ** 2
        keep = step.cumsum(0) <= budget
        if bool(changed.any()):  # the first change is always taken, so the V step never stalls
            keep[int(changed.nonzero()[0])] = True
        changed &= keep
    flat[sel[changed]] = new[changed]
    return int(changed.sum())


def _other_parameters(gm: fx.GraphModule, state: dict, plan: TunePlan) -> tuple[dict[str, list[str]], list[str]]:
    """The non-quantized parameters to tune (norms, and `plan.extra` matches), one name per storage, each
    with every name sharing that storage (a tied embedding and lm_head are one tensor to tune); and the
    names tuned because of `plan.extra` (with the names tied to them)."""
    extra = re.compile(plan.extra) if plan.extra else None
    by_storage: dict[tuple, list[str]] = {}
    picked, by_extra = set(), set()
    for n, p in gm.named_parameters(remove_duplicate=False):
        if n in state:
            continue
        key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape))
        by_storage.setdefault(key, []).append(n)
        if extra and extra.search(n):
            by_extra.add(key)
        if (plan.tune_norms and p.dim() == 1 and "norm" in n) or key in by_extra:
            picked.add(key)
    tied = {names[0]: names for key, names in by_storage.items() if key in picked}
    return tied, [n for key in by_extra for n in by_storage[key]]


def _summed_grad(params: list[torch.Tensor]) -> torch.Tensor | None:
    grads = [p.grad for p in params if p.grad is not None]
    return sum(grads[1:], grads[0]) if grads else None


class _Tuner:
    """The state of one PV-Tuning run: the student's weights and buffers, both optimizers, the
    batch order, the per-step records, and how they are checkpointed (see `pv_tune`)."""

    def __init__(self, gm: fx.GraphModule, state: dict, plan: TunePlan, batches: list[torch.Tensor]):
        self.gm, self.state, self.plan = gm, state, plan
        self.targets = sorted(state)
        self.tied, self.extra = _other_parameters(gm, state, plan)
        self.others = sorted(self.tied)
        # The student's dense weights: fresh tensors (the teacher may share the graph's storage).
        for t in self.targets:
            set_attr_tensor(gm, t, state[t].weight().detach().clone(), parameter=True)
        for n in self.others:
            fresh = attr_tensor(gm, n).detach().clone()
            for name in self.tied[n]:  # tied names keep one storage (their own parameter objects, as before)
                set_attr_tensor(gm, name, fresh, parameter=True)
        self.buffers = [attr_tensor(gm, t).detach().clone() for t in self.targets]
        continuous = [x for t in self.targets for x in state[t].continuous()] + [attr_tensor(gm, n) for n in self.others]
        self.p_opt = Lamb(continuous, plan.lr, betas=(0.9, 0.95))
        self.v_opt = Lamb(self.buffers, plan.code_lr, betas=(0.0, 0.95))
        self.gen = torch.Generator().manual_seed(plan.seed)
        self.order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(plan.seed + 1)).tolist()
        self.kl: list[float] = []
        self.changes: list[float] = []
        self.proposals: list[float | None] = []  # the fraction the search changed, before the trust region
        self.start = 0
        self.weights = [attr_tensor(gm, t) for t in self.targets]
        self.other_groups = [[attr_tensor(gm, name) for name in self.tied[n]] for n in self.others]  # per storage
        self.other_params = [p for group in self.other_groups for p in group]

    def resume(self, saved: dict) -> None:
        gm, state = self.gm, self.state
        with torch.no_grad():
            for t in self.targets:
                q = state[t]
                q.codes.copy_(saved["state"][t]["codes"])
                for x, y in zip(q.continuous(), saved["state"][t]["continuous"]):
                    x.copy_(y)
                attr_tensor(gm, t).copy_(q.weight())
            for n in self.others:
                attr_tensor(gm, n).copy_(saved["norms"][n])
            for b, x in zip(self.buffers, saved.get("buffers", ())):
                b.copy_(x)
        if "p_opt" in saved:
            self.p_opt.load_state_dict(saved["p_opt"])
            self.v_opt.load_state_dict(saved["v_opt"])
            self.gen.set_state(saved["gen"])
        self.start, self.kl, self.changes = int(saved["step"]), list(saved["kl"]), list(saved["changes"])
        self.proposals = list(saved.get("proposals", [None] * self.start))  # None: saved before this was recorded

    def checkpoint(self, step: int) -> dict:
        doc = {"step": step, "kl": self.kl, "changes": self.changes, "proposals": self.proposals,
               "state": {t: {"codes": compact_codes(self.state[t].codes), "continuous": self.state[t].continuous()}
                         for t in self.targets},
               "norms": {n: attr_tensor(self.gm, n).detach() for n in self.others}}  # norms and `extra` ones
        if step < self.plan.steps:  # what continuing needs; a finished run keeps only its result (~30x smaller)
            doc.update({"buffers": self.buffers, "p_opt": self.p_opt.state_dict(), "v_opt": self.v_opt.state_dict(),
                        "gen": self.gen.get_state()})
        return doc

    def backward(self, ids: torch.Tensor, teacher, empty_cache) -> float:
        """Gradients of the batch's mean KL(teacher ‖ student) on the weights, micro-batch by micro-batch."""
        plan = self.plan
        for p in self.weights + self.other_params:
            p.grad = None
        loss = 0.0
        for chunk in ids.split(plan.micro_batch):
            inputs = flat_inputs(chunk, empty_cache)
            with torch.no_grad(), autocast(plan.amp):
                target = teacher(chunk, inputs[1])
            with torch.enable_grad():
                with autocast(plan.amp):
                    logits = self.gm(chunk, inputs[1], inputs[2], inputs[3:])[0]
                part = kl_to_teacher(logits, target) * (chunk.shape[0] / ids.shape[0])
                del logits, target
                part.backward()
            loss += float(part.detach())
        return loss

    def p_step(self) -> None:
        """Pull ∂L/∂Ŵ back onto codebooks and scales; one Lamb step on them and on the norms."""
        grads = []
        with torch.enable_grad():
            for t, w in zip(self.targets, self.weights):
                q = self.state[t]
                params = q.continuous()
                for x in params:
                    x.requires_grad_(True)
                grads += torch.autograd.grad(q.weight(), params, w.grad)
                for x in params:
                    x.requires_grad_(False)
        grads += [_summed_grad(group) for group in self.other_groups]
        self.p_opt.step(grads)

    def v_step(self) -> tuple[int, int, dict]:
        """Straight-through buffers take a step, then a few code groups follow them (`v_step`).
        Returns (code groups changed, code groups in all, search statistics)."""
        self.v_opt.step([w.grad for w in self.weights])
        moved = total = 0
        stats: dict = {}
        with torch.no_grad():
            for t, w, X in zip(self.targets, self.weights, self.buffers):
                q = self.state[t]
                moved += v_step(q, X, q.weight(), self.plan, self.gen, stats)
                total += q.flat_codes().shape[0]
                w.copy_(q.weight())
                w.grad = None
            for p in self.other_params:
                p.grad = None
        return moved, total, stats


def pv_tune(gm: fx.GraphModule, state: dict, teacher, batches: list[torch.Tensor],
            empty_cache, plan: TunePlan, progress: bool = True, checkpoint_path: str | None = None,
            fingerprint: str = "") -> dict:
    """Tune `state` (in place) and `gm`'s norms (and `plan.extra` parameters) so that gm's logits match
    the teacher's; `gm` ends with the dequantized weights of the result. Returns KL per step and
    code-change statistics."""
    run = _Tuner(gm, state, plan, batches)
    saved = load_checkpoint(checkpoint_path, fingerprint, "pv_quant")
    if saved is not None:
        run.resume(saved)
        log(f"pv_quant: resuming PV-Tuning at step {run.start}/{plan.steps} from {checkpoint_path}")
    flags = {p: p.requires_grad for p in gm.parameters()}
    for p in gm.parameters():
        p.requires_grad_(False)
    for p in run.weights + run.other_params:
        p.requires_grad_(True)
    seconds = {"model": 0.0, "p_step": 0.0, "v_step": 0.0}
    try:
        with bar(total=plan.steps, desc=f"pv_quant {plan.mode}-tuning", unit="step", enabled=progress) as pbar:
            pbar.update(run.start)
            for step in range(run.start, plan.steps):
                t0 = time.perf_counter()
                run.p_opt.lr, run.v_opt.lr = plan.lr * lr_factor(plan, step), plan.code_lr * lr_factor(plan, step)
                picked = [run.order[(step * plan.batch_size + i) % len(run.order)] for i in range(plan.batch_size)]
                loss = run.backward(torch.cat([batches[i] for i in picked]), teacher, empty_cache)
                t1 = time.perf_counter()
                run.p_step()
                t2 = time.perf_counter()
                moved, total, stats = run.v_step()
                seconds["model"] += t1 - t0
                seconds["p_step"] += t2 - t1
                seconds["v_step"] += time.perf_counter() - t2
                run.kl.append(loss)
                run.changes.append(moved / max(total, 1))
                run.proposals.append(stats.get("proposed", 0) / max(total, 1))
                pbar.update(1)
                pbar.set_postfix(kl=f"{run.kl[-1]:.4f}", changed=f"{run.changes[-1]:.4f}")
                if checkpoint_path and ((step + 1) % plan.checkpoint_every == 0 or step + 1 == plan.steps):
                    save_checkpoint(checkpoint_path, fingerprint, **run.checkpoint(step + 1))
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for p in run.weights + run.other_params:
            p.requires_grad_(False)
            p.grad = None
    kl, head, tail = run.kl, run.kl[:3], run.kl[-3:]
    return {"mode": plan.mode, "amp": plan.amp, "schedule": plan.schedule, "extra": run.extra,
            "steps": len(kl), "resumed_from": run.start,
            "kl_first": round(sum(head) / len(head), 5) if head else None,
            "kl_last": round(sum(tail) / len(tail), 5) if tail else None,
            "kl": [round(v, 5) for v in kl], "code_change": [round(c, 6) for c in run.changes],
            "code_proposed": [None if c is None else round(c, 6) for c in run.proposals],
            "seconds": {k: round(v, 1) for k, v in seconds.items()}}
