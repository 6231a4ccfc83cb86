"""fold_norm_scales: fold RMSNorm gains into the linear layers that read the norm's output.

RMSNorm computes g ⊙ x/rms(x). When every reader of that output is a linear layer W, then
W (g ⊙ y) = (W diag(g)) y, so the gain can move into W's columns and the norm becomes a pure
normalisation. This is exact up to float rounding, and it is what rotation- and outlier-based
quantizers assume (the norm gain no longer distorts the input statistics of the next linear).
Tied weights (an lm_head shared with the embedding) are left alone: folding would change both.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import fx

from llmc.errors import ConfigError
from llmc.graph import get_attr_tensor, module_fqn, remove_unused_attrs, set_attr_tensor, shares_storage
from llmc.passes_base import Pass, PassContext, PassResult, register_pass

logger = logging.getLogger(__name__)


@register_pass("fold_norm_scales")
@dataclass(frozen=True)
class FoldNormScales(Pass):
    """Fold the gain of each RMSNorm whose output feeds only linear layers into those linears.

    Matches: `aten.mul(get_attr gain, x)` traced inside a module whose FQN matches `norms`.
    Emits: nothing (the mul is removed; the readers' weights are rescaled). Numerics: exact.
    """

    norms: str = r"(^|\.)(input_layernorm|post_attention_layernorm|norm)$"

    requires = ("dense_linear_weights",)
    provides = ("unit_norm_gains",)

    def __post_init__(self):
        try:
            re.compile(self.norms)
        except re.error as e:
            raise ConfigError(f"fold_norm_scales.norms is not a valid regular expression: {e}") from None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        pattern = re.compile(self.norms)
        folded, skipped = [], {}
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not torch.ops.aten.mul.Tensor:
                continue
            fqn = module_fqn(node)
            if not pattern.search(fqn):
                continue
            gain_node = next((a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"), None)
            if gain_node is None or get_attr_tensor(gm, gain_node).dim() != 1:
                continue
            why = self._why_not(gm, node)
            if why:
                skipped[fqn] = why
                logger.debug("fold_norm_scales: %s not folded: %s", fqn, why)
                continue
            gain = get_attr_tensor(gm, gain_node)
            for user in node.users:
                w_node = user.args[1]
                w = get_attr_tensor(gm, w_node)
                set_attr_tensor(gm, w_node.target, w * gain.to(w.dtype)[None, :])
            x = node.args[1] if node.args[0] is gain_node else node.args[0]
            node.replace_all_uses_with(x)
            gm.graph.erase_node(node)
            folded.append(fqn)
        remove_unused_attrs(gm)
        gm.recompile()
        return PassResult(gm, bool(folded), {"folded": len(folded), "skipped": skipped})

    @staticmethod
    def _why_not(gm: fx.GraphModule, node: fx.Node) -> str:
        if not node.users:
            return "output unused"
        for user in node.users:
            if user.target is not torch.ops.aten.linear.default or user.args[0] is not node:
                return f"output read by {user.target} (not a linear input)"
            w = user.args[1]
            if not (isinstance(w, fx.Node) and w.op == "get_attr"):
                return "a reader's weight is not a stored tensor"
            if shares_storage(gm, w.target):
                return f"{w.target} is tied to {', '.join(shares_storage(gm, w.target))}"
        return ""
