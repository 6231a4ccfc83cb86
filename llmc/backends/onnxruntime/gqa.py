"""Attention over the float KV cache as one node: `fuse_group_query_attention(gm)` for the fused lowering.

The traced decoder (llmc.trace.DecoderStep._self_attention) writes each layer's attention as

    present_key   = cat([past_key, key], 2)          (a graph output)
    present_value = cat([past_value, value], 2)      (a graph output)
    rows = q.reshape(B, Hkv, G*S, D)                 (G > 1: query heads folded into rows)
    mask = bias[:, None, None].expand(B, 1, G, S, T).reshape(B, 1, G*S, T)     (G == 1: bias[:, None])
    out  = sdpa(rows, present_key, present_value, mask, scale)
           .unflatten(2, (G, S)).permute(0, 3, 1, 2, 4).reshape(B, S, H*D)    (G == 1: .transpose(1, 2))

which ONNX Runtime runs as some twenty nodes per layer, two of them copies of the whole cache.
`fuse_group_query_attention` finds that pattern in a copy of the graph and puts
`llmc::cached_attention` (llmc.ops.attention: the same function) in its place; its translation
(translations.cached_attention) is one com.microsoft.GroupQueryAttention node, which appends the
step to the past, attends with the additive mask (padding, causality, windows) and returns the
present cache. Only the exact pattern is taken: soft-capped attention (no SDPA), a cache that is
not the graph's own input (cq_kv, kivi), tensors other than float32, and heads whose size is not a
multiple of 8 (or differs between keys and values) stay as they are.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

import llmc.ops  # noqa: F401  (registers llmc::cached_attention)
from llmc.graph import is_call, replace_in_copy

aten = torch.ops.aten
_SEQUENCE = (2, -2)


def node_shape(node) -> tuple | None:
    """The traced shape of an fx node's tensor value, else None."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _float32(node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype == torch.float32


def _cache_cat(node):
    """(past placeholder, new) of cat([past, new], 2) over a float32 graph input, else None."""
    if not is_call(node, aten.cat.default) or len(node.args[0]) != 2 or (node.args[1:] or (0,))[0] not in _SEQUENCE:
        return None
    past, new = node.args[0]
    if not (isinstance(past, fx.Node) and past.op == "placeholder" and _float32(past) and _float32(new)):
        return None
    return past, new


def _only_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _unfolded_bias(mask, groups: int):
    """The [B, S, T] bias that `mask` repeats per query group (see the module docstring), else None."""
    if groups == 1:
        node = mask
        if not is_call(node, aten.unsqueeze.default) or node.args[1] != 1:
            return None
        return node.args[0]
    if not is_call(mask, aten.reshape.default, aten.view.default):
        return None
    node = mask.args[0]
    if not is_call(node, aten.expand.default):
        return None
    node = node.args[0]
    for dim in (2, 1):  # bias[:, None, None]
        if not is_call(node, aten.unsqueeze.default) or node.args[1] != dim:
            return None
        node = node.args[0]
    return node


def heads_output(sdpa, groups: int):
    """The [B, S, H*D] node that unfolds the heads of an attention's output (SDPA's, or cq_attention's: the
    query heads of each KV head folded into `groups` blocks of rows), else None."""
    node = _only_user(sdpa)
    if groups == 1:
        if not (is_call(node, aten.transpose.int) and sorted(node.args[1:3]) == [1, 2]):
            return None
    else:
        if not (is_call(node, aten.unflatten.int) and node.args[1] == 2):
            return None
        node = _only_user(node)
        if not (is_call(node, aten.permute.default) and list(node.args[1]) == [0, 3, 1, 2, 4]):
            return None
    node = _only_user(node)
    return node if is_call(node, aten.reshape.default, aten.view.default) else None


