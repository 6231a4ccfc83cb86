"""int8_activations: run the scalar-quantized linears on int8 activations (integer dot products).

ONNX Runtime's MatMulNBits with `accuracy_level=4` rounds its input to int8 per block of
`block_size` along K (symmetric, scale = absmax/127) and multiplies the integer codes of input and
weight with int8 dot-product instructions, which on CPU decodes faster than dequantizing the
weight to float. This pass sets `int8_act` on every `llmc::nbits_linear`, so the Program itself
computes those numerics (the torch op rounds the input bit for bit as the kernel does) and its
perplexity in torch is the exported model's. The exported model is parity-checked statistically
(see `llmc.backends.onnxruntime.export.check_parity`: rounding ties make the two runtimes drift
apart token by token at depth). Apply it after the pass that emitted the scalar codes
(`rtn_quant`, `gptq_quant`, `pv_quant:format=scalar`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import fx

from llmc.graph import module_fqn
from llmc.ops.nbits_linear import int8_act_supported
from llmc.passes_base import Pass, PassContext, PassResult, register_pass
from llmc.rewrite import check_targets

logger = logging.getLogger(__name__)


@register_pass("int8_activations")
@dataclass(frozen=True)
class Int8Activations(Pass):
    """Round the input of each scalar-quantized linear to int8 per weight block.

    Matches: `llmc::nbits_linear` in a module whose FQN matches `targets` (`lm_head` included by
    the default) and whose bits and block size ONNX Runtime has an int8 kernel for (others, e.g.
    2-bit codes in blocks of 16, are left as they are and listed under `unsupported`). Emits: the same node with
    `int8_act=True`. Numerics: lossy (activation rounding).
    """

    targets: str = r"."

    def __post_init__(self):
        check_targets("int8_activations", self.targets)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        pattern = re.compile(self.targets)
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"
                 and n.target is torch.ops.llmc.nbits_linear.default and pattern.search(module_fqn(n) + ".")]
        unsupported = [module_fqn(n) for n in nodes if not int8_act_supported(n.args[6], n.args[7])]
        nodes = [n for n in nodes if int8_act_supported(n.args[6], n.args[7])]
        for node in nodes:
            node.args = tuple(node.args[:8]) + (True,)
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "int8_act"}
        if unsupported:
            logger.warning("int8_activations: ONNX Runtime has no int8 kernel for the codes of %d linears (%s, ...); "
                           "they keep float activations", len(unsupported), unsupported[0])
        elif not nodes:
            logger.warning("int8_activations: no llmc::nbits_linear matches %r; put it after rtn_quant, gptq_quant "
                           "or pv_quant:format=scalar", self.targets)
        gm.recompile()
        return PassResult(gm, bool(nodes), {"linears": len(nodes), "unsupported": unsupported})
