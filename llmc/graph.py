"""Small helpers for rewriting FX GraphModules produced by torch.export (`ep.module()`)."""

from __future__ import annotations

import collections
import copy
import itertools
import operator

import torch
from torch import fx, nn


def module_fqn(node: fx.Node) -> str:
    """FQN of the innermost module a node was traced in (`model.layers.3.mlp.down_proj`), or ''."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def get_attr_tensor(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The tensor a `get_attr` node reads."""
    return attr_tensor(gm, node.target)


def attr_tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The tensor stored at `target` (`model.layers.3.mlp.down_proj.weight`)."""
    module, _, leaf = target.rpartition(".")
    return getattr(gm.get_submodule(module) if module else gm, leaf)


def set_attr_tensor(gm: fx.GraphModule, target: str, value: torch.Tensor, parameter: bool | None = None) -> None:
    """Replace (never mutate in place: the source model may share storage) the tensor at `target`.

    A parameter stays a parameter unless `parameter` says otherwise; new names become buffers.
    Missing modules on the path are created (empty), so a pass can add `...self_attn.cq_key.codebooks`.
    """
    module_name, _, leaf = target.rpartition(".")
    module = gm
    for part in module_name.split(".") if module_name else []:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    was_param = isinstance(getattr(module, leaf, None), nn.Parameter)
    if parameter is None:
        parameter = was_param
    if hasattr(module, leaf):
        delattr(module, leaf)
    if parameter:
        module.register_parameter(leaf, nn.Parameter(value.detach(), requires_grad=False))
    else:
        module.register_buffer(leaf, value.detach())


def shares_storage(gm: fx.GraphModule, target: str) -> list[str]:
    """Other state names of `gm` that alias the tensor at `target` (tied weights)."""
    module_name, _, leaf = target.rpartition(".")
    t = getattr(gm.get_submodule(module_name) if module_name else gm, leaf)
    ptr = t.untyped_storage().data_ptr()
    out = []
    for name, other in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name != target and other.untyped_storage().data_ptr() == ptr:
            out.append(name)
    return out


def remove_unused_attrs(gm: fx.GraphModule) -> list[str]:
    """Erase get_attr nodes without users and delete the tensors no node reads any more."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    removed = []
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in used:
            module_name, _, leaf = name.rpartition(".")
            module = gm.get_submodule(module_name) if module_name else gm
            if hasattr(module, leaf):
                delattr(module, leaf)
                removed.append(name)
    return removed


def strip_runtime_noops(gm: fx.GraphModule) -> int:
    """Remove nodes that do nothing at run time; returns how many were removed.

    torch.export leaves an `_assert_tensor_metadata` check beside every dtype conversion and keeps
    conversions to the dtype a tensor already has. Each costs a Python-level op call per decode
    step (about 250 of them in SmolLM2's graph). Re-exporting the graph puts the checks back.
    """
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten._assert_tensor_metadata.default and not node.users:
            gm.graph.erase_node(node)
            removed += 1
        elif node.target is torch.ops.aten.to.dtype and not node.kwargs:
            src, out = node.args[0].meta.get("val"), node.meta.get("val")
            if src is not None and out is not None and src.dtype == out.dtype:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                removed += 1
    if removed:
        gm.recompile()
    return removed