def _site(sdpa: fx.Node):
    """(output node, present key cat, present value cat, args of llmc::cached_attention) for an SDPA over the
    float cache, else None."""
    if not is_call(sdpa, aten.scaled_dot_product_attention.default) or len(sdpa.args) != 4:
        return None
    if set(sdpa.kwargs) - {"scale"}:
        return None
    rows, kcat, vcat, mask = sdpa.args
    keys, values = _cache_cat(kcat), _cache_cat(vcat)
    if keys is None or values is None or not _float32(rows) or not _float32(mask):
        return None
    (past_key, key), (past_value, value) = keys, values
    k_shape, v_shape, r_shape = node_shape(key), node_shape(value), node_shape(rows)
    if k_shape is None or v_shape is None or r_shape is None:
        return None
    q = rows.args[0] if is_call(rows, aten.reshape.default, aten.view.default) else rows
    q_shape = node_shape(q)
    if q_shape is None or len(q_shape) != 4 or q_shape[1] % k_shape[1]:
        return None
    groups = q_shape[1] // k_shape[1]
    if groups > 1 and q is rows:
        return None
    if not (q_shape[3] == k_shape[3] == v_shape[3] and isinstance(q_shape[3], int) and q_shape[3] % 8 == 0):
        return None  # ONNX Runtime's kernel takes one head size for q, k and v, a multiple of 8
    bias = _unfolded_bias(mask, groups)
    out = heads_output(sdpa, groups)
    b_shape = node_shape(bias)
    if out is None or b_shape is None or len(b_shape) != 3 or not _float32(bias):
        return None
    scale = sdpa.kwargs.get("scale") or q_shape[3] ** -0.5
    return out, kcat, vcat, (q, key, value, past_key, past_value, bias, float(scale))


# The ops that take the past's length from the mask and write the step into the cache they are given, with the
# past key and value at arguments 3 and 4: attention over a float cache, and over a CQ cache's codes.
CACHE_WRITERS = (torch.ops.llmc.cached_attention.default, torch.ops.llmc.cq_cached_attention.default)


def past_length_from_mask(gm: fx.GraphModule) -> bool:
    """Where every cache input is read only by a CACHE_WRITERS op (and for its sizes), make the graph take
    the past's length from the mask (T - S) instead of the cache's length; in place. Returns whether it did.

    Then the cache inputs may be buffers longer than the past (capacity C >= P): the step writes its keys
    and values (or their codes) at [P, T) of them and returns them, so a runtime can bind each past and
    present to one buffer. A graph with other readers of the cache (a kivi layer, a cq_kv layer left
    to standard ops) keeps P = C."""
    graph = gm.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    ids, mask, caches = inputs[0], inputs[1], inputs[3:]
    if not caches:
        return False
    sizes = []
    for cache in caches:
        for user in cache.users:
            if user.op == "call_module" and user.target == "_guards_fn":  # torch.export's input checks
                continue
            if is_call(user, aten.sym_size.int) and user.args[1] in (0, 1, 3):
                continue
            if is_call(user, aten.sym_size.int) and user.args[1] == 2:
                sizes.append(user)
            elif not (is_call(user, *CACHE_WRITERS) and user.args.index(cache) in (3, 4)):
                return False
    if sizes:
        with graph.inserting_after(mask):
            total = graph.call_function(aten.sym_size.int, (mask, 1))
        with graph.inserting_after(total):
            steps = graph.call_function(aten.sym_size.int, (ids, 1))
        with graph.inserting_after(steps):
            past = graph.call_function(operator.sub, (total, steps))
        for node in sizes:
            node.replace_all_uses_with(past)
            graph.erase_node(node)
        graph.lint()
        gm.recompile()
    return True


def fuse_group_query_attention(gm: fx.GraphModule) -> tuple[fx.GraphModule, int, bool]:
    """A copy of `gm` (sharing its tensors) with every attention over the float cache written as
    llmc::cached_attention; how many were; and whether the copy takes the past's length from the mask, so
    that its cache inputs may be buffers shared with its outputs (`past_length_from_mask`). `gm` itself,
    0, False when there is none."""
    sites = [s for n in gm.graph.nodes if (s := _site(n)) is not None]
    if not sites:
        return gm, 0, False
    # the op returns (out, present_key, present_value): replace the unfolded output by the call, then the
    # two concatenations (the present cache) by its other outputs
    fused, n = replace_in_copy(gm, [(out, args) for out, _, _, args in sites], torch.ops.llmc.cached_attention.default,
                               outputs=[(kcat, vcat) for _, kcat, vcat, _ in sites])
    return fused, n, past_length_from_mask(fused)
