"""pv_quant: additive vector quantization of linear weights (AQLM) fine-tuned with PV-Tuning.

Each decoder linear becomes `llmc::vq_linear` over M codebooks of 2^B codewords for input groups of
g weights, plus one scale per output row (default 2x8 g8: about 2.1 bits per weight). Three phases:

  1. one-shot AQLM calibration, streamed block by block (`calibrate.py`, `aq.py`):
     residual k-means, then codebook/scale Adam alternating with greedy code search on each
     layer's XᵀX-weighted output error, then block fine-tuning against the FP block's outputs;
  2. PV-Tuning (`tune.py`): `steps` steps of KL(teacher ‖ student) over calibration text,
     P step on codebooks/scales/norms, subspace linearised V step on codes (or `mode=ste`);
  3. the rewrite: aten.linear -> llmc::vq_linear with uint8 codes.

PV-Tuning does not care what the codes are: `format=scalar` runs the same three phases on uniform
groupwise codes (2/3/4/8 bits, a scale and zero point per `group` inputs) initialised by GPTQ with
act-order on the streamed XᵀX, tunes them the same way (scales as the continuous part, one weight
per V-step group), and emits `llmc::nbits_linear` (MatMulNBits when exported to ONNX).

Both long phases checkpoint under `checkpoint_dir` (by default `$LLMC_CACHE/pv_quant/<run>`, with
`~/.cache/llmc` for an unset $LLMC_CACHE; the run named by a digest of the graph, the data and every
option), so re-running an interrupted compile continues it; a finished phase is not repeated.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import fx

from llmc.calibration import graph_teacher, native_bf16, output_error
from llmc.errors import ConfigError
from llmc.fsutil import tensor_digest
from llmc.graph import get_attr_tensor, graph_digest, module_fqn, remove_unused_attrs, set_attr_tensor
from llmc.models import cache_dir
from llmc.ops.nbits_linear import SUPPORTED_BITS
from llmc.ops.vq import bits_per_weight, store_codes
from llmc.passes.pv_quant.aq import AQConfig
from llmc.passes.pv_quant.calibrate import FinetunePlan, calibrate
from llmc.passes.pv_quant.representations import scalar_from_packed, scalar_to_packed
from llmc.passes.pv_quant.tune import TunePlan, pv_tune
from llmc.passes_base import Pass, PassContext, PassResult, register_pass
from llmc.progress import log
from llmc.quantization import gptq_quantize
from llmc.rewrite import emit_nbits_linear, quantizable_linears

logger = logging.getLogger(__name__)
aten = torch.ops.aten


TUNE_WINDOW = 512  # tokens per PV-Tuning sequence
SELF_PROMPT = 8  # tune_data=self: prompt length in tokens


class VStep(NamedTuple):
    """The V step's settings (`TunePlan` fields of the same names)."""

    code_lr: float
    code_change: float
    code_select: str
    trust_ratio: float


# Each format's V-step defaults (why: PVQuant.v_step); the options' help names them from here.
V_STEP_DEFAULTS = {"aq": VStep(code_lr=0.02, code_change=0.01, code_select="scaled", trust_ratio=0.01),
                   "scalar": VStep(code_lr=0.01, code_change=0.0001, code_select="absolute", trust_ratio=0.0)}


def _defaults(field: str) -> str:
    return f"default: aq {getattr(V_STEP_DEFAULTS['aq'], field)}, scalar {getattr(V_STEP_DEFAULTS['scalar'], field)}"


