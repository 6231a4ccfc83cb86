"""rtn_quant: round-to-nearest blockwise scalar quantization of linear weights to 2/3/4/8 bits.

The baseline scalar representation: each block of `group` weights along the input dim gets a
scale (and a zero point unless symmetric), codes are packed in ONNX Runtime's MatMulNBits layout
(`llmc::nbits_linear`), so the ONNX backend lowers them to MatMulNBits and the codes stay uint8
in the file and in the session.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import fx

from llmc.graph import get_attr_tensor, module_fqn, remove_unused_attrs, set_attr_tensor, shares_storage
from llmc.ops.nbits_linear import quantize_rtn
from llmc.passes_base import Pass, PassContext, PassResult, register_pass
from llmc.progress import bar
from llmc.rewrite import (check_scalar_layout, check_targets, emit_nbits_embedding, emit_nbits_linear, embedding_lookups, quantizable_linears)

logger = logging.getLogger(__name__)


@register_pass("rtn_quant")
@dataclass(frozen=True)
class RTNQuant(Pass):
    """Quantize linear weights to `bits` with round-to-nearest per block of `group` inputs.

    Matches: `aten.linear` with a stored weight in a module whose FQN matches `targets` (and
    `lm_head` when `lm_head=true`); with `embeddings=true` also every `aten.embedding` of a stored
    table. Emits: `llmc::nbits_linear` (+ `aten.add` for a bias) and `llmc::nbits_embedding`
    (GatherBlockQuantized in ONNX); an embedding tied to a quantized lm_head reads the lm_head's
    codes, so the shared table is stored once. Numerics: lossy.
    """

    bits: int = 4
    group: int = 64
    symmetric: bool = False
    targets: str = r"layers\.\d+\.(self_attn|mlp)\."
    lm_head: bool = False
    embeddings: bool = False

    invalidates = ("dense_linear_weights",)
    provides = ("scalar_quantized_weights",)

    def __post_init__(self):
        check_scalar_layout("rtn_quant", self.bits, self.group)
        check_targets("rtn_quant", self.targets)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        nodes = quantizable_linears(gm, self.targets, self.lm_head)
        untied, embeddings = [], []
        weights = 0
        emitted = {}  # (storage, shape) of a quantized weight -> the module holding its codes
        for node in bar(nodes, desc="rtn_quant", unit="linear", enabled=ctx.progress):
            w_node = node.args[1]
            weight = get_attr_tensor(gm, w_node)
            if shares_storage(gm, w_node.target):
                untied.append(w_node.target)  # the other user (the embedding) keeps the float tensor
            N, K = weight.shape
            codes, scales, zeros = quantize_rtn(weight, self.bits, self.group, self.symmetric)
            emit_nbits_linear(gm, node, codes, scales, zeros, self.bits, self.group)
            emitted[(weight.untyped_storage().data_ptr(), tuple(weight.shape))] = w_node.target.rpartition(".")[0]
            weights += N * K
        if self.embeddings:
            for node in embedding_lookups(gm):
                table = get_attr_tensor(gm, node.args[0])
                module = emitted.get((table.untyped_storage().data_ptr(), tuple(table.shape)))
                if module is None:  # not tied to a linear quantized above: quantize the table itself
                    module = node.args[0].target.rpartition(".")[0]
                    for leaf, t in zip(("codes", "scales", "zero_points"),
                                       quantize_rtn(table, self.bits, self.group, self.symmetric)):
                        set_attr_tensor(gm, f"{module}.{leaf}", t, parameter=False)
                    weights += table.numel()
                else:
                    untied = [t for t in untied if t != f"{module}.weight"]  # tied again, through the codes
                emit_nbits_embedding(gm, node, module, table.shape[1], self.bits, self.group)
                embeddings.append(module_fqn(node))
        remove_unused_attrs(gm)
        gm.recompile()
        stats = {"quantized": len(nodes), "weights": weights, "untied": untied, "embeddings": embeddings}
        if not nodes:
            logger.debug("rtn_quant: no linear matches %r", self.targets)
        return PassResult(gm, bool(nodes), stats)
