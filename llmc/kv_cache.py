"""The KV cache inside a traced decode step: where each layer writes it, and what flows into it.

Shared by the passes that change the cache (`cq_kv`, `uniform_kv`, ...): `cache_sites` finds, per
layer, the write `cat(past, new)` of the key and value caches and, for keys, the tensor before
RoPE; `collect_kv` runs calibration text through the graph and records those tensors (and, with
`fisher`, the squared gradients of the LM loss with respect to them); the graph-surgery helpers
add cache inputs and outputs to the step's `(input_ids, attention_mask, position_ids, past)`
signature. A pass that changes what the cache holds returns the new layout in its PassResult.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx
from torch.utils import _pytree as pytree

from llmc.errors import PassError
from llmc.graph import between
from llmc.progress import bar
from llmc.trace import CacheTensor

aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------
# Finding the cache writes in a traced decode step


@dataclass
class CacheSite:
    """Where one layer's key or value enters the cache in the graph."""

    layer: int
    kind: str  # "key" | "value"
    past: fx.Node  # placeholder of the past cache tensor
    write: fx.Node  # cat(past, new) -> present
    new: fx.Node  # what the write appends (keys after RoPE)
    pre: fx.Node  # the tensor to quantize (keys before RoPE; values: same as `new`)
    tables: tuple = ()  # keys: RoPE table nodes the rotation reads (computed from position_ids)


def placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _rope_input(k_rope: fx.Node) -> fx.Node:
    """The key before RoPE: the tensor the rotation's `roll` reads (or slices, for partial RoPE)."""
    seen, stack, rolls = set(), [k_rope], []
    while stack:
        n = stack.pop()
        if n in seen or n.op != "call_function":
            continue
        seen.add(n)
        if n.target is aten.roll.default:
            rolls.append(n)
            continue
        if n.target in (aten.mul.Tensor, aten.add.Tensor, aten.cat.default, aten.slice.Tensor):
            stack.extend(n.all_input_nodes)
    if len(rolls) != 1:
        raise PassError(f"cannot find the RoPE of key node '{k_rope.name}' (expected one roll, found {len(rolls)})")
    x = rolls[0].args[0]
    if x.op == "call_function" and x.target is aten.slice.Tensor and x.args[1] in (-1, 3):  # partial rotary
        x = x.args[0]
    return x


def cache_sites(gm: fx.GraphModule, layout: list[CacheTensor]) -> list[CacheSite]:
    """The cache write of every float key/value in `layout`, with the tensors around it."""
    past = placeholders(gm)[3:]
    if len(past) != len(layout):
        raise PassError(f"graph has {len(past)} cache inputs but the cache layout lists {len(layout)}")
    sites = []
    for ph, ct in zip(past, layout):
        if ct.kind not in ("key", "value"):
            continue
        if not ct.dtype.startswith("float") and ct.dtype != "bfloat16":
            raise PassError(f"cache tensor {ct.input_name} is {ct.dtype} ({ct.meaning}); the cache is already quantized")
        writes = [u for u in ph.users if u.op == "call_function" and u.target is aten.cat.default
                  and u.args[0][0] is ph]
        if len(writes) != 1:
            raise PassError(f"cannot find the cache write of {ct.input_name} (cat(past, new) on the sequence dim)")
        write = writes[0]
        new = write.args[0][1]
        if ct.kind == "value":
            sites.append(CacheSite(ct.layer, "value", ph, write, new, new))
            continue
        pre = _rope_input(new)
        region = set(between(pre, new)) | {new}
        tables = []
        for n in between(pre, new) + [new]:
            for a in n.all_input_nodes:
                if a not in region and a is not pre and a not in tables:
                    tables.append(a)
        sites.append(CacheSite(ct.layer, "key", ph, write, new, pre, tuple(tables)))
    return sites


def attention_users(site: CacheSite) -> list[fx.Node]:
    return [u for u in site.write.users if u.op != "output"]


# ---------------------------------------------------------------------------------------------
# Calibration: pre-RoPE keys, values and their Fisher weights


_RECORDER = None
CALIBRATION_VERSION = 3  # part of the cache fingerprint: bump when what collect_kv records changes


def _probe(x: torch.Tensor, key: str) -> torch.Tensor:
    """Graph hook used during calibration: records x (and later its gradient) for `key`."""
    return _RECORDER.record(x, key) if _RECORDER is not None else x


class _Recorder:
    def __init__(self, fisher: bool):
        self.fisher = fisher
        self.rows: torch.Tensor | None = None  # token rows of the current batch to keep
        self.acts: dict = {}
        self.grads: dict = {}

    def _select(self, x: torch.Tensor) -> torch.Tensor:
        B, H, S, D = x.shape
        flat = x.detach().float().transpose(1, 2).reshape(B * S, H * D)  # [tokens, H*D]
        return flat.index_select(0, self.rows)

    def record(self, x: torch.Tensor, key: str) -> torch.Tensor:
        self.acts.setdefault(key, []).append(self._select(x))
        if not self.fisher:
            return x
        # x + 0 with a zero that requires grad: the gradient flows through this node and on into
        # every later layer's keys and values (detaching here would drop those paths from dL/dx)
        y = x + torch.zeros((), dtype=x.dtype, requires_grad=True)
        y.register_hook(lambda g: self.grads.setdefault(key, []).append(self._select(g)))
        return y