@register_pass("pv_quant")
@dataclass(frozen=True)
class PVQuant(Pass):
    """Quantize decoder linears to additive codes (AQLM) and fine-tune them with PV-Tuning.

    Matches: `aten.linear` with a stored weight in a module whose FQN matches `targets`. Emits:
    `llmc::vq_linear` (+ `aten.add` for a bias). Numerics: lossy. Needs calibration data; the
    teacher for PV-Tuning is the FP model.
    """

    format: Literal["aq", "scalar"] = dataclasses.field(default="aq", metadata={
        "help": "aq: additive vector codes (vq_linear); scalar: GPTQ-initialised groupwise codes (nbits_linear)"})
    codebooks: int = dataclasses.field(default=2, metadata={"help": "M, codebooks summed per group (aq)"})
    bits: int = dataclasses.field(default=0, metadata={
        "help": "aq: each codebook has 2^bits codewords (default 8); scalar: bits per weight, 2/3/4/8 (default 4)"})
    group: int = dataclasses.field(default=0, metadata={
        "help": "input weights per code group (aq, default 8) or per scale (scalar, default 64)"})
    kmeans_iters: int = 30
    adam_steps: int = dataclasses.field(default=20, metadata={"help": "codebook Adam steps per epoch"})
    lr: float = 3e-4
    max_epochs: int = dataclasses.field(default=6, metadata={"help": "calibration epochs per matrix"})
    tol: float = dataclasses.field(default=0.01, metadata={"help": "stop a matrix when an epoch gains less"})
    ft_epochs: int = dataclasses.field(default=2, metadata={"help": "block fine-tuning epochs"})
    ft_lr: float = 1e-4
    steps: int = dataclasses.field(default=120, metadata={"help": "PV-Tuning steps (0: calibration only)"})
    batch_size: int = dataclasses.field(default=2, metadata={"help": "sequences per PV-Tuning step"})
    micro_batch: int = dataclasses.field(default=8, metadata={
        "help": "sequences per forward/backward pass; a larger batch_size accumulates gradients over "
                "micro-batches (bounds memory: SmolLM2-135M takes about 1.3 GB per 512-token sequence)"})
    tune_lr: float = 3e-4
    code_lr: float | None = dataclasses.field(default=None, metadata={
        "help": f"LAMB rate of the V step's straight-through buffers ({_defaults('code_lr')})"})
    code_change: float | None = dataclasses.field(default=None, metadata={
        "help": f"fraction of code groups re-encoded per V step ({_defaults('code_change')})"})
    code_select: Literal["scaled", "absolute"] | None = dataclasses.field(default=None, metadata={
        "help": "how the V step ranks code groups by how far their straight-through buffer moved: in units of "
                f"the group's scale (scaled) or of weight (absolute, AQLM's reference); {_defaults('code_select')}"})
    trust_ratio: float | None = dataclasses.field(default=None, metadata={
        "help": f"V-step trust region, a fraction of ||W|| ({_defaults('trust_ratio')})"})
    mode: Literal["pv", "ste"] = "pv"
    amp: Literal["auto", "on", "off"] = dataclasses.field(default="auto", metadata={
        "help": "bfloat16 autocast in PV-Tuning; auto: on where oneDNN has native bf16 kernels (AVX-512, AMX), "
                "off elsewhere (on AVX2 a bf16 matmul is about 7x slower than float32)"})
    tune_samples: int = dataclasses.field(default=256, metadata={
        "help": f"sequences of {TUNE_WINDOW} tokens drawn from tune_data for PV-Tuning (0: the calibration batches)"})
    tune_data: str = dataclasses.field(default="wikitext2-valid", metadata={
        "help": "data set or file of the PV-Tuning windows, or 'self': text the model writes itself before "
                f"quantization, sampled from {SELF_PROMPT}-token prompts cut from the calibration batches"})
    lr_schedule: Literal["constant", "cosine"] = dataclasses.field(default="constant", metadata={
        "help": "PV-Tuning learning rates (tune_lr, code_lr): constant, or a cosine decay to 0 over the steps"})
    tune_extra: str = dataclasses.field(default="", metadata={
        "help": "regex of non-quantized parameters PV-Tuning also tunes, besides the norms (e.g. embed_tokens)"})
    clip_grid: int = dataclasses.field(default=0, metadata={
        "help": "scalar: GPTQ picks each group's range among this many shrink ratios down to 0.5, by "
                "XᵀX-diagonal-weighted rounding error (0: min/max)"})
    targets: str = r"layers\.\d+\.(self_attn|mlp)\."
    checkpoint_dir: str | None = None

    requires = ("dense_linear_weights", "calibration")
    invalidates = ("dense_linear_weights",)
    provides = ("pv_quantized_weights",)

    def __post_init__(self):
        if self.format not in ("aq", "scalar"):
            raise ConfigError(f"pv_quant.format must be aq or scalar, got '{self.format}'")
        bits, group = self.resolved()
        if self.format == "aq" and not 1 <= bits <= 8:
            raise ConfigError(f"pv_quant.bits must be in 1..8 for aq (uint8 codes; 2^16-entry codebooks outgrow "
                              f"small layers), got {bits}")
        if self.format == "scalar" and bits not in SUPPORTED_BITS:
            raise ConfigError(f"pv_quant.bits must be one of {', '.join(map(str, SUPPORTED_BITS))} for scalar "
                              f"(MatMulNBits), got {bits}")
        if self.format == "aq" and self.clip_grid:
            raise ConfigError("pv_quant.clip_grid applies to format=scalar (GPTQ's group ranges); aq codes have none")
        if self.format == "scalar" and (group < 16 or group & (group - 1)):
            raise ConfigError(f"pv_quant.group must be a power of two >= 16 for scalar (MatMulNBits blocks), "
                              f"got {group}")
        for name, low in (("codebooks", 1), ("bits", 0), ("group", 0), ("kmeans_iters", 1), ("adam_steps", 0),
                          ("max_epochs", 0), ("ft_epochs", 0), ("steps", 0), ("batch_size", 1), ("micro_batch", 1),
                          ("tune_samples", 0), ("clip_grid", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"pv_quant.{name} must be >= {low}, got {getattr(self, name)}")
        if self.code_select not in (None, "scaled", "absolute"):
            raise ConfigError(f"pv_quant.code_select must be scaled or absolute, got '{self.code_select}'")
        v = self.v_step()
        for name, value in (("lr", self.lr), ("ft_lr", self.ft_lr), ("tune_lr", self.tune_lr), ("code_lr", v.code_lr)):
            if value <= 0:
                raise ConfigError(f"pv_quant.{name} must be > 0, got {value}")
        if not 0 < v.code_change <= 1:
            raise ConfigError(f"pv_quant.code_change is a fraction of code groups in (0, 1], got {v.code_change}")
        if v.trust_ratio < 0 or not 0 <= self.tol < 1:
            raise ConfigError(f"pv_quant.trust_ratio must be >= 0 and tol in [0, 1), got {v.trust_ratio}, {self.tol}")
        if self.mode not in ("pv", "ste"):
            raise ConfigError(f"pv_quant.mode must be pv or ste, got '{self.mode}'")
        if self.amp not in ("auto", "on", "off"):
            raise ConfigError(f"pv_quant.amp must be auto, on or off, got '{self.amp}'")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"pv_quant.lr_schedule must be constant or cosine, got '{self.lr_schedule}'")
        for name in ("targets", "tune_extra"):
            try:
                re.compile(getattr(self, name))
            except re.error as e:
                raise ConfigError(f"pv_quant.{name} is not a valid regular expression: {e}") from None

    def resolved(self) -> tuple[int, int]:
        """(bits, group) with the format's defaults filled in."""
        if self.format == "aq":
            return self.bits or 8, self.group or 8
        return self.bits or 4, self.group or 64

    def v_step(self) -> VStep:
        """The V step's settings, each left unset filled in with the format's default
        (`V_STEP_DEFAULTS`; docs/passes/pv_quant.md has the measurements that chose them).

        Vector codes: buffers at code_lr 0.02, the top 1% of groups in their own grid, trust 1%.
        Scalar codes: an almost frozen V step (code_lr 0.01, 0.0001 of the weights ranked by plain
        distance, no trust region), as one code change moves a weight by a whole quantization step."""
        chosen = {f: getattr(self, f) for f in VStep._fields if getattr(self, f) is not None}
        return V_STEP_DEFAULTS[self.format]._replace(**chosen)

    def aq_config(self) -> AQConfig:
        bits, group = self.resolved()
        return AQConfig(self.codebooks, bits, group, self.kmeans_iters, self.adam_steps, self.lr,
                        self.max_epochs, self.tol)

    def bits_per_weight(self, N: int, K: int) -> float:
        """AQLM's accounting (16-bit codebooks and scales); scalar: codes, a 16-bit scale and a zero per group."""
        bits, group = self.resolved()
        if self.format == "aq":
            return bits_per_weight(N, K, self.codebooks, bits, group)
        return bits + (16 + bits) / group

    def _quantizer(self, seed: int):
        if self.format == "aq":
            return dataclasses.replace(self.aq_config(), seed=seed)
        bits, group = self.resolved()

        def quantize(W, A, seed):
            packed = gptq_quantize(W, A.double(), bits, group, damp=0.01, act_order=True, clip_grid=self.clip_grid)
            q = scalar_from_packed(*packed, W.shape[1], bits, group)
            err = float(output_error(W, q.weight(), A) / output_error(W, torch.zeros_like(W), A))
            return q, {"relative_error": [round(err, 6)]}

        return quantize

    def tune_plan(self, seed: int) -> TunePlan:
        return TunePlan(steps=self.steps, batch_size=self.batch_size, micro_batch=self.micro_batch, lr=self.tune_lr,
                        **self.v_step()._asdict(), mode=self.mode,
                        amp=self.use_amp(), schedule=self.lr_schedule, extra=self.tune_extra, seed=seed)

    def use_amp(self) -> bool:
        """Whether PV-Tuning runs under bfloat16 autocast (`amp`, with auto resolved on this CPU)."""
        if self.amp == "auto":
            return native_bf16()
        return self.amp == "on"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        t0 = time.perf_counter()
        linears = quantizable_linears(gm, self.targets, lm_head=False)
        if not linears:
            logger.debug("pv_quant: no linear matches %r", self.targets)
            return PassResult(gm, False, {"quantized": 0})
        bits, group = self.resolved()
        for n in linears:
            K = get_attr_tensor(gm, n.args[1]).shape[1]
            if K % group:
                raise ConfigError(f"pv_quant.group={group} does not divide the input size {K} of "
                                  f"{module_fqn(n)}; choose a group that divides every targeted layer's inputs")
        ctx.require_calibration("pv_quant")
        empty = ctx.program.empty_cache
        config = self.config_dict()
        config.pop("checkpoint_dir")
        model_digest = graph_digest(gm)
        tune_digest = ""
        if self.steps > 0 and self.tune_samples and self.tune_data != "self":  # windows drawn from this file
            from llmc.data import sha256

            tune_digest = sha256(self.tune_data)
        run_id = tensor_digest(ctx.calibration,  # amp resolved: auto means different numerics on other CPUs
                               f"{model_digest} {sorted(config.items())} {ctx.seed} {tune_digest} "
                               f"amp={self.use_amp()}")[:16]
        root = os.path.expanduser(self.checkpoint_dir or os.path.join(cache_dir(), "pv_quant"))
        folder = os.path.join(root, run_id)
        teacher = ctx.teacher
        if self.steps > 0 and teacher is None:
            teacher = graph_teacher(gm, empty)
        written = None  # sampled before calibration: the graph is still the FP model here
        if self.steps > 0 and self.tune_samples and self.tune_data == "self":
            written = self._self_written(gm, ctx, empty, model_digest, root)
        targets = {n.args[1].target for n in linears}
        clip = f" clip {self.clip_grid}" if self.clip_grid > 1 else ""  # min/max runs keep their old ids
        what = self.aq_config() if self.format == "aq" else f"scalar gptq {bits} {group}{clip}"
        calib_id = tensor_digest(ctx.calibration, f"{model_digest} {what} {self.ft_epochs} {self.ft_lr} "
                                                  f"{self.targets} {ctx.seed}")[:16]
        state, cstats = calibrate(gm, ctx.calibration, empty, targets.__contains__, self._quantizer(ctx.seed),
                                  FinetunePlan(self.ft_epochs, self.ft_lr, ctx.seed), ctx.progress,
                                  os.path.join(root, "calibration-" + calib_id), calib_id, self.format)
        seconds = {"calibration": round(time.perf_counter() - t0, 1)}
        tstats = None
        if self.steps > 0:
            t1 = time.perf_counter()
            batches = ctx.calibration
            if written is not None:
                batches = list(written.split(1))
            elif self.tune_samples:
                from llmc.data import calibration_batches

                batches = calibration_batches(ctx.program.tokenizer, self.tune_data, num_samples=self.tune_samples,
                                              seq_len=TUNE_WINDOW, seed=ctx.seed + 1)
            os.makedirs(folder, exist_ok=True)
            tstats = pv_tune(gm, state, teacher, batches, empty, self.tune_plan(ctx.seed), ctx.progress,
                             os.path.join(folder, "tuning.pt"), run_id)
            seconds["pv_tuning"] = round(time.perf_counter() - t1, 1)
        shapes = [tuple(get_attr_tensor(gm, n.args[1]).shape) for n in linears]
        self._rewrite(gm, linears, state)
        n_weights = sum(N * K for N, K in shapes)
        bpw = sum(self.bits_per_weight(N, K) * N * K for N, K in shapes) / n_weights
        errs = [m["relative_error"][-1] for b in cstats["blocks"] for m in b["matrices"].values()]
        stats = {"quantized": len(state), "weights": n_weights, "bits_per_weight": round(bpw, 4),
                 "mean_relative_output_error": round(sum(errs) / len(errs), 5), "calibration": cstats,
                 "tuning": tstats, "seconds": seconds, "run": run_id}
        log(f"pv_quant: {len(state)} matrices at {bpw:.3f} bits/weight, mean relative output error "
            f"{stats['mean_relative_output_error']:.4f}" + (f", KL {tstats['kl_first']} -> {tstats['kl_last']}"
                                                            if tstats else ""))
        return PassResult(gm, True, stats)

    def _self_written(self, gm: fx.GraphModule, ctx: PassContext, empty, model_digest: str,
                      root: str) -> torch.Tensor:
        """`tune_samples` windows of `TUNE_WINDOW` tokens sampled from the graph itself (under the tuning's
        autocast), cached and resumable under `root`."""
        from llmc.data import prompt_slices
        from llmc.generation import sample_windows

        prompts = prompt_slices(ctx.calibration, self.tune_samples, SELF_PROMPT, seed=ctx.seed + 1)
        amp = self.use_amp()
        fingerprint = tensor_digest([prompts], f"{model_digest} {TUNE_WINDOW} {ctx.seed} amp={amp}")[:16]

        def step(ids, mask, pos, past):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                logits, present = gm(ids, mask, pos, past)
            return logits.float(), present

        t0 = time.perf_counter()
        rows = sample_windows(step, empty, prompts, TUNE_WINDOW, ctx.seed + 1, path=os.path.join(
            root, f"self-written-{fingerprint}.pt"), fingerprint=fingerprint, progress=ctx.progress)
        log(f"pv_quant: {rows.shape[0]} windows of {TUNE_WINDOW} tokens written by the model itself "
            f"({time.perf_counter() - t0:.0f} s)")
        return rows

    def _rewrite(self, gm: fx.GraphModule, linears: list[fx.Node], state) -> None:
        bits, group = self.resolved()
        for node in linears:
            q = state[node.args[1].target]
            if self.format == "scalar":
                emit_nbits_linear(gm, node, *scalar_to_packed(q), bits, group)
            else:
                self._emit_vq(gm, node, q, bits)
        remove_unused_attrs(gm)
        gm.recompile()

    @staticmethod
    def _emit_vq(gm: fx.GraphModule, node: fx.Node, q, bits: int) -> None:
        x, w_node = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        module = w_node.target.rpartition(".")[0]
        attrs = {}
        for leaf, t in (("codes", store_codes(q.codes, bits)), ("codebooks", q.codebooks.float()),
                        ("scales", q.scales.float())):
            set_attr_tensor(gm, f"{module}.{leaf}", t.detach().contiguous(), parameter=False)
            with gm.graph.inserting_before(node):
                attrs[leaf] = gm.graph.get_attr(f"{module}.{leaf}")
        with gm.graph.inserting_before(node):
            y = gm.graph.call_function(torch.ops.llmc.vq_linear.default,
                                       (x, attrs["codes"], attrs["codebooks"], attrs["scales"]))
            out = gm.graph.call_function(aten.add.Tensor, (y, bias)) if bias is not None else y
        for new in {y, out, *attrs.values()}:
            new.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
        y.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
