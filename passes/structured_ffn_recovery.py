"""Calibration statistics and self-guided recovery training for `structured_ffn`.

`input_grams` runs the FP graph over calibration batches and accumulates XᵀX of the inputs of
chosen nodes, one batch at a time (memory: one [N, N] float64 matrix per distinct input).
`self_guided_distill` trains the structured factors while each rewritten linear computes
lerp(structured, dense, α) = α·dense + (1 − α)·structured, with α falling along a cosine from 1
to 0 over the guided phase (Wei et al., NeurIPS 2024, §4.4), distilling the FP model's logits
(KL(teacher ‖ student) per token). Training state is checkpointed to a file named by a
fingerprint of everything that determines the run, so an interrupted run continues where its
last checkpoint left off and a finished run is not repeated.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from llmc.fsutil import atomic_file
from llmc.progress import bar, log


def decode_inputs(ids: torch.Tensor):
    """(attention_mask, position_ids) of a full, unpadded batch of token ids [B, S]."""
    B, S = ids.shape
    return torch.ones(B, S, dtype=torch.long), torch.arange(S).expand(B, S).contiguous()


class GramRecorder(fx.Interpreter):
    """Runs a graph and adds xᵀx of the first argument of each watched node to `grams[key]`."""

    def __init__(self, gm: fx.GraphModule, watch: dict[fx.Node, str]):
        super().__init__(gm)
        self.watch = watch
        self.grams: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        key = self.watch.get(n)
        if key is not None:
            x = self.env[n.args[0]]
            x = x.reshape(-1, x.shape[-1]).float()
            g = (x.t() @ x).double()
            self.grams[key] = self.grams[key] + g if key in self.grams else g
        return super().run_node(n)


@torch.no_grad()
def input_grams(gm: fx.GraphModule, watch: dict[fx.Node, str], batches, empty_cache, progress: bool = True,
                cache_path: str | None = None, fingerprint: str = "", label: str = "structured_ffn") -> dict[str, torch.Tensor]:
    """XᵀX [N, N] (float64) of the inputs of the `watch` nodes over all calibration batches.

    watch: node -> key; nodes sharing an input should share a key (it is accumulated once).
    With `cache_path`, the result is loaded from / saved to that file under `fingerprint`.
    """
    if cache_path and os.path.exists(cache_path):
        saved = torch.load(cache_path, weights_only=True)
        if saved.get("fingerprint") == fingerprint:
            log(f"{label}: calibration statistics from {cache_path}")
            return saved["grams"]
    dedup: dict[fx.Node, str] = {}
    seen_keys = set()
    for node, key in watch.items():
        if key not in seen_keys:
            dedup[node] = key
            seen_keys.add(key)
    rec = GramRecorder(gm, dedup)
    for ids in bar(batches, desc=f"{label} calibration", unit="batch", enabled=progress):
        mask, pos = decode_inputs(ids)
        rec.run(ids, mask, pos, empty_cache(ids.shape[0]))
    if cache_path:
        _atomic_save({"fingerprint": fingerprint, "grams": rec.grams}, cache_path)
    return rec.grams


def _atomic_save(obj, path: str) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


@dataclass(frozen=True)
class RecoveryPlan:
    """Hyperparameters of one recovery run (see `self_guided_distill`)."""

    steps: int
    lr: float
    guided_fraction: float
    batch_size: int
    checkpoint_every: int
    seed: int

    @property
    def guided_steps(self) -> int:
        return int(round(self.steps * self.guided_fraction))

    def lr_at(self, step: int) -> float:
        """The paper's schedule (§4.4): linear warm-up over the first 10% of steps, then a cosine
        decay to lr/10. Adam's first steps move every factor by about lr at once; the warm-up keeps
        that from throwing the converted model far from its initialisation."""
        warmup = max(1, self.steps // 10)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        t = (step - warmup) / max(self.steps - warmup, 1)
        return self.lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * t)))


def _batch_order(n_batches: int, total: int, seed: int) -> list[int]:
    """Epochs of seeded permutations of the batch indices, `total` long."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < total:
        order += torch.randperm(n_batches, generator=gen).tolist()
    return order[:total]


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(softmax(teacher) ‖ softmax(student)), in nats."""
    s = F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def self_guided_distill(gm: fx.GraphModule, params: dict[str, torch.nn.Parameter], alpha: torch.Tensor, teacher,
                        batches, empty_cache, plan: RecoveryPlan, progress: bool = True,
                        checkpoint_path: str | None = None, fingerprint: str = "") -> dict:
    """Train `params` (in place) so that `gm`'s logits match `teacher`'s on the calibration batches.

    alpha: the 0-d tensor the graph's lerp nodes read; set before every step from the cosine
    schedule and left at 0. teacher: `(input_ids, attention_mask) -> logits`.
    Returns statistics: KL at the first and last steps (mean of up to 5), steps run, resumed from.
    """
    from llmc.passes.structured_ffn_factors import cosine_alpha

    names = sorted(params)
    opt = torch.optim.Adam([params[n] for n in names], lr=plan.lr)
    losses: list[float] = []
    start = 0
    if checkpoint_path and os.path.exists(checkpoint_path):
        saved = torch.load(checkpoint_path, weights_only=True)
        if saved.get("fingerprint") == fingerprint:
            with torch.no_grad():
                for n in names:
                    params[n].copy_(saved["params"][n])
            opt.load_state_dict(saved["optimizer"])
            start, losses = int(saved["step"]), list(saved["losses"])
            log(f"structured_ffn: resuming recovery at step {start}/{plan.steps} from {checkpoint_path}")
        else:
            log(f"structured_ffn: {checkpoint_path} belongs to another run; starting over")
    order = _batch_order(len(batches), plan.steps * plan.batch_size, plan.seed)
    flags = {p: p.requires_grad for p in gm.parameters()}
    for p in gm.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)

    def save(step):
        if checkpoint_path:
            _atomic_save({"fingerprint": fingerprint, "step": step, "losses": losses,
                          "params": {n: params[n].detach() for n in names}, "optimizer": opt.state_dict()},
                         checkpoint_path)

    try:
        with bar(total=plan.steps, desc="structured_ffn recovery", unit="step", enabled=progress) as pbar:
            pbar.update(start)
            for step in range(start, plan.steps):
                alpha.fill_(cosine_alpha(step, plan.guided_steps))
                for group in opt.param_groups:
                    group["lr"] = plan.lr_at(step)
                picked = order[step * plan.batch_size:(step + 1) * plan.batch_size]
                ids = torch.cat([batches[i] for i in picked])
                mask, pos = decode_inputs(ids)
                with torch.no_grad():
                    target = teacher(ids, mask)
                with torch.enable_grad():
                    logits = gm(ids, mask, pos, empty_cache(ids.shape[0]))[0]
                    loss = kl_to_teacher(logits, target)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                pbar.update(1)
                pbar.set_postfix(kl=f"{losses[-1]:.4f}", alpha=f"{float(alpha):.3f}")
                if (step + 1) % plan.checkpoint_every == 0 or step + 1 == plan.steps:
                    save(step + 1)
    finally:
        alpha.fill_(0.0)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for n in names:
            params[n].requires_grad_(False)
        opt.state.clear()
    head, tail = losses[:5], losses[-5:]
    return {"steps": len(losses), "resumed_from": start,
            "kl_first": round(sum(head) / len(head), 5) if head else None,
            "kl_last": round(sum(tail) / len(tail), 5) if tail else None,
            "kl": [round(v, 5) for v in losses]}


def config_fingerprint(config: dict, *parts: str) -> str:
    """sha256 of a JSON config and strings (data and weight digests)."""
    return hashlib.sha256(json.dumps([config, *parts], sort_keys=True).encode()).hexdigest()[:16]


def graph_teacher(gm: fx.GraphModule, ctx):
    """`(input_ids, attention_mask) -> logits` of a frozen copy of the graph as it is now (the distillation
    teacher of a pass that rewrites it next, when the context brings none). Shares the weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        frozen = fx.GraphModule(gm, copy.deepcopy(gm.graph))

    def teacher(ids, mask=None):
        _, pos = decode_inputs(ids)
        mask = torch.ones_like(ids) if mask is None else mask
        return frozen(ids, mask, pos, ctx.program.empty_cache(ids.shape[0], 0))[0]

    return teacher