def collect_kv(gm: fx.GraphModule, sites: list[CacheSite], batches: list[torch.Tensor], empty_cache, *,
               fisher: bool, max_tokens: int, seed: int, progress: bool, batch_size: int | None = None) -> dict:
    """Run calibration text through `gm`; per site key "<layer>.<kind>": activations [N, H*D] (and
    Fisher weights, the squared LM-loss gradients, same shape) for up to `max_tokens` sampled tokens.

    Probes are spliced into the graph for the run and removed afterwards. With `fisher`, each
    batch runs forward and backward (next-token cross-entropy), one batch in memory at a time, with
    the weights frozen: autograd then keeps and computes only what the gradients to the keys and
    values need (no weight gradients), which bounds memory by one sequence's activations.
    """
    global _RECORDER
    graph = gm.graph
    probes = []
    for s in sites:
        with graph.inserting_after(s.pre):
            p = graph.call_function(_probe, (s.pre, f"{s.layer}.{s.kind}"))
        s.pre.replace_all_uses_with(p, delete_user_cb=lambda u: u is not p)
        probes.append(p)
    gm.recompile()
    rec = _Recorder(fisher)
    gen = torch.Generator().manual_seed(seed)
    batch_size = batch_size or (1 if fisher else 4)  # backward holds a batch's activations; forward-only is cheap
    ids = torch.cat([b.reshape(-1, b.shape[-1]) for b in batches])  # [n, S]
    n, S = ids.shape
    per_batch = max(1, math.ceil(max_tokens / math.ceil(n / batch_size)))
    _RECORDER = rec
    frozen = [p for p in gm.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        for i in bar(range(0, n, batch_size), desc="kv calibration", unit="batch", enabled=progress):
            x = ids[i:i + batch_size]
            B = x.shape[0]
            rec.rows = torch.randperm(B * S, generator=gen)[:min(per_batch, B * S)].sort().values
            mask = torch.ones(B, S, dtype=torch.long)
            pos = torch.arange(S).expand(B, S)
            with torch.enable_grad() if fisher else torch.no_grad():
                logits = gm(x, mask, pos, empty_cache(B))[0]
                if fisher:
                    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
                    loss.backward()
            del logits
    finally:
        _RECORDER = None
        for p in frozen:
            p.requires_grad_(True)
        for p in probes:
            p.replace_all_uses_with(p.args[0])
            graph.erase_node(p)
        gm.recompile()
    out = {}
    for key, chunks in rec.acts.items():
        out[key] = {"x": torch.cat(chunks)}
        if fisher:
            # backward runs layers in reverse, but within a key the batches arrive in order
            out[key]["fisher"] = torch.cat(rec.grads[key]).pow(2)
    return out


# ---------------------------------------------------------------------------------------------
# Graph surgery on the cache signature


def call_like(graph: fx.Graph, target, args, like: fx.Node | None = None) -> fx.Node:
    n = graph.call_function(target, args)
    if like is not None and "nn_module_stack" in like.meta:
        n.meta["nn_module_stack"] = dict(like.meta["nn_module_stack"])
    return n


def add_cache_inputs(gm: fx.GraphModule, names: list[str]) -> list[fx.Node]:
    """Append cache inputs to the graph (after the existing ones) and to its pytree signature.

    The graph's signature is `(input_ids, attention_mask, position_ids, past: list)` returning
    `(logits, present: list)`; new tensors extend both lists. Returns the new placeholders.
    """
    graph = gm.graph
    last = placeholders(gm)[-1]
    new = []
    for name in names:
        with graph.inserting_after(last):
            last = graph.placeholder(name)
        new.append(last)
    info = graph._codegen.pytree_info
    n_past = len(placeholders(gm)) - 3
    in_spec = pytree.tree_flatten(((0, 0, 0, [0] * n_past), {}))[1]
    out_spec = pytree.tree_flatten((0, [0] * n_past))[1]
    graph._codegen.pytree_info = info._replace(in_spec=in_spec, out_spec=out_spec)
    gm._in_spec, gm._out_spec = in_spec, out_spec
    return new


def append_outputs(gm: fx.GraphModule, values: list[fx.Node]) -> None:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (tuple(out.args[0]) + tuple(values),)


def erase_dead(graph: fx.Graph, nodes) -> None:
    for n in reversed(list(nodes)):
        if n.graph is graph and not n.users and n.op == "call_function":
            graph.erase_node(n)
