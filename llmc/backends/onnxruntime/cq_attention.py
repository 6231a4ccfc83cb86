"""The code-reading attention of a CQ cache: `fuse_cq_attention(gm)` for the ONNX export.

cq_kv leaves, per layer, attention over keys and values decoded from the whole cache:

    K = rotate(cat(cq_decode(past_key_codes), key_new), cos, signed_sin)     (llmc.trace.apply_rope)
    V = cat(cq_decode(past_value_codes), value_new)
    out = scaled_dot_product_attention(q, K, V, bias, scale)

which ONNX Runtime would run as written: every step gathers every cached code back into float,
rotates every key and multiplies. `fuse_cq_attention` finds that pattern in a copy of the graph and
puts `llmc::cq_attention` in its place (llmc.ops.cq.attention: the same function), which the
kernel lowering writes as one llmc.CQAttention node: it reads the past from its codes and attends
to the step's own float tokens in the same softmax (translations.cq_attention_kernel,
cq_ort.c). Only the exact pattern is taken: cq_kv with a float
window or sink, or `exact_current=false`, codes wider than 8 bits, soft-capped attention or
non-float32 tensors stay as they are.

Where, in every layer, the step's keys and values are their projections split into heads and the
present cache is cat([past codes, cq_encode(new)]), the attention, both encodings and both
concatenations become one `llmc::cq_cached_attention` (llmc.ops.cq.cached_attention), written as
one llmc.CQCachedAttention node that encodes the step into the cache it is given. Its sizes of the
present then read the mask's length, so the graph can take the past's length from the mask
(gqa.past_length_from_mask) and a runtime can bind one buffer per cache tensor as past and present.
Where the query is rotated by the same RoPE (apply_rope with tables of the step's positions), the op takes
q before its rotation and those tables, and rotates it while it gathers the query rows (one rotation node a
layer fewer; the same formula, so the same values). Where the graph builds the key tables as RoPE does (cos of
cat([f, f]), the signed sin from such a sin: `_halves`), the op is told so (rope_halves) and reads half of each
table row: at a long context the tables are most of the bytes it reads (512 bytes a key, against 32 of codes).
A layer that normalizes its key heads first (StableLM) keeps cq_attention beside its encodings.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import fx

from llmc.backends.onnxruntime.gqa import heads_output, node_shape
from llmc.graph import attr_tensor, is_call, replace_in_copy

aten = torch.ops.aten
_LAST = (-1, 3)  # the channel dim of [B, H, T, D]
_SEQUENCE = (2, -2)


def _coded_cat(node):
    """(codes placeholder, codebooks get_attr, new tokens) of cat([cq_decode(codes, codebooks), new], 2), else None."""
    if not is_call(node, aten.cat.default) or len(node.args[0]) != 2 or (node.args[1:] or (0,))[0] not in _SEQUENCE:
        return None
    decoded, new = node.args[0]
    if not is_call(decoded, torch.ops.llmc.cq_decode.default, nargs=2):
        return None
    codes, codebooks = decoded.args
    if codes.op != "placeholder" or codebooks.op != "get_attr":
        return None
    return codes, codebooks, new


def _channel_slice(node, x, start: int, end: int | None, last: tuple = _LAST) -> bool:
    """Whether node is x[..., start:end] (end None: to the end) on x's last dimension, which `last` names."""
    if not is_call(node, aten.slice.Tensor) or node.args[0] is not x or node.args[1] not in last:
        return False
    lo = node.args[2] if len(node.args) > 2 else 0
    hi = node.args[3] if len(node.args) > 3 else None
    return lo == start and (hi == end or (end is None and (hi is None or hi >= 2**31)))


