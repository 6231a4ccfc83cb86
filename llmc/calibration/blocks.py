"""Cut a decode-step graph into its decoder blocks, each a standalone function, for streamed calibration.

A block is everything on a path from the residual stream entering layer i to the stream entering
layer i + 1 (the final norm for the last layer). `split_blocks` returns, per layer, a GraphModule
`block(h, *externals, *params) -> h'` whose weights are placeholders (so a caller can pass
dequantized, trainable tensors) and whose other inputs (RoPE tables, the attention bias, the empty
cache) are computed once per batch shape by a `prefix` GraphModule that stops before the first
block. Calibration then runs one block at a time over stored hidden states, as AQLM and GPTQ do,
and never runs the model's tail or LM head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx

from llmc.errors import PassError
from llmc.graph import ancestors, between, module_fqn

_NORM = re.compile(r"(?:^|\.)layers\.(\d+)\.input_layernorm$")


@dataclass
class Block:
    """Layer `index` as a function: gm(h, *externals, *params) -> h (the residual stream after it)."""

    index: int
    gm: fx.GraphModule
    externals: list[fx.Node]            # nodes of the full graph computed by the prefix
    params: list[str]                   # get_attr targets of the full graph, in placeholder order
    linears: dict[str, fx.Node] = field(default_factory=dict)  # weight target -> its linear in gm

    def __call__(self, h, externals: dict, params: dict):
        return self.gm(h, *(externals[n] for n in self.externals), *(params[p] for p in self.params))


def _stream_input(gm: fx.GraphModule, fqn_matches) -> fx.Node:
    """The residual stream read by a norm module: the one non-attribute input of its nodes from outside it."""
    nodes = [n for n in gm.graph.nodes if fqn_matches(module_fqn(n))]
    inside = set(nodes)
    outside = {a for n in nodes for a in n.all_input_nodes if a not in inside and a.op != "get_attr"}
    if len(outside) != 1:
        raise PassError(f"calibration: cannot find the residual stream entering a norm ({len(outside)} candidates); "
                        "the graph does not have the decoder structure this pass expects")
    return outside.pop()


def _extract(gm: fx.GraphModule, start: fx.Node, body: list[fx.Node], outputs: list[fx.Node], keep_attrs: bool):
    """A GraphModule of `body` with `start` (if any) as its first input; other inputs become placeholders.

    Attributes stay `get_attr` when `keep_attrs`, else they become placeholders too.
    Returns (module, externals, params, env).
    """
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    externals: list[fx.Node] = []
    attrs: list[fx.Node] = []
    inside = set(body) | {start}
    for n in body:  # inputs first, so placeholders come in the order (h, *externals, *params)
        for a in n.all_input_nodes:
            if a not in inside and a not in externals and a not in attrs:
                (attrs if a.op == "get_attr" else externals).append(a)
    if start is not None:
        env[start] = g.placeholder("h")
    for k, a in enumerate(externals):
        env[a] = g.placeholder(f"x{k}")
    params: list[str] = []
    for a in attrs:
        if keep_attrs:
            env[a] = g.get_attr(a.target)
        else:
            env[a] = g.placeholder(f"p{len(params)}")
            params.append(a.target)
    for n in body:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in outputs) if len(outputs) > 1 else env[outputs[0]])
    return fx.GraphModule(gm, g), externals, params, env


def split_blocks(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[fx.Node], list[Block]]:
    """(prefix, prefix outputs, blocks). prefix(*graph inputs) returns the values of its outputs:
    the stream entering block 0 first, then every block's externals."""
    layers = sorted({int(m.group(1)) for n in gm.graph.nodes if (m := _NORM.search(module_fqn(n)))})
    if not layers or layers != list(range(len(layers))):
        raise PassError("calibration: the graph has no numbered decoder layers with an input_layernorm")
    streams = [_stream_input(gm, lambda f, i=i: bool((m := _NORM.search(f)) and int(m.group(1)) == i))
               for i in layers]
    streams.append(_stream_input(gm, lambda f: f.rpartition(".")[2] == "norm" and ".layers." not in "." + f))
    blocks = []
    needed: list[fx.Node] = [streams[0]]
    for i in layers:
        body = between(streams[i], streams[i + 1]) + [streams[i + 1]]
        sub, externals, params, env = _extract(gm, streams[i], body, [streams[i + 1]], keep_attrs=False)
        linears = {t: env_node for n, env_node in env.items() if n.op == "call_function"
                   and n.target is torch.ops.aten.linear.default and isinstance(n.args[1], fx.Node)
                   and n.args[1].op == "get_attr" for t in [n.args[1].target]}
        blocks.append(Block(i, sub, externals, params, linears))
        needed += [e for e in externals if e not in needed]
    body_nodes = {n for b in range(len(layers)) for n in between(streams[b], streams[b + 1])} | set(streams[1:])
    prefix_nodes = set()
    for n in needed:
        prefix_nodes |= ancestors(n)
    if prefix_nodes & body_nodes:
        raise PassError("calibration: a block input depends on another block; the graph is not a plain stack of layers")
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    body = sorted((n for n in prefix_nodes if n.op != "placeholder"), key=order.__getitem__)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    g = fx.Graph()
    env = {p: g.placeholder(p.name) for p in placeholders}
    for n in body:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[n] for n in needed))
    prefix = fx.GraphModule(gm, g)
    return prefix, needed, blocks


