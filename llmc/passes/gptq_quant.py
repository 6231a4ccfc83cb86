"""gptq_quant: GPTQ (Frantar et al., ICLR 2023) blockwise scalar quantization of linear weights to 2/3/4/8 bits.

The second scalar representation beside `rtn_quant`, with the same output: `llmc::nbits_linear` in
ONNX Runtime's MatMulNBits layout (codes, one scale and one zero point per block of `group` inputs),
so everything downstream (size report, ONNX lowering to MatMulNBits) is unchanged. Only the codes
(and the scales, which are chosen on the updated weights) differ: GPTQ quantizes a linear's input
columns one at a time and spreads each column's rounding error over the columns not yet quantized,
weighted by the inverse Hessian of the layer's output error, H = XᵀX over calibration inputs. The
result minimises ‖(W − Ŵ)Xᵀ‖ far better than rounding each weight on its own when the inputs are
correlated, which they are in a trained model.

Column order: by default (`act_order`) the inputs with the largest XᵀX diagonal are quantized first,
while their error can still be absorbed by the most columns; the groups' scales and zero points are
then fixed before the permutation on the original contiguous groups ("static groups"), so the
layout and the kernel are those of rtn_quant (docs/passes/gptq_quant.md: what act-order buys).

Calibration statistics: from the FP graph, one decoder layer at a time. The float model's residual
stream runs block by block over the calibration batches (`llmc.calibration.stream_grams`); each
block records XᵀX of the input of its targeted linears (linears reading the same tensor, e.g. q/k/v
and gate/up, share one matrix), its linears are quantized against those FP inputs, and the
matrices are dropped before the next block, so memory holds one layer's statistics, not the
model's (float64 matrices: 1.4 GB a layer, 44 GB in all for a Llama-2-7B shape). The
reference implementation instead quantizes layer by layer and records each layer's statistics
from the already-quantized model before it (sequential), which costs one calibration pass per
decoder layer; the all-at-once variant does not see the upstream quantization error.

The algorithm itself is core code (`llmc.quantization.gptq_quantize`): pv_quant starts from it too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from torch import fx

from llmc.calibration import fingerprint, relative_output_error, stream_grams
from llmc.errors import ConfigError, PassError
from llmc.fsutil import tensor_digest
from llmc.graph import get_attr_tensor, graph_digest, remove_unused_attrs, shares_storage
from llmc.ops.nbits_linear import dequantize, quantize_rtn
from llmc.passes_base import Pass, PassContext, PassResult, register_pass
from llmc.progress import log
from llmc.quantization import gptq_quantize_damped
from llmc.rewrite import (check_scalar_layout, check_targets, emit_nbits_linear, quantizable_linears)

logger = logging.getLogger(__name__)


@register_pass("gptq_quant")
@dataclass(frozen=True)
class GPTQQuant(Pass):
    """Quantize linear weights to `bits` per block of `group` inputs with GPTQ on calibration statistics.

    Matches: `aten.linear` with a stored weight in a module whose FQN matches `targets` (and
    `lm_head` when `lm_head=true`), as rtn_quant. Emits: `llmc::nbits_linear` (+ `aten.add` for a
    bias). Needs calibration data: XᵀX of each targeted linear's input, recorded on the FP graph one
    layer at a time (not on the partly quantized model). `act_order` (default on)
    quantizes the inputs with the largest XᵀX diagonal first, with each group's scale and zero point
    fixed beforehand so the stored layout is unchanged. `clip_grid` > 1 picks each group's range among
    that many shrink ratios (`searched_group_params`) instead of min/max. With `checkpoint_dir` each
    layer's statistics are kept there under a fingerprint of the graph and the data, and a rerun
    resumes from them. Numerics: lossy.
    """

    bits: int = 4
    group: int = 64
    symmetric: bool = False
    damp: float = 0.01
    act_order: bool = True
    clip_grid: int = 0
    targets: str = r"layers\.\d+\.(self_attn|mlp)\."
    lm_head: bool = False
    checkpoint_dir: str | None = None

    requires = ("calibration", "dense_linear_weights")
    invalidates = ("dense_linear_weights",)
    provides = ("scalar_quantized_weights",)

    def __post_init__(self):
        check_scalar_layout("gptq_quant", self.bits, self.group)
        if self.clip_grid < 0:
            raise ConfigError(f"gptq_quant.clip_grid is a number of shrink ratios to try (0: none), got "
                              f"{self.clip_grid}")
        if not 0 < self.damp < 1:
            raise ConfigError(f"gptq_quant.damp is the fraction of the mean XᵀX diagonal added to it and must be in "
                              f"(0, 1), got {self.damp}")
        check_targets("gptq_quant", self.targets)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        nodes = quantizable_linears(gm, self.targets, self.lm_head)
        if not nodes:
            logger.debug("gptq_quant: no linear matches %r", self.targets)
            return PassResult(gm, False, {"quantized": 0, "weights": 0, "untied": []})
        ctx.require_calibration("gptq_quant")
        untied, errors, rtn_errors, damped = [], {}, {}, {}
        weights = 0
        seconds = {"calibration": 0.0, "quantize": 0.0}
        key_of = {n: n.args[0].name for n in nodes}  # a linear's input, as the statistics name it
        t0 = time.perf_counter()
        for grams in self._grams(gm, nodes, ctx):  # one layer's XᵀX at a time
            t1 = time.perf_counter()
            seconds["calibration"] += t1 - t0
            for node in [n for n in nodes if key_of[n] in grams]:
                w_node = node.args[1]
                weight = get_attr_tensor(gm, w_node).detach()
                if shares_storage(gm, w_node.target):
                    untied.append(w_node.target)  # the other user (the embedding) keeps the float tensor
                module = w_node.target.rpartition(".")[0]
                h = grams[key_of[node]]
                N, K = weight.shape
                codes, scales, zeros, used = gptq_quantize_damped(weight, h, self.bits, self.group, self.symmetric,
                                                                  self.damp, self.act_order, self.clip_grid, module)
                if used != self.damp:
                    damped[module] = used
                approx = dequantize(codes, scales, zeros, K, self.bits, self.group)
                errors[module] = round(relative_output_error(weight, approx, h), 6)
                rtn = quantize_rtn(weight, self.bits, self.group, self.symmetric)
                rtn_errors[module] = round(relative_output_error(weight, dequantize(*rtn, K, self.bits, self.group),
                                                                 h), 6)
                emit_nbits_linear(gm, node, codes, scales, zeros, self.bits, self.group)
                weights += N * K
            del grams
            t0 = time.perf_counter()
            seconds["quantize"] += t0 - t1
        if len(errors) != len(nodes):
            raise PassError(f"gptq_quant: calibration saw the inputs of {len(errors)} of the {len(nodes)} targeted "
                            "linears")
        remove_unused_attrs(gm)
        gm.recompile()
        stats = {"quantized": len(nodes), "weights": weights, "untied": untied,
                 "output_error": errors, "rtn_output_error": rtn_errors,
                 "output_error_mean": round(sum(errors.values()) / len(errors), 6),
                 "rtn_output_error_mean": round(sum(rtn_errors.values()) / len(rtn_errors), 6),
                 "damp_raised": damped,
                 "seconds": {k: round(v, 1) for k, v in seconds.items()}}
        return PassResult(gm, True, stats)

    def _grams(self, gm: fx.GraphModule, nodes: list[fx.Node], ctx: PassContext):
        """XᵀX (float64) of each linear's input over the calibration batches, keyed by the input's node
        name, one decoder layer at a time (`stream_grams`); with `checkpoint_dir`, each layer's part is
        kept there as it is made and reused by a rerun under the same fingerprint."""
        watch = {n: n.args[0].name for n in nodes}
        log(f"gptq_quant: recording XᵀX of {len(set(watch.values()))} linear inputs over "
            f"{len(ctx.calibration)} calibration batches, one layer at a time")
        fp = ""
        if self.checkpoint_dir:
            inputs = sorted(set(watch.values()))
            fp = fingerprint({"pass": "gptq_quant", "inputs": inputs}, graph_digest(gm), tensor_digest(ctx.calibration))
        return stream_grams(gm, watch, ctx.calibration, ctx.program.empty_cache, ctx.progress, label="gptq_quant",
                            checkpoint_dir=self.checkpoint_dir, fingerprint=fp)