def _rotation(node):
    """(x, cos, signed_sin, rot) when node is x·cos + roll(x, rot/2)·signed_sin (either order), else None."""
    if not is_call(node, aten.add.Tensor, nargs=2):
        return None
    for a, b in (node.args, node.args[::-1]):
        if not (is_call(a, aten.mul.Tensor, nargs=2) and is_call(b, aten.mul.Tensor, nargs=2)):
            continue
        for rolled, sin in (b.args, b.args[::-1]):
            if not is_call(rolled, aten.roll.default) or list(rolled.args[2]) not in ([-1], [3]):
                continue
            x = rolled.args[0]
            if x not in a.args or len(rolled.args[1]) != 1:
                continue
            cos = a.args[1] if a.args[0] is x else a.args[0]
            rot = 2 * int(rolled.args[1][0])
            if any(isinstance(t, fx.Node) and "val" in t.meta and t.meta["val"].shape[-1] != rot for t in (cos, sin)):
                return None  # tables of another width than the roll says
            return x, cos, sin, rot
    return None


def _rope(node, D: int):
    """(x, cos, signed_sin) when node is llmc.trace.apply_rope(x, cos, signed_sin) of a [.., D] tensor, else None.

    Full rotary: one rotation of x with roll by D/2. Partial (Drot < D): cat([rotation of x[..., :Drot],
    x[..., Drot:]], -1)."""
    whole = _rotation(node)
    if whole is not None:
        x, cos, sin, rot = whole
        return (x, cos, sin) if rot == D else None
    if not is_call(node, aten.cat.default) or len(node.args[0]) != 2 or node.args[1] not in _LAST:
        return None
    head, rest = node.args[0]
    part = _rotation(head)
    if part is None:
        return None
    xs, cos, sin, rot = part
    if not (is_call(xs, aten.slice.Tensor) and is_call(rest, aten.slice.Tensor)):
        return None
    x = xs.args[0]
    if not (_channel_slice(xs, x, 0, rot) and _channel_slice(rest, x, rot, None)):
        return None
    return x, cos, sin


