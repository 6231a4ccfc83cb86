"""Graph-rewrite helpers shared by passes: which linears a pass targets, and emitting quantized ops.

Targets are regular expressions over module FQNs (`layers\\.\\d+\\.mlp\\.`), matched against
`fqn + "."` so a pattern ending in a dot names a whole module subtree; the `lm_head` is only ever
targeted explicitly. Emitters replace one `aten.linear` / `aten.embedding` node by the llmc op over
tensors stored beside the original weight (`<module>.codes`, ...), copying the node's
`nn_module_stack` so later passes and the backends still know where the new nodes belong.
"""

from __future__ import annotations

import re

import torch
from torch import fx

import llmc.ops  # noqa: F401  (registers torch.ops.llmc.*)
from llmc.errors import ConfigError
from llmc.graph import get_attr_tensor, module_fqn, set_attr_tensor
from llmc.ops.nbits_linear import SUPPORTED_BITS


def embedding_lookups(gm: fx.GraphModule) -> list[fx.Node]:
    """The `aten.embedding` nodes that read a stored 2-D table."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.embedding.default
            and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr"]


def emit_nbits_embedding(gm: fx.GraphModule, node: fx.Node, module: str, K: int, bits: int, group: int) -> fx.Node:
    """Replace the `aten.embedding` `node` by `llmc::nbits_embedding` over `<module>.codes/scales/zero_points`."""
    with gm.graph.inserting_before(node):
        attrs = [gm.graph.get_attr(f"{module}.{leaf}") for leaf in ("codes", "scales", "zero_points")]
        out = gm.graph.call_function(torch.ops.llmc.nbits_embedding.default, (node.args[1], *attrs, K, bits, group))
    for new in (out, *attrs):
        new.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
    out.meta["val"] = node.meta.get("val")
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return out


def matches_target(fqn: str, targets: str, lm_head: bool) -> bool:
    """Whether the linear in module `fqn` is quantized: `targets` matches `fqn + "."`, or it is the
    `lm_head` and `lm_head` is set."""
    return bool(re.search(targets, fqn + ".")) or (lm_head and fqn.rpartition(".")[2] == "lm_head")


def quantizable_linears(gm: fx.GraphModule, targets: str, lm_head: bool) -> list[fx.Node]:
    """The `aten.linear` nodes with a stored weight whose module matches (see `matches_target`), in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default
            and isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr"
            and matches_target(module_fqn(n), targets, lm_head)]


def emit_nbits_linear(gm: fx.GraphModule, node: fx.Node, codes: torch.Tensor, scales: torch.Tensor,
                      zero_points: torch.Tensor, bits: int, group: int) -> fx.Node:
    """Replace the `aten.linear` `node` by `llmc::nbits_linear` over MatMulNBits-layout tensors (stored as
    `<module>.codes/scales/zero_points` buffers beside its weight), plus an `aten.add` for its bias.

    Returns the node now standing for the linear's output. The weight's get_attr stays in the graph
    until `remove_unused_attrs`.
    """
    x, w_node = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    N, K = get_attr_tensor(gm, w_node).shape
    module = w_node.target.rpartition(".")[0]
    attrs = {}
    for leaf, t in (("codes", codes), ("scales", scales), ("zero_points", zero_points)):
        set_attr_tensor(gm, f"{module}.{leaf}", t, parameter=False)
        with gm.graph.inserting_before(node):
            attrs[leaf] = gm.graph.get_attr(f"{module}.{leaf}")
    with gm.graph.inserting_before(node):
        y = gm.graph.call_function(
            torch.ops.llmc.nbits_linear.default,
            (x, attrs["codes"], attrs["scales"], attrs["zero_points"], K, N, bits, group))
        out = gm.graph.call_function(torch.ops.aten.add.Tensor, (y, bias)) if bias is not None else y
    for new in {y, out, *attrs.values()}:
        new.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
    y.meta["val"] = node.meta.get("val")
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return out


def check_targets(pass_name: str, targets: str) -> None:
    """ConfigError unless a pass's `targets` option is a valid regular expression."""
    try:
        re.compile(targets)
    except re.error as e:
        raise ConfigError(f"{pass_name}.targets is not a valid regular expression: {e}") from None


def check_scalar_layout(pass_name: str, bits: int, group: int) -> None:
    """ConfigError unless (bits, group) is a scalar layout `llmc::nbits_linear` stores (MatMulNBits' blocks)."""
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"{pass_name}.bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits}")
    if group < 16 or group & (group - 1):
        raise ConfigError(f"{pass_name}.group must be a power of two >= 16 (MatMulNBits blocks), got {group}")