def ancestors(node: fx.Node) -> set:
    """`node` and every node it (transitively) reads."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def between(src: fx.Node, dst: fx.Node) -> list[fx.Node]:
    """Nodes on some path from `src` to `dst`, both excluded, in graph order."""
    anc = ancestors(dst)
    desc, stack = set(), [src]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in anc and u not in desc:
                desc.add(u)
                stack.append(u)
    return [n for n in dst.graph.nodes if n in desc and n is not dst]


def copy_nodes(graph: fx.Graph, nodes: list[fx.Node], substitutions: dict, before: fx.Node) -> dict:
    """Copy `nodes` (in graph order) before `before`, their inputs remapped by `substitutions`.

    A copy reads the copy of any input that is also in `nodes`, the substitute of an input in
    `substitutions`, and the original otherwise. Metadata other than the traced value is kept
    (the value changes with the inputs). Returns {original: copy} for the copied nodes.
    """
    env = dict(substitutions)
    order = {n: i for i, n in enumerate(graph.nodes)}
    with graph.inserting_before(before):
        for n in sorted(nodes, key=order.__getitem__):
            new = graph.node_copy(n, lambda a: env.get(a, a))
            new.meta = {k: v for k, v in n.meta.items() if k != "val"}
            env[n] = new
    return {n: env[n] for n in nodes}


def drop_input_guards(gm: fx.GraphModule) -> int:
    """Remove the input-shape guards torch.export put in the graph (`_guards_fn` calls).

    They check the traced signature (cache dtypes and head sizes); a pass that changes the
    signature must drop them. Re-exporting the graph derives guards for the new signature.
    """
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target.startswith("_guards_fn") and not node.users:
            gm.graph.erase_node(node)
            removed += 1
    for name, _ in list(gm.named_children()):
        if name.startswith("_guards_fn"):
            delattr(gm, name)
    return removed


def graph_digest(gm: fx.GraphModule) -> str:
    """sha256 of a graph's code and every state tensor's bytes: what results computed from it depend on."""
    from llmc.fsutil import tensor_digest

    return tensor_digest([t for _, t in sorted(gm.state_dict(keep_vars=True).items())], gm.code)


def count_ops(gm: torch.fx.GraphModule) -> collections.Counter:
    """Histogram of call_function targets in a GraphModule, keyed by op name (`aten.linear.default`)."""
    hist: collections.Counter = collections.Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            hist[op_name(node.target)] += 1
    return hist


def op_name(target) -> str:
    """A readable name of an FX call_function target: `aten.linear.default`, `llmc.vq_linear.default`."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)  # "aten.mul.Tensor"
    return getattr(target, "__name__", str(target))


def is_call(node, *targets, nargs: int | None = None) -> bool:
    """Whether `node` is an fx call of one of `targets` (with `nargs` positional arguments, when given)."""
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets
            and (nargs is None or len(node.args) == nargs))


def _impure(node: fx.Node) -> bool:
    """fx's notion of impure, except that an unused scaled-dot-product attention (tagged nondeterministic for its
    dropout, which a traced decoder does not use) is dead code."""
    if node.op == "call_function" and node.target is torch.ops.aten.scaled_dot_product_attention.default:
        return False
    return node.is_impure()


def replace_in_copy(gm: fx.GraphModule, sites: list, target, outputs: list | None = None) -> tuple[fx.GraphModule, int]:
    """A copy of `gm` (a new graph, the same tensors) where each (node, args) of `sites` is replaced by a call of
    `target` on `args` (nodes of `gm`, mapped to the copy; other values as they are), dead nodes removed; and
    how many were replaced. `gm` itself, untouched, when `sites` is empty.

    With `outputs` (one tuple of nodes per site), `target` returns a tuple: its first element replaces the
    site's node and the next ones replace the nodes of the tuple, in order."""
    if not sites:
        return gm, 0
    out = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    nodes = dict(zip(gm.graph.nodes, out.graph.nodes))
    graph = out.graph
    for i, (node, args) in enumerate(sites):
        old = nodes[node]
        extra = [nodes[n] for n in outputs[i]] if outputs is not None else None
        with graph.inserting_before(old):
            new = graph.call_function(target, tuple(nodes[a] if isinstance(a, fx.Node) else a for a in args))
            if extra is None:
                new.meta = dict(old.meta)
                results = [(old, new)]
            else:
                new.meta = {"val": tuple(n.meta.get("val") for n in [old, *extra])}
                results = []
                for k, replaced in enumerate([old, *extra]):
                    item = graph.call_function(operator.getitem, (new, k))
                    item.meta = dict(replaced.meta)
                    results.append((replaced, item))
        earlier = set(itertools.takewhile(lambda n: n is not new, graph.nodes))  # users left to dead-code removal
        for replaced, result in results:
            replaced.replace_all_uses_with(result, delete_user_cb=lambda user: user not in earlier)
        graph.erase_node(old)
    graph.eliminate_dead_code(is_impure_node=_impure)
    graph.lint()
    out.recompile()
    return out, len(sites)
