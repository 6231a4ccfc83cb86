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
from llmc.graph import attr_tensor, between
from llmc.progress import bar, log
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
CALIBRATION_VERSION = 4  # part of the cache fingerprint: bump when what collect_kv records changes


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
    """Every site's calibration data at once, {"<layer>.<kind>": {"x": [N, H*D], "fisher": ...}}:
    `stream_kv` gathered into one dict (memory grows with the number of sites)."""
    return {key: d for _, layer in stream_kv(gm, sites, batches, empty_cache, fisher=fisher, max_tokens=max_tokens,
                                             seed=seed, progress=progress, batch_size=batch_size)
            for key, d in layer.items()}


def stream_kv(gm: fx.GraphModule, sites: list[CacheSite], batches: list[torch.Tensor], empty_cache, *,
              fisher: bool, max_tokens: int, seed: int, progress: bool, batch_size: int | None = None):
    """Run calibration text through `gm` and yield, one layer at a time, (layer, {"<layer>.<kind>": data})
    for the layers of `sites`, where data holds the activations "x" [N, H*D] of up to `max_tokens`
    sampled tokens (pre-RoPE keys, values) and, with `fisher`, "fisher": the squared gradients of the
    LM loss (next-token cross-entropy, a mean per sequence) with respect to them, same shape.

    The graph is cut into its decoder blocks (`split_blocks`) and run block by block over all
    batches, so memory is bounded by one block's work, not the model's. Forward-only, layers come
    first to last and only the current hidden states are kept. With `fisher` they come last to first:
    a forward pass keeps the residual stream entering every block (tokens x hidden x layers floats,
    the one cost that grows with depth, in a temporary file), the head's loss gives the gradient
    leaving the last block,
    and each block is then recomputed with autograd and backpropagated alone (activation
    checkpointing), which gives exactly the gradients of a whole-model backward. Weights are frozen
    meanwhile. Graphs that are not a plain stack of blocks fall back to whole-model passes.
    Sequences run `batch_size` at a time (default: 1 with `fisher`, else 4).
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
    ids = torch.cat([b.reshape(-1, b.shape[-1]) for b in batches])  # [n, S]
    n, S = ids.shape
    batch_size = batch_size or (1 if fisher else 4)  # a backward holds a batch's activations
    gen = torch.Generator().manual_seed(seed)
    per_batch = max(1, math.ceil(max_tokens / math.ceil(n / batch_size)))
    chunks = [ids[i:i + batch_size] for i in range(0, n, batch_size)]
    rows = [torch.randperm(x.numel(), generator=gen)[:min(per_batch, x.numel())].sort().values for x in chunks]
    frozen = [p for p in gm.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        try:
            from llmc.calibration.blocks import split_blocks, split_head

            prefix, needed, blocks = split_blocks(gm)
            head = split_head(gm) if fisher else None
        except PassError as e:
            log(f"kv calibration runs the whole model per batch, not block by block ({e})")
            yield from _whole_model(gm, sites, chunks, rows, empty_cache, fisher, progress)
            return
        params = [{t: attr_tensor(gm, t).detach() for t in blk.params} for blk in blocks]
        yield from _blockwise(sites, chunks, rows, empty_cache, fisher, progress, prefix, needed, blocks, params, head)
    finally:
        _RECORDER = None
        for p in frozen:
            p.requires_grad_(True)
        for p in probes:
            p.replace_all_uses_with(p.args[0])
            graph.erase_node(p)
        gm.recompile()


_HEAD_POSITIONS = 64  # positions per head call in the Fisher pass: bounds the logits held to 64 x vocab per row


def _loss(logits: torch.Tensor, targets: torch.Tensor, length: int) -> torch.Tensor:
    """Next-token cross-entropy of `logits` [B, s, V] for `targets` [B, s], as a part of a mean over each
    sequence's `length` - 1 predictions, summed over the sequences."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum")
    return ce / max(1, length - 1)


def _layer_data(rec: "_Recorder", layer: int, sites: list[CacheSite], fisher: bool) -> dict:
    out = {}
    for s in sites:
        if s.layer == layer:
            key = f"{s.layer}.{s.kind}"
            out[key] = {"x": torch.cat(rec.acts.pop(key))}
            if fisher:
                out[key]["fisher"] = torch.cat(rec.grads.pop(key)).pow(2)
    return out


