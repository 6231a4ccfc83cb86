"""Binary bases and their kept outliers as one op: `fuse_bases_outliers(gm)` for the ONNX export.

qbb_quant with `outliers=k` writes each layer as llmc::binary_bases_linear plus a correction
Σ_j values[n, j] · x[index[n, j]] in standard ops (an index_select of the inputs, a multiply, a sum
and an add: five small ONNX nodes a layer). `fuse_bases_outliers` finds that pattern in a copy of
the graph and puts `llmc::binary_bases_linear_outliers` in its place (the same function), which the
kernel lowering writes as one llmc.BinaryBasesLinear node with the outliers as two more inputs.
"""

from __future__ import annotations

import torch
from torch import fx

from llmc.graph import is_call, replace_in_copy

aten = torch.ops.aten
_RESHAPES = (aten.view.default, aten.reshape.default, aten.unflatten.int, aten._unsafe_view.default,
             aten._to_copy.default, aten.clone.default)


def _through_reshapes(node):
    """The node under any chain of reshapes and dtype copies."""
    while is_call(node, *_RESHAPES):
        node = node.args[0]
    return node


def _site(add: fx.Node):
    """(x, signs, scales, index, values) when `add` is binary_bases_linear(x, ...) + Σ values·x[index], else None."""
    if not is_call(add, aten.add.Tensor) or len(add.args) != 2:
        return None
    for y, corr in (add.args, add.args[::-1]):
        if not is_call(y, torch.ops.llmc.binary_bases_linear.default) or not is_call(corr, aten.sum.dim_IntList):
            continue
        x, signs, scales = y.args
        last = [-1] + ([x.meta["val"].dim()] if "val" in x.meta else [])  # picked [..., N, k] has one dim more
        if len(corr.args) != 2 or len(corr.args[1]) != 1 or corr.args[1][0] not in last or corr.kwargs:
            continue
        prod = corr.args[0]
        if not is_call(prod, aten.mul.Tensor):
            continue
        for picked, vals in (prod.args, prod.args[::-1]):
            gather = _through_reshapes(picked)
            values = _through_reshapes(vals)
            if not (is_call(gather, aten.index_select.default) and gather.args[0] is x and gather.args[1] == -1):
                continue
            index = _through_reshapes(gather.args[2])
            if index.op == "get_attr" and isinstance(values, fx.Node) and values.op == "get_attr":
                return x, signs, scales, index, values
    return None


def fuse_bases_outliers(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of `gm` (sharing its tensors) with every binary-bases layer and its outliers as
    llmc::binary_bases_linear_outliers, and how many were; `gm` itself when there is none."""
    sites = [(n, args) for n in gm.graph.nodes if (args := _site(n)) is not None]
    return replace_in_copy(gm, sites, torch.ops.llmc.binary_bases_linear_outliers.default)
