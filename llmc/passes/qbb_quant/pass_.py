"""qbb_quant: linear weights as sums of scaled binary bases (QBB; Bulat, Ouali, Tzimiropoulos, NeurIPS 2024).

Each targeted linear W [N, K] becomes W ≈ Σ_{i<bases} αᵢ ⊙ Bᵢ, Bᵢ ∈ {−1, +1}, with one scale per
output row and basis (or per `group` inputs), emitted as `llmc::binary_bases_linear` over
bit-packed signs and float16 scales. Three stages, each switchable (`stages`, a string of digits):

  1  cascaded init: Bᵢ = sign(Rᵢ), αᵢ = mean |Rᵢ| per row (group), Rᵢ₊₁ = Rᵢ − αᵢBᵢ, R₁ = W
     (always run: it is where the other stages start);
  2  layer-wise refinement of ‖W − Σ αᵢBᵢ‖² with the progressive curriculum (one basis' signs per
     phase, all scales every phase): `refine=alternate` takes each phase's exact minimiser
     (B_p = sign of what the other bases leave), `refine=gd` the paper's straight-through gradient
     descent, `refine=gptq` rounds all bases' signs of a weight at once to the nearest of its row's
     2^N levels (with GPTQ's error feedback under `objective=input`) from uniform-grid scales,
     alternated with least-squares scale refits (beyond the paper); `objective=input` weighs the
     error by each layer's XᵀX instead (gd, gptq);
  3  calibration of the scales only, through the whole network against the FP teacher, on
     sequences the FP model writes from random first tokens (`scale_data=generated`, the most
     divergent `scale_samples` of `scale_candidates` kept) or on windows of a data set; loss
     KD-MSE on the logits (`scale_loss=mse`) or KL.

`start=gptq` binarizes GPTQ's dequantized weights (`start_bits`, `start_group`, act-order, on the
calibration XᵀX) instead of the FP ones, the paper's ablation. Stages 1-2 checkpoint after every
decoder layer and stage 3 every 10 steps under `checkpoint_dir` (default `$LLMC_CACHE/qbb_quant`, with
`~/.cache/llmc` for an unset $LLMC_CACHE), so re-running an interrupted compile continues it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

from llmc.calibration import graph_teacher, load_checkpoint, native_bf16, save_checkpoint, stream_grams
from llmc.errors import ConfigError, PassError
from llmc.fsutil import tensor_digest
from llmc.graph import attr_tensor, get_attr_tensor, graph_digest, module_fqn, remove_unused_attrs, set_attr_tensor
from llmc.models import cache_dir
from llmc.ops.binary_bases import bits_per_weight, pack_signs
from llmc.ops.nbits_linear import SUPPORTED_BITS
from llmc.ops.nbits_linear import dequantize as nbits_dequantize
from llmc.passes.qbb_quant.bases import (RefinePlan, approx, cascaded_init, grid_scales, refine, refine_joint,
                                         relative_error, row_outliers)
from llmc.passes.qbb_quant.calibrate import ScalePlan, Student, calibrate_scales, most_divergent
from llmc.passes_base import Pass, PassContext, PassResult, register_pass
from llmc.progress import bar, log
from llmc.quantization import gptq_quantize
from llmc.rewrite import check_targets, quantizable_linears

logger = logging.getLogger(__name__)
aten = torch.ops.aten

MAX_BASES = 8


@register_pass("qbb_quant")
@dataclass(frozen=True)
class QBBQuant(Pass):
    """Quantize decoder linears to sums of binary bases (QBB).

    Matches: `aten.linear` with a stored weight in a module whose FQN matches `targets`. Emits:
    `llmc::binary_bases_linear` (+ `aten.add` for a bias). Numerics: lossy. Calibration data is
    needed for `start=gptq`, `objective=input` and `scale_data` other than generated.
    """

    bases: int = dataclasses.field(default=4, metadata={"help": f"N, binary bases per weight (1..{MAX_BASES})"})
    group: int = dataclasses.field(default=0, metadata={
        "help": "inputs per scale (a multiple of 8 dividing every targeted layer's input width); 0: one scale per "
                "row and basis, as in the paper"})
    stages: str = dataclasses.field(default="12", metadata={
        "help": "stages to run, digits of 1 (cascaded init, always), 2 (layer-wise refinement), 3 (scale "
                "calibration through the network)"})
    refine: Literal["alternate", "gd", "gptq"] = dataclasses.field(default="gptq", metadata={
        "help": "stage 2: alternate (exact per-basis sign updates + least-squares scales), gd (straight-through "
                "Adam, the paper's) or gptq (all signs of a weight at once: the nearest of the row's 2^N levels, "
                "with GPTQ error feedback under objective=input, from uniform-grid scales, alternated with "
                "least-squares scale refits)"})
    rounds: int = dataclasses.field(default=6, metadata={
        "help": "stage 2: rounds (gptq: rounding + scale refit; alternate, gd: passes over the bases, one phase per "
                "basis)"})
    gd_steps: int = dataclasses.field(default=50, metadata={"help": "stage 2, refine=gd: Adam steps per phase"})
    gd_lr: float = dataclasses.field(default=3e-3, metadata={"help": "stage 2, refine=gd: Adam learning rate"})
    objective: Literal["weight", "input", "diag"] = dataclasses.field(default="weight", metadata={
        "help": "stage 2 error: weight (‖W − Ŵ‖², data-free, the paper's), input (weighted by the calibration "
                "XᵀX; needs refine=gptq, or refine=gd with group=0) or diag (by the diagonal of XᵀX: each input's "
                "mean square; exact sign updates still apply)"})
    outliers: int = dataclasses.field(default=0, metadata={
        "help": "weights per row kept aside as float16 values with int16 column indices (the row's largest "
                "magnitudes; the bases fit the rest, and each kept value corrects the bases' output at its place)"})
    start: Literal["fp", "gptq"] = dataclasses.field(default="fp", metadata={
        "help": "weights to binarize: fp, or GPTQ's dequantized weights (start_bits, start_group; calibration XᵀX)"})
    start_bits: int = 4
    start_group: int = 64
    scale_steps: int = dataclasses.field(default=100, metadata={"help": "stage 3: Adam steps"})
    scale_lr: float = dataclasses.field(default=1e-3, metadata={"help": "stage 3: Adam rate of the scale factors"})
    scale_batch: int = dataclasses.field(default=4, metadata={"help": "stage 3: sequences per step"})
    scale_loss: Literal["mse", "kl"] = dataclasses.field(default="mse", metadata={
        "help": "stage 3: mse (KD-MSE on the logits) or kl (KL(teacher ‖ student))"})
    scale_data: str = dataclasses.field(default="generated", metadata={
        "help": "stage 3 data: generated (by the FP model from random first tokens) or a data set / file name"})
    scale_samples: int = dataclasses.field(default=64, metadata={"help": "stage 3: sequences trained on"})
    sign_change: float = dataclasses.field(default=0.0, metadata={
        "help": "stage 3: also change signs after every step (PV-Tuning's V step: weights re-rounded to their "
                "levels towards a gradient step), at most this fraction of each matrix's weights; 0: scales only "
                "(the paper's)"})
    sign_step: float = dataclasses.field(default=0.3, metadata={
        "help": "stage 3 with sign_change: the V step re-rounds towards a gradient step of this times the matrix's "
                "rms weight"})
    scale_norms: bool = dataclasses.field(default=False, metadata={
        "help": "stage 3: also train the norm weights (as factors of their FP values, like the scales), as "
                "PV-Tuning's P step does; false: scales only (the paper's)"})
    scale_amp: Literal["auto", "on", "off"] = dataclasses.field(default="off", metadata={
        "help": "stage 3: teacher and student under bfloat16 autocast; auto: on where oneDNN has native bf16 "
                "kernels (AVX-512, AMX)"})
    scale_candidates: int = dataclasses.field(default=128, metadata={
        "help": "stage 3, generated: sequences sampled, of which the scale_samples most divergent are kept"})
    scale_len: int = dataclasses.field(default=128, metadata={"help": "stage 3: tokens per sequence"})
    targets: str = r"layers\.\d+\.(self_attn|mlp)\."
    checkpoint_dir: str | None = None

    requires = ("dense_linear_weights",)
    invalidates = ("dense_linear_weights",)
    provides = ("qbb_quantized_weights",)

    def __post_init__(self):
        if not 1 <= self.bases <= MAX_BASES:
            raise ConfigError(f"qbb_quant.bases must be in 1..{MAX_BASES}, got {self.bases}")
        if self.group < 0 or self.group % 8:
            raise ConfigError(f"qbb_quant.group must be 0 (one scale per row) or a positive multiple of 8 (signs are "
                              f"packed 8 per byte), got {self.group}")
        if not self.stages or set(self.stages) - set("123") or "1" not in self.stages:
            raise ConfigError(f"qbb_quant.stages is a string of the digits 1, 2, 3 that includes 1 (the cascaded init "
                              f"every other stage starts from), e.g. 12 or 123; got '{self.stages}'")
        if self.refine not in ("alternate", "gd", "gptq"):
            raise ConfigError(f"qbb_quant.refine must be alternate, gd or gptq, got '{self.refine}'")
        if self.objective not in ("weight", "input", "diag"):
            raise ConfigError(f"qbb_quant.objective must be weight, input or diag, got '{self.objective}'")
        if self.objective == "input" and (self.refine == "alternate" or self.refine == "gd" and self.group):
            raise ConfigError("qbb_quant.objective=input needs refine=gptq, or refine=gd with group=0 (per-basis "
                              "sign updates are not exact under XᵀX, and gd's scale refits take one scale per row)")
        if self.start not in ("fp", "gptq"):
            raise ConfigError(f"qbb_quant.start must be fp or gptq, got '{self.start}'")
        if self.start_bits not in SUPPORTED_BITS:
            raise ConfigError(f"qbb_quant.start_bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, "
                              f"got {self.start_bits}")
        if self.start_group < 16 or self.start_group & (self.start_group - 1):
            raise ConfigError(f"qbb_quant.start_group must be a power of two >= 16, got {self.start_group}")
        if self.scale_loss not in ("mse", "kl"):
            raise ConfigError(f"qbb_quant.scale_loss must be mse or kl, got '{self.scale_loss}'")
        for name, low in (("outliers", 0), ("rounds", 1), ("gd_steps", 1), ("scale_steps", 1), ("scale_batch", 1),
                          ("scale_samples", 1), ("scale_len", 2)):
            if getattr(self, name) < low:
                raise ConfigError(f"qbb_quant.{name} must be >= {low}, got {getattr(self, name)}")
        if self.scale_data == "generated" and self.scale_candidates < self.scale_samples:
            raise ConfigError(f"qbb_quant.scale_candidates ({self.scale_candidates}) must be >= scale_samples "
                              f"({self.scale_samples}): the most divergent samples are kept from the candidates")
        for name in ("gd_lr", "scale_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"qbb_quant.{name} must be > 0, got {getattr(self, name)}")
        if self.sign_step <= 0:
            raise ConfigError(f"qbb_quant.sign_step must be > 0, got {self.sign_step}")
        if not 0 <= self.sign_change < 1:
            raise ConfigError(f"qbb_quant.sign_change is the fraction of weights whose signs may change per stage-3 "
                              f"step, in [0, 1); got {self.sign_change}")
        if self.sign_change and "3" not in self.stages:
            raise ConfigError("qbb_quant.sign_change flips signs during stage 3; add 3 to stages (e.g. stages=123)")
        check_targets("qbb_quant", self.targets)

    def needs_data(self) -> bool:
        return self.start == "gptq" or self.objective != "weight" or ("3" in self.stages
                                                                     and self.scale_data != "generated")

    def bits_per_weight(self, K: int) -> float:
        """Signs and 16-bit scales, plus 16-bit values and 16-bit column indices of the kept outliers."""
        return bits_per_weight(self.bases, K, K // self.group if self.group else 1) + self.outliers * 32 / K

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        t0 = time.perf_counter()
        linears = quantizable_linears(gm, self.targets, lm_head=False)
        if not linears:
            logger.debug("qbb_quant: no linear matches %r", self.targets)
            return PassResult(gm, False, {"quantized": 0})
        for n in linears:
            K = get_attr_tensor(gm, n.args[1]).shape[1]
            if self.outliers >= K or K > 32767 and self.outliers:
                raise ConfigError(f"qbb_quant.outliers={self.outliers} needs layers of more inputs than outliers and "
                                  f"at most 32767 (int16 indices); {module_fqn(n)} has {K}")
            if K % 8 or (self.group and K % self.group):
                raise ConfigError(f"qbb_quant: {module_fqn(n)} has {K} inputs, which "
                                  + ("is not a multiple of 8 (signs are packed 8 per byte)" if K % 8 else
                                     f"group={self.group} does not divide; choose a group that divides every "
                                     "targeted layer's input width"))
        if self.needs_data():
            ctx.require_calibration("qbb_quant")
        empty = ctx.program.empty_cache
        config = self.config_dict()
        config.pop("checkpoint_dir")
        model_digest = graph_digest(gm)
        data = ctx.calibration if self.needs_data() else []
        root = os.path.expanduser(self.checkpoint_dir or os.path.join(cache_dir(), "qbb_quant"))
        stage12 = {k: config[k] for k in ("bases", "group", "stages", "refine", "rounds", "gd_steps", "gd_lr",
                                          "objective", "outliers", "start", "start_bits", "start_group",
                                          "targets")}
        stage12["stages"] = "2" in self.stages
        run12 = tensor_digest(data if (self.start == "gptq" or self.objective != "weight") else [],
                              f"{model_digest} {sorted(stage12.items())}")[:16]
        uses_grams = self.start == "gptq" or self.objective != "weight"
        state, mstats = self._quantize_matrices(gm, linears, ctx, root, model_digest, uses_grams,
                                                os.path.join(root, f"bases-{run12}.pt"), run12)
        seconds = {"stages_1_2": round(time.perf_counter() - t0, 1)}
        sstats = None
        if "3" in self.stages:
            t1 = time.perf_counter()
            sstats = self._stage3(gm, ctx, state, empty, root, run12)
            seconds["stage_3"] = round(time.perf_counter() - t1, 1)
        shapes = [tuple(get_attr_tensor(gm, n.args[1]).shape) for n in linears]
        self._rewrite(gm, linears, state)
        n_weights = sum(N * K for N, K in shapes)
        bpw = sum(self.bits_per_weight(K) * N * K for N, K in shapes) / n_weights
        errs1 = [m["error_stage1"] for m in mstats.values()]
        errs = [m["error"] for m in mstats.values()]
        stats = {"quantized": len(state), "weights": n_weights, "bits_per_weight": round(bpw, 4),
                 "mean_relative_error_stage1": round(sum(errs1) / len(errs1), 5),
                 "mean_relative_error": round(sum(errs) / len(errs), 5), "error_metric": self.objective,
                 "matrices": mstats, "scale_calibration": sstats, "seconds": seconds, "run": run12}
        log(f"qbb_quant: {len(state)} matrices at {bpw:.3f} bits/weight, mean relative {self.objective} error "
            f"{stats['mean_relative_error_stage1']:.4f} (stage 1) -> {stats['mean_relative_error']:.4f}"
            + (f", scale loss {sstats['loss_first']} -> {sstats['loss_last']}" if sstats else ""))
        return PassResult(gm, True, stats)

    def _start_weight(self, W: torch.Tensor, H: torch.Tensor | None) -> torch.Tensor:
        if self.start == "fp":
            return W.detach().float()
        codes, scales, zeros = gptq_quantize(W.float(), H.double(), self.start_bits, self.start_group, damp=0.01,
                                             act_order=True)
        return nbits_dequantize(codes, scales, zeros, W.shape[1], self.start_bits, self.start_group).float()

    def _quantize_matrices(self, gm, linears, ctx, root, model_digest, uses_grams, path, fingerprint):
        """Stages 1-2 for every targeted matrix; resumable (a checkpoint after every decoder layer).

        With `uses_grams`, each matrix gets its input's XᵀX / tokens, recorded one decoder layer at a
        time (`stream_grams`, each layer's part kept under `root`) and used as soon as its layer's part
        exists, so only one layer's matrices are held at once."""
        saved = load_checkpoint(path, fingerprint, "qbb_quant")
        state = dict(saved["state"]) if saved else {}
        mstats = dict(saved["stats"]) if saved else {}
        if state:
            log(f"qbb_quant: {len(state)} of {len(linears)} matrices from {path}")
        todo = [n for n in linears if n.args[1].target not in state]
        if not todo:
            return state, mstats
        plan = RefinePlan(mode=self.refine, rounds=self.rounds, steps=self.gd_steps, lr=self.gd_lr)
        parts, tokens = [None], 1  # without statistics, one part holding every matrix
        if uses_grams:
            watch = {n: n.args[0].name for n in linears}
            fp = tensor_digest(ctx.calibration, f"{model_digest} grams {self.targets}")[:16]
            parts = stream_grams(gm, watch, ctx.calibration, ctx.program.empty_cache, ctx.progress,
                                 label="qbb_quant", checkpoint_dir=root, fingerprint=fp)
            tokens = sum(b.numel() for b in ctx.calibration)
        with bar(total=len(todo), desc="qbb_quant bases", unit="matrix", enabled=ctx.progress) as pbar:
            for grams in parts:
                ready = [n for n in todo if grams is None or n.args[0].name in grams]
                last_layer = None
                for n in ready:
                    t = n.args[1].target
                    layer = re.search(r"layers\.(\d+)\.", t)
                    layer = layer.group(1) if layer else None
                    if last_layer is not None and layer != last_layer:
                        save_checkpoint(path, fingerprint, state=state, stats=mstats)
                    last_layer = layer
                    H = grams[n.args[0].name] / tokens if grams is not None else None
                    state[t], mstats[t] = quantize_matrix(self, get_attr_tensor(gm, n.args[1]), H, plan)
                    pbar.update(1)
                if ready:
                    save_checkpoint(path, fingerprint, state=state, stats=mstats)
                todo = [n for n in todo if n.args[1].target not in state]
                if not todo:
                    break  # the head's part, which holds no targeted linear, is not recorded
        if todo:
            raise PassError(f"qbb_quant: calibration saw the inputs of only some targeted linears "
                            f"({module_fqn(todo[0])} was not reached)")
        return state, mstats

    def _stage3(self, gm, ctx, state, empty, root, run12) -> dict:
        teacher = graph_teacher(gm, empty)
        plan = ScalePlan(steps=self.scale_steps, batch_size=self.scale_batch, lr=self.scale_lr, loss=self.scale_loss,
                         seed=ctx.seed, sign_change=self.sign_change, sign_step=self.sign_step,
                         norms=self.scale_norms,
                         amp=self.scale_amp == "on" or self.scale_amp == "auto" and native_bf16())
        dense = {t: {"B": _unpack(s["signs"]).to(torch.int8), "scales": s["scales"],
                     "outliers": (s["outlier_index"], s["outlier_values"]) if "outlier_index" in s else None}
                 for t, s in state.items()}
        student = Student(gm, dense, empty, norms=self.scale_norms)
        what = f"{run12} {self.scale_data} {self.scale_samples} {self.scale_candidates} {self.scale_len} {ctx.seed}"
        if self.scale_data == "generated":
            rows = self._generated(gm, ctx, empty, root, what)
            rows, scores = most_divergent(student, teacher, rows, self.scale_samples, self.scale_loss, ctx.progress)
        else:
            from llmc.data import calibration_batches, sha256

            if ctx.program is None or ctx.program.tokenizer is None:
                raise ConfigError("qbb_quant.scale_data names a data set, which needs the model's tokenizer; "
                                  "use scale_data=generated")
            what += " " + sha256(self.scale_data)
            rows = torch.cat(calibration_batches(ctx.program.tokenizer, self.scale_data, self.scale_samples,
                                                 self.scale_len, seed=ctx.seed + 1))
            scores = None
        fingerprint = tensor_digest([rows], f"{what} {plan}")[:16]
        stats = calibrate_scales(student, teacher, rows, plan, ctx.progress,
                                 os.path.join(root, f"scales-{fingerprint}.pt"), fingerprint)
        for t in state:
            state[t]["scales"] = student.scales(t).detach().clone()
            if self.sign_change:
                state[t]["signs"] = pack_signs(student.signs[t])
        for n in student.norms:
            set_attr_tensor(gm, n, student.scales(n).detach().to(attr_tensor(gm, n).dtype))
        stats["data"] = self.scale_data
        if scores is not None:
            stats["kept_scores"] = scores
        return stats

    def _generated(self, gm, ctx, empty, root, what) -> torch.Tensor:
        """`scale_candidates` sequences of `scale_len` tokens sampled by the FP graph, each from one random token."""
        from llmc.generation import sample_windows

        vocab = int(ctx.program.config.vocab_size) if ctx.program is not None else None
        gen = torch.Generator().manual_seed(ctx.seed + 7)
        firsts = torch.randint(0, vocab, (self.scale_candidates, 1), generator=gen)
        fingerprint = tensor_digest([firsts], f"{graph_digest(gm)} {what}")[:16]

        @torch.no_grad()
        def step(ids, mask, pos, past):
            return gm(ids, mask, pos, past)

        return sample_windows(step, empty, firsts, self.scale_len, ctx.seed + 7, path=os.path.join(
            root, f"generated-{fingerprint}.pt"), fingerprint=fingerprint, progress=ctx.progress)

    def _rewrite(self, gm: fx.GraphModule, linears: list[fx.Node], state: dict) -> None:
        for node in linears:
            s = state[node.args[1].target]
            emit_binary_bases(gm, node, s["signs"], s["scales"].to(torch.float16),
                              (s["outlier_index"], s["outlier_values"]) if "outlier_index" in s else None)
        remove_unused_attrs(gm)
        gm.recompile()


def _unpack(signs: torch.Tensor) -> torch.Tensor:
    from llmc.ops.binary_bases import unpack_signs

    return unpack_signs(signs)


def quantize_matrix(p: QBBQuant, W: torch.Tensor, H: torch.Tensor | None, plan: RefinePlan) -> tuple[dict, dict]:
    """Stages 1 (and 2 if chosen) for one matrix: ({signs: packed uint8, scales: float32[, outlier_index: int16
    [N, k], outlier_values: float16 [N, k]]}, stats). Errors include the outliers' correction."""
    W0 = p._start_weight(W, H)
    K = W0.shape[1]
    G = K // p.group if p.group else 1
    Hm = H if p.objective == "input" else H.diagonal().clone() if p.objective == "diag" else None
    target = W0
    idx = None
    if p.outliers:
        # by magnitude, or by output energy (|w| times the input's RMS) when the error is weighted by inputs
        idx = row_outliers(W0 if Hm is None else W0 * Hm.diagonal().float().sqrt() if Hm.dim() == 2
                           else W0 * Hm.float().sqrt(), p.outliers)
        target = W0.scatter(1, idx, 0.0)  # the bases fit the rest; the kept values absorb what they leave there
    B, S, R = cascaded_init(target, p.bases, G)
    kept = W0  # what the kept positions store (stage 2 by gptq rounding sets its error-fed values there)

    def full(B, S):
        What = approx(B, S)
        if idx is None:
            return What, None
        vals = (kept.gather(1, idx) - What.gather(1, idx)).half()
        return What.scatter_add(1, idx, vals.float()), vals

    e1 = relative_error(W0, full(B, S)[0], Hm)
    stats = {"error_stage1": round(e1, 6)}
    if "2" in p.stages and p.refine == "gptq":
        keep = None if idx is None else torch.zeros_like(W0, dtype=torch.bool).scatter(1, idx, True)
        importance = None if Hm is None else Hm.diagonal() if Hm.dim() == 2 else Hm
        joint = refine_joint(W0, grid_scales(target, p.bases, G, importance), p.rounds, Hm, keep, best=e1)
        if joint is None:  # stage 1 stays: stage 2 never raises the layer's error
            stats["errors"] = [round(e1, 6)]
        else:
            B, S, Q, errors = joint
            stats["errors"] = [round(e1, 6)] + [round(e, 6) for e in errors]
            if idx is not None:  # the kept values make those positions the rounding's (error-fed) values
                kept = W0.scatter(1, idx, Q.gather(1, idx))
    elif "2" in p.stages:
        B, S, errors = refine(target, B, S, R, plan, Hm)
        stats["errors"] = [round(e, 6) for e in errors]
    What, vals = full(B, S)
    stats["error"] = round(relative_error(W0, What, Hm), 6)
    stats["max_abs_error"] = round(float((W0 - What).abs().max()), 5)
    if p.start != "fp":  # the error against the FP weight, which the start only approximates
        stats["error_to_fp"] = round(relative_error(W.detach().float(), What, Hm), 6)
    out = {"signs": pack_signs(B), "scales": S.float()}
    if idx is not None:
        out.update(outlier_index=idx.to(torch.int16), outlier_values=vals)
    return out, stats


def emit_binary_bases(gm: fx.GraphModule, node: fx.Node, signs: torch.Tensor, scales: torch.Tensor,
                      outliers: tuple[torch.Tensor, torch.Tensor] | None = None) -> fx.Node:
    """Replace the `aten.linear` `node` by `llmc::binary_bases_linear` over `<module>.signs/scales`.

    With `outliers` (column indices int16 [N, k], values float16 [N, k]), adds Σ_j values[n, j] · x[..., index[n, j]]
    to output n: a gather of the inputs, a multiply and a sum over k (standard ops in every backend).
    """
    x, w_node = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    module = w_node.target.rpartition(".")[0]
    tensors = [("signs", signs), ("scales", scales)]
    if outliers is not None:
        tensors += [("outlier_index", outliers[0]), ("outlier_values", outliers[1])]
    attrs = {}
    for leaf, t in tensors:
        set_attr_tensor(gm, f"{module}.{leaf}", t.detach().contiguous(), parameter=False)
        with gm.graph.inserting_before(node):
            attrs[leaf] = gm.graph.get_attr(f"{module}.{leaf}")
    new_nodes = []
    with gm.graph.inserting_before(node):
        y = gm.graph.call_function(torch.ops.llmc.binary_bases_linear.default, (x, attrs["signs"], attrs["scales"]))
        out = y
        if outliers is not None:
            N, k = outliers[0].shape
            flat = gm.graph.call_function(aten.view.default, (attrs["outlier_index"], [N * k]))
            idx = gm.graph.call_function(aten._to_copy.default, (flat,), {"dtype": torch.int64})
            picked = gm.graph.call_function(aten.index_select.default, (x, -1, idx))
            picked = gm.graph.call_function(aten.unflatten.int, (picked, -1, [N, k]))
            vals = gm.graph.call_function(aten._to_copy.default, (attrs["outlier_values"],), {"dtype": torch.float32})
            prod = gm.graph.call_function(aten.mul.Tensor, (picked, vals))
            corr = gm.graph.call_function(aten.sum.dim_IntList, (prod, [-1]))
            out = gm.graph.call_function(aten.add.Tensor, (y, corr))
            new_nodes += [flat, idx, picked, vals, prod, corr]
        if bias is not None:
            out = gm.graph.call_function(aten.add.Tensor, (out, bias))
    for new in {y, out, *attrs.values(), *new_nodes}:
        new.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
    y.meta["val"] = node.meta.get("val")
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return out