def _float32(node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val is None or val.dtype == torch.float32


def _site(gm: fx.GraphModule, sdpa: fx.Node):
    """The arguments of llmc::cq_attention for an SDPA node over a CQ cache, else None."""
    if not is_call(sdpa, aten.scaled_dot_product_attention.default, nargs=4) or set(sdpa.kwargs) - {"scale"}:
        return None
    q, k, v, bias = sdpa.args
    values = _coded_cat(v)
    if values is None or not isinstance(k, fx.Node):
        return None
    vcodes, vbook, vnew = values
    vb = attr_tensor(gm, vbook.target)
    for cat in k.all_input_nodes + [a for n in k.all_input_nodes for a in n.all_input_nodes]:
        keys = _coded_cat(cat)
        if keys is None:
            continue
        kcodes, kbook, knew = keys
        kb = attr_tensor(gm, kbook.target)
        if kb.dim() != 4 or vb.dim() != 4 or max(kb.shape[2], vb.shape[2]) > 256:
            return None
        rope = _rope(k, kb.shape[1] * kb.shape[3])
        if rope is None or rope[0] is not cat:
            return None
        _, cos, sin = rope
        if not all(map(_float32, (q, knew, vnew, cos, sin, bias))) or {kb.dtype, vb.dtype} != {torch.float32}:
            return None
        scale = sdpa.kwargs.get("scale") or (kb.shape[1] * kb.shape[3]) ** -0.5
        return q, kcodes, knew, kbook, vcodes, vnew, vbook, cos, sin, bias, float(scale)
    return None


def _heads(node, heads: int, D: int):
    """x when node = transpose(view(x, [B, S, heads, D]), 1, 2) with x [B, S, heads * D] (a projection split into
    heads), else None."""
    if not (is_call(node, aten.transpose.int) and sorted(node.args[1:3]) == [1, 2]):
        return None
    view = node.args[0]
    if not is_call(view, aten.view.default, aten.reshape.default):
        return None
    x = view.args[0]
    shape = node_shape(x)
    return x if shape is not None and len(shape) == 3 and shape[2] == heads * D else None


def _present(codes, new, book):
    """The node cat([codes, cq_encode(new, book)], 2) among the users of `codes` (the present cache), else None."""
    for user in codes.users:
        if is_call(user, aten.cat.default) and len(user.args[0]) == 2 and user.args[0][0] is codes \
                and (user.args[1:] or (0,))[0] in _SEQUENCE:
            enc = user.args[0][1]
            if is_call(enc, torch.ops.llmc.cq_encode.default, nargs=2) and enc.args == (new, book):
                return user
    return None


def _query_heads(rows: fx.Node, H: int):
    """(q [B, Hq, S, D], Hq / H) when `rows` folds the query heads of each of the H KV heads into rows, else None."""
    q = rows.args[0] if is_call(rows, aten.reshape.default, aten.view.default) else rows
    shape = node_shape(q)
    if shape is None or len(shape) != 4 or shape[1] % H or (q is rows and shape[1] != H):
        return None
    return q, shape[1] // H


def _cached_site(gm: fx.GraphModule, node: fx.Node, args: tuple):
    """(output node, present key cat, present value cat, args of llmc::cq_cached_attention) for a cq_attention site
    whose new keys and values are projections split into heads, whose present cache is cat([codes, cq_encode(new)])
    and whose output is unfolded into [B, S, Hq * D], else None."""
    rows, kcodes, knew, kbook, vcodes, vnew, vbook, cos, sin, bias, scale = args
    shape = node_shape(rows)
    if shape is None or not (isinstance(shape[1], int) and isinstance(shape[3], int)):
        return None
    H, D = shape[1], shape[3]
    key, value = _heads(knew, H, D), _heads(vnew, H, D)
    kcat, vcat = _present(kcodes, knew, kbook), _present(vcodes, vnew, vbook)
    query = _query_heads(rows, H)
    if key is None or value is None or kcat is None or vcat is None or query is None:
        return None
    out = heads_output(node, query[1])
    if out is None:
        return None
    q, q_tables = _unrotated(query[0], D, cos)
    # the key tables are [B|1, 1, T, Drot]; their width is the q tables' (the op checks), known where q has them
    width = node_shape(q_tables[0])[3] if q_tables else None
    halves = _halves(cos, 4, width) == "same" and _halves(sin, 4, width) == "negated"
    return out, kcat, vcat, (q, key, value, kcodes, vcodes, kbook, vbook, cos, sin, bias, scale,
                             *(q_tables or (None, None)), halves)


def _unrotated(q: fx.Node, D: int, cos: fx.Node):
    """(q before RoPE, its tables) when q = apply_rope(x, q_cos, q_signed_sin) with tables [B|1, 1, S, Drot] as wide
    as the keys' `cos`, so the op rotates the query itself (one rotation a layer fewer in the graph); else (q, ())."""
    rope = _rope(q, D)
    if rope is None:
        return q, ()
    x, q_cos, q_sin = rope
    shapes = [node_shape(t) for t in (q_cos, q_sin)]
    keys = node_shape(cos)  # unknown where cq_kv computed the keys' tables (nodes without metadata); the op checks
    if any(s is None or len(s) != 4 or s[1] != 1 or s[3] != shapes[0][3] for s in shapes) \
            or (keys is not None and keys[3] != shapes[0][3]) or not all(map(_float32, (x, q_cos, q_sin))):
        return q, ()
    return x, (q_cos, q_sin)


# ops that keep a tensor's last dimension as it is, element by element (with a number as their other operand)
_ELEMENTWISE = (aten.neg.default, aten.clone.default, aten.alias.default, aten.to.dtype, aten._to_copy.default)
_BY_NUMBER = (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)


def _halves(node, rank: int, width: int | None) -> str | None:
    """"same" when every row of the last dimension of node (a tensor of `rank` dimensions, `width` wide when not None)
    is two equal halves, "negated" when its first half is its second negated, by the graph's construction (RoPE's
    tables: cos(cat([f, f])), and llmc.trace.rope_tables' signed sin cat([-s[.., :h], s[.., h:]]) of such a sin s,
    h = width / 2); else None (not known). Rank and width are passed down rather than read from traced shapes,
    which the key tables cq_kv copies have not."""
    last = (-1, rank - 1)
    if is_call(node, aten.cat.default) and len(node.args[0]) == 2 and (node.args[1:] or (0,))[0] in last:
        first, second = node.args[0]
        if first is second:
            return "same"
        if not (is_call(first, aten.neg.default) and is_call(first.args[0], aten.slice.Tensor)):
            return None
        if width is None or width % 2:
            return None
        half, source = width // 2, first.args[0].args[0]  # the two parts have the width of source
        if _channel_slice(first.args[0], source, 0, half, last) and _halves(source, rank, width) == "same" \
                and any(_channel_slice(second, source, half, end, last) for end in (None, width)):
            return "negated"
        return None
    if is_call(node, aten.cos.default, aten.sin.default):
        return "same" if _halves(node.args[0], rank, width) == "same" else None
    if is_call(node, *_ELEMENTWISE) or (is_call(node, *_BY_NUMBER, nargs=2)
                                        and isinstance(node.args[1], (int, float))):
        return _halves(node.args[0], rank, width)
    if is_call(node, aten.unsqueeze.default, nargs=2) and node.args[1] not in last:
        return _halves(node.args[0], rank - 1, width)
    return None


def _lengths_from_mask(gm: fx.GraphModule, cats: list) -> None:
    """In place: every size(cat, 2) of `cats` (a present cache, of length T = P + S) read as the mask's length
    instead, so that the present may become a buffer longer than T."""
    mask = [n for n in gm.graph.nodes if n.op == "placeholder"][1]
    total = None
    for cat in cats:
        for user in list(cat.users):
            if is_call(user, aten.sym_size.int) and user.args[1] in _SEQUENCE:
                if total is None:
                    with gm.graph.inserting_after(mask):
                        total = gm.graph.call_function(aten.sym_size.int, (mask, 1))
                    total.meta = dict(user.meta)
                user.replace_all_uses_with(total)
                gm.graph.erase_node(user)
    gm.graph.lint()
    gm.recompile()


def fuse_cq_attention(gm: fx.GraphModule) -> tuple[fx.GraphModule, int, int]:
    """A copy of `gm` (sharing its tensors) with every CQ attention written as one op: llmc::cq_cached_attention
    where the step's keys and values come straight from their projections and are encoded into the present
    cache there (the op then takes the past's length from the mask and writes the codes itself), else
    llmc::cq_attention; how many attentions were rewritten, and how many of them as cq_cached_attention.
    `gm` itself when there is none."""
    sites = [(n, args) for n in gm.graph.nodes if (args := _site(gm, n)) is not None]
    cached = [c for n, args in sites if (c := _cached_site(gm, n, args)) is not None]
    if len(cached) != len(sites):  # one kind per graph: a cached layer's cache is a buffer, a plain one is not
        cached = []
    if not cached:
        out, n = replace_in_copy(gm, sites, torch.ops.llmc.cq_attention.default)
        return out, n, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        copy_ = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    nodes = dict(zip(gm.graph.nodes, copy_.graph.nodes))
    _lengths_from_mask(copy_, [nodes[c] for _, kcat, vcat, _ in cached for c in (kcat, vcat)])
    moved = [(nodes[n], (nodes[kcat], nodes[vcat]), tuple(nodes[a] if isinstance(a, fx.Node) else a for a in args))
             for n, kcat, vcat, args in cached]
    out, n = replace_in_copy(copy_, [(node, args) for node, _, args in moved],
                             torch.ops.llmc.cq_cached_attention.default, outputs=[cats for _, cats, _ in moved])
    return out, n, n