def decode_inputs(ids: torch.Tensor):
    """(attention_mask, position_ids) of a full, unpadded batch of token ids [B, S]."""
    B, S = ids.shape
    return torch.ones(B, S, dtype=torch.long), torch.arange(S).expand(B, S).contiguous()


def flat_inputs(ids: torch.Tensor, empty_cache) -> list:
    """The decode-step inputs of a full, unpadded batch (no past): ids, mask, positions, *cache."""
    return [ids, *decode_inputs(ids), *empty_cache(ids.shape[0])]


def split_head(gm: fx.GraphModule) -> fx.GraphModule:
    """The model's head as a function head(h) -> logits: the final norm and the LM head, applied to the
    residual stream leaving the last block (what `split_blocks`' last block returns)."""
    stream = _stream_input(gm, lambda f: f.rpartition(".")[2] == "norm" and ".layers." not in "." + f)
    logits = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    head, externals, _, _ = _extract(gm, stream, between(stream, logits) + [logits], [logits], keep_attrs=True)
    if externals:
        raise PassError("calibration: the LM head reads more than the residual stream; the graph does not have the "
                        "decoder structure this pass expects")
    return head


@torch.no_grad()
def block_inputs(prefix: fx.GraphModule, needed: list[fx.Node], batches, empty_cache) -> tuple[list, dict]:
    """Run the prefix over calibration batches: the stream entering block 0 per batch, and the blocks'
    externals (RoPE tables, masks) per batch shape."""
    hs, ext_by_shape = [], {}
    for ids in batches:
        vals = prefix(*flat_inputs(ids, empty_cache))
        hs.append(vals[0])
        ext_by_shape.setdefault(tuple(ids.shape), dict(zip(needed, vals)))
    return hs, ext_by_shape


@torch.no_grad()
def block_outputs(block: Block, hs: list, ext_by_shape: dict, params: dict) -> list[torch.Tensor]:
    """The block's outputs on each stored hidden state of `hs`, with weights `params`."""
    return [block(h, ext_by_shape[tuple(h.shape[:2])], params) for h in hs]


def relative_error(outs, ys: list[torch.Tensor]) -> float:
    """‖out − y‖² / ‖y‖² summed over all batches (`outs` may be a generator: one output at a time)."""
    with torch.no_grad():
        num = sum(float((o - y).pow(2).sum()) for o, y in zip(outs, ys))
        return num / max(sum(float(y.pow(2).sum()) for y in ys), 1e-30)


def fit_outputs(forward, trainable: list[torch.Tensor], hs: list, ys: list, epochs: int, lr: float,
                seed: int) -> None:
    """Adam(lr, betas (0.9, 0.95)) on `trainable` (leaf tensors requiring grad) minimising the MSE
    between `forward(h)` and `y`, `epochs` passes over the batches in a seeded random order."""
    if epochs <= 0:
        return
    opt = torch.optim.Adam(trainable, lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            for i in torch.randperm(len(hs), generator=gen).tolist():
                loss = torch.nn.functional.mse_loss(forward(hs[i]), ys[i])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