def _blockwise(sites, chunks, rows, empty_cache, fisher, progress, prefix, needed, blocks, params, head):
    global _RECORDER
    from llmc.calibration.blocks import block_inputs

    layers = sorted({s.layer for s in sites})
    hs, by_shape = block_inputs(prefix, needed, chunks, empty_cache)
    ext = [by_shape[tuple(x.shape)] for x in chunks]  # RoPE tables, masks: one per batch shape
    rec = _Recorder(fisher)
    if not fisher:  # first to last, keeping only the stream entering the current block
        for blk in bar(blocks[:layers[-1] + 1], desc="kv calibration", unit="layer", enabled=progress):
            _RECORDER = rec if blk.index in layers else None
            with torch.no_grad():
                for b, x in enumerate(chunks):
                    rec.rows = rows[b]
                    hs[b] = blk(hs[b], ext[b], params[blk.index])
            _RECORDER = None
            if blk.index in layers:
                yield blk.index, _layer_data(rec, blk.index, sites, fisher)
        return
    stream = _SpilledStream([h.shape for h in hs], len(blocks), hs[0].dtype)  # slot i: entering block i
    grads = []
    for b, x in enumerate(bar(chunks, desc="kv calibration: forward", unit="batch", enabled=progress)):
        h = hs[b]
        hs[b] = None
        with torch.no_grad():
            for blk in blocks:
                stream.put(b, blk.index, h)
                h = blk(h, ext[b], params[blk.index])
        # the gradient leaving the last block, the head run on slices of positions
        h = h.requires_grad_(True)
        S = x.shape[1]
        for s0 in range(0, S - 1, _HEAD_POSITIONS):
            s1 = min(s0 + _HEAD_POSITIONS, S - 1)  # the last position predicts nothing
            with torch.enable_grad():
                _loss(head(h[:, s0:s1]), x[:, s0 + 1:s1 + 1], S).backward()
        grads.append(h.grad if h.grad is not None else torch.zeros_like(h))
    for blk in bar(blocks[layers[0]:][::-1], desc="kv calibration: backward", unit="layer", enabled=progress):
        _RECORDER = rec if blk.index in layers else None
        for b in range(len(chunks)):
            rec.rows = rows[b]
            h = stream.get(b, blk.index).requires_grad_(True)
            with torch.enable_grad():
                blk(h, ext[b], params[blk.index]).backward(grads[b])
            grads[b] = h.grad
        _RECORDER = None
        if blk.index in layers:
            yield blk.index, _layer_data(rec, blk.index, sites, fisher)


class _SpilledStream:
    """The residual stream entering every block, per batch, kept in an unnamed temporary file (in
    TMPDIR) instead of memory: tokens x hidden x layers values are the one part of the Fisher pass
    that grows with depth (0.6 GB for SmolLM2's 8,192 calibration tokens, 4.4 GB at 7B). Each slot is
    written once by the forward pass and read back once by the backward, exactly (raw bytes)."""

    def __init__(self, shapes: list[torch.Size], slots: int, dtype: torch.dtype):
        import tempfile

        self.shapes, self.slots, self.dtype = shapes, slots, dtype
        size = torch.empty((), dtype=dtype).element_size()
        self.nbytes = [math.prod(s) * size for s in shapes]
        self.start = [sum(self.nbytes[:b]) * slots for b in range(len(shapes))]
        self.file = tempfile.TemporaryFile()

    def put(self, batch: int, slot: int, t: torch.Tensor) -> None:
        self.file.seek(self.start[batch] + slot * self.nbytes[batch])
        self.file.write(t.detach().contiguous().view(torch.uint8).numpy())

    def get(self, batch: int, slot: int) -> torch.Tensor:
        out = torch.empty(self.shapes[batch], dtype=self.dtype)
        self.file.seek(self.start[batch] + slot * self.nbytes[batch])
        if self.file.readinto(out.view(torch.uint8).numpy()) != self.nbytes[batch]:
            raise PassError("kv calibration: the temporary file of hidden states was cut short (is TMPDIR full?)")
        return out

    def __del__(self):
        self.file.close()


def _whole_model(gm, sites, chunks, rows, empty_cache, fisher, progress):
    """The fallback: each batch through the whole graph (forward, and backward with `fisher`); all
    layers' data is gathered before any is yielded."""
    global _RECORDER
    rec = _Recorder(fisher)
    _RECORDER = rec
    for b, x in enumerate(bar(chunks, desc="kv calibration", unit="batch", enabled=progress)):
        B, S = x.shape
        rec.rows = rows[b]
        mask = torch.ones(B, S, dtype=torch.long)
        pos = torch.arange(S).expand(B, S)
        with torch.enable_grad() if fisher else torch.no_grad():
            logits = gm(x, mask, pos, empty_cache(B))[0]
            if fisher:
                _loss(logits[:, :-1], x[:, 1:], S).backward()
        del logits
    _RECORDER = None
    # backward runs layers in reverse, but within a site the batches arrive in order
    for layer in sorted({s.layer for s in sites}):
        yield layer, _layer_data(rec, layer, sites, fisher)


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
