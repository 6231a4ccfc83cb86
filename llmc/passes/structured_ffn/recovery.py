"""Self-guided recovery training for `structured_ffn`.

`self_guided_distill` trains the structured factors while each rewritten linear computes
lerp(structured, dense, α) = α·dense + (1 − α)·structured, with α falling along a cosine from 1
to 0 over the guided phase (Wei et al., NeurIPS 2024, §4.4), distilling the FP model's logits
(KL(teacher ‖ student) per token). Training state is checkpointed to a file named by a
fingerprint of everything that determines the run, so an interrupted run continues where its
last checkpoint left off and a finished run is not repeated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from llmc.calibration import decode_inputs, kl_to_teacher, load_checkpoint, save_checkpoint
from llmc.passes.structured_ffn.factors import cosine_alpha
from llmc.progress import bar, log


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


def self_guided_distill(gm: fx.GraphModule, params: dict[str, torch.nn.Parameter], alpha: torch.Tensor, teacher,
                        batches, empty_cache, plan: RecoveryPlan, progress: bool = True,
                        checkpoint_path: str | None = None, fingerprint: str = "") -> dict:
    """Train `params` (in place) so that `gm`'s logits match `teacher`'s on the calibration batches.

    alpha: the 0-d tensor the graph's lerp nodes read; set before every step from the cosine
    schedule and left at 0. teacher: `(input_ids, attention_mask) -> logits`.
    Returns statistics: KL at the first and last steps (mean of up to 5), steps run, resumed from.
    """
    names = sorted(params)
    opt = torch.optim.Adam([params[n] for n in names], lr=plan.lr)
    losses: list[float] = []
    start = 0
    saved = load_checkpoint(checkpoint_path, fingerprint, "structured_ffn")
    if saved is not None:
        with torch.no_grad():
            for n in names:
                params[n].copy_(saved["params"][n])
        opt.load_state_dict(saved["optimizer"])
        start, losses = int(saved["step"]), list(saved["losses"])
        log(f"structured_ffn: resuming recovery at step {start}/{plan.steps} from {checkpoint_path}")
    order = _batch_order(len(batches), plan.steps * plan.batch_size, plan.seed)
    flags = {p: p.requires_grad for p in gm.parameters()}
    for p in gm.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)

    def save(step):
        if checkpoint_path:
            save_checkpoint(checkpoint_path, fingerprint, step=step, losses=losses,
                            params={n: params[n].detach() for n in names}, optimizer=opt.state_dict())

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
