"""cq_kv: coupled quantization of the KV cache (CQ, "KV Cache is 1 Bit Per Channel"), and a uniform baseline.

`cq_kv` replaces the float cache of every layer by codes: each group of `c` contiguous channels
of a key (before RoPE) or value is stored as one `b`-bit index into a codebook learned for that
(layer, key/value, KV head, channel group), so a cache entry costs b/c bits per channel. The
codebooks come from k-means on calibration activations, weighted per token by the Fisher
information of the LM loss (squared gradients w.r.t. the same activations).

The rewrite, per layer, of the traced graph's cache write `cat(past, rope(k))` / `cat(past, v)`:

    codes  = cq_encode(k_pre, codebooks_k)          new tokens -> uint8 [B, Hkv, S, D/c]
    present = cat(past_codes, codes)                 what the cache carries, in and out
    k̂_pre  = cat(cq_decode(past_codes), k_pre)       earlier keys dequantized, this step's exact
    k      = rope(k̂_pre) at each key's position     positions from the attention mask
    (values: the same without RoPE)

This is what a decoder that quantizes on write computes (and what Hugging Face's quantized
caches do): a step's own keys and values are at hand unquantized, so they attend to each other
exactly, and everything stored by earlier steps is read back from codes; a prefill's attention is
therefore float, and decoding reads the whole past from codes. `exact_current=false` decodes
this step's codes too (`k̂_pre = cq_decode(present)`), the fully simulated quantization of the
CQ paper's perplexity protocol.

Keys are stored before RoPE because RoPE mixes channel pairs with a position-dependent rotation,
which would smear the channel structure the codebooks learn. Key positions are recomputed from
the attention mask (cumsum - 1), the convention of every llmc runtime and of Hugging Face's
generate; callers that feed other position ids with a CQ cache get keys rotated differently.

With `window=W`, the W most recent tokens are also kept in full precision (a second cache tensor
of fixed length W per key/value and layer) and attention reads those W from it. `sink=N` does the
same for the first N cache positions, which small models use as attention sinks.

`uniform_kv` is the obvious alternative, for comparison, in two forms. `mode=static`: keys
quantized per channel with clipping ranges calibrated per (layer, head, channel) (KVQuant style,
before RoPE), values per token (min/max over the head's channels), no overhead per token and no
float tokens, so its bits are CQ's bits. `mode=kivi`: KIVI's cache (llmc/ops/kivi.py), min/max
per group of 32 tokens (keys, per channel) or 32 channels (values, per token), the newest tokens
in float: stronger, at the price of fp16 scales and zero points (+1 bit per channel at groups of
32) and a float tail. Both simulate a quantized cache: the cache keeps float tensors holding
exactly the dequantized values a quantized cache would return, so their quality numbers are
those of the real thing.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx
from torch.utils import _pytree as pytree

from llmc.errors import ConfigError, PassError
from llmc.fsutil import atomic_file, tensor_digest
from llmc.graph import ancestors, between, copy_nodes, drop_input_guards, graph_digest, set_attr_tensor
from llmc.ops.cq import MAX_BITS, code_dtype, weighted_kmeans
from llmc.passes_base import Pass, PassContext, PassResult, register_pass
from llmc.progress import bar, log
from llmc.trace import CacheTensor

aten = torch.ops.aten
_MAXINT = 9223372036854775807
_CONFIG = re.compile(r"^(\d+)c(\d+)b$")


def parse_cq_config(config: str) -> tuple[int, int]:
    """`<c>c<b>b` -> (channels per group c, bits per code b). 4c8b = 2 bits per channel."""
    m = _CONFIG.match(str(config).strip())
    if not m:
        raise ConfigError(f"cq_kv.config must look like '<c>c<b>b' (e.g. 4c8b = 4 channels per 8-bit code, "
                          f"2 bits/channel), got '{config}'")
    c, b = int(m.group(1)), int(m.group(2))
    if c < 1:
        raise ConfigError(f"cq_kv.config '{config}': channels per group must be >= 1")
    if not 1 <= b <= MAX_BITS:
        raise ConfigError(f"cq_kv.config '{config}': bits per code must be in 1..{MAX_BITS} (a codebook of 2^b "
                          f"centroids), got {b}")
    return c, b


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


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
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
    past = _placeholders(gm)[3:]
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


def _attention_users(site: CacheSite) -> list[fx.Node]:
    return [u for u in site.write.users if u.op != "output"]


# ---------------------------------------------------------------------------------------------
# Calibration: pre-RoPE keys, values and their Fisher weights


_RECORDER = None
CALIBRATION_VERSION = 2  # part of the cache fingerprint: bump when what collect_kv records changes


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
               fisher: bool, max_tokens: int, seed: int, progress: bool, batch_size: int = 4) -> dict:
    """Run calibration text through `gm`; per site key "<layer>.<kind>": activations [N, H*D] (and
    Fisher weights, the squared LM-loss gradients, same shape) for up to `max_tokens` sampled tokens.

    Probes are spliced into the graph for the run and removed afterwards. With `fisher`, each
    batch runs forward and backward (next-token cross-entropy), one batch in memory at a time.
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
    ids = torch.cat([b.reshape(-1, b.shape[-1]) for b in batches])  # [n, S]
    n, S = ids.shape
    per_batch = max(1, math.ceil(max_tokens / math.ceil(n / batch_size)))
    _RECORDER = rec
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
# Graph surgery shared by both passes


def _call(graph: fx.Graph, target, args, like: fx.Node | None = None) -> fx.Node:
    n = graph.call_function(target, args)
    if like is not None and "nn_module_stack" in like.meta:
        n.meta["nn_module_stack"] = dict(like.meta["nn_module_stack"])
    return n


def _add_cache_inputs(gm: fx.GraphModule, names: list[str]) -> list[fx.Node]:
    """Append cache inputs to the graph (after the existing ones) and to its pytree signature.

    The graph's signature is `(input_ids, attention_mask, position_ids, past: list)` returning
    `(logits, present: list)`; new tensors extend both lists. Returns the new placeholders.
    """
    graph = gm.graph
    last = _placeholders(gm)[-1]
    new = []
    for name in names:
        with graph.inserting_after(last):
            last = graph.placeholder(name)
        new.append(last)
    info = graph._codegen.pytree_info
    n_past = len(_placeholders(gm)) - 3
    in_spec = pytree.tree_flatten(((0, 0, 0, [0] * n_past), {}))[1]
    out_spec = pytree.tree_flatten((0, [0] * n_past))[1]
    graph._codegen.pytree_info = info._replace(in_spec=in_spec, out_spec=out_spec)
    gm._in_spec, gm._out_spec = in_spec, out_spec
    return new


def _append_outputs(gm: fx.GraphModule, values: list[fx.Node]) -> None:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (tuple(out.args[0]) + tuple(values),)


def _erase_dead(graph: fx.Graph, nodes) -> None:
    for n in reversed(list(nodes)):
        if n.graph is graph and not n.users and n.op == "call_function":
            graph.erase_node(n)


def _key_position_tables(gm: fx.GraphModule, sites: list[CacheSite], before: fx.Node, length_of: fx.Node):
    """RoPE tables for every cached key, [B, 1, T, Drot] each, from the attention mask.

    The query tables are computed from position_ids by a subgraph of the traced rotary embedding;
    the same subgraph is copied with position_ids replaced by the keys' positions
    cumsum(mask) - 1 (padding clamped to 0), taken for the T = P + S keys in the cache.
    """
    graph = gm.graph
    ids, mask, pos = _placeholders(gm)[:3]
    tables = sites[0].tables
    if any(s.tables != tables for s in sites if s.kind == "key"):
        raise PassError("layers use different RoPE tables; cq_kv expects one rotary embedding for all layers")
    with graph.inserting_before(before):
        cum = _call(graph, aten.cumsum.default, (mask, 1))
        kpos = _call(graph, aten.clamp_min.default, (_call(graph, aten.sub.Tensor, (cum, 1)), 0))
        T = _call(graph, aten.sym_size.int, (length_of, 2))
        idx = graph.call_function(aten.arange.default, (T,), {"dtype": torch.long})
        kpos = _call(graph, aten.index_select.default, (kpos, 1, idx))
    nodes = {n for t in tables for n in between(pos, t) + [t]}
    if not all(pos in t.all_input_nodes or between(pos, t) for t in tables):
        raise PassError("the RoPE tables do not depend on position_ids; cannot recompute them for cached keys")
    copies = copy_nodes(graph, list(nodes), {pos: kpos}, before)
    return {t: copies[t] for t in tables}


def _merge_window(graph: fx.Graph, full: fx.Node, window_past: fx.Node, new: fx.Node, W: int, like: fx.Node):
    """Attention input with the last W positions from the float window; and the updated window.

    full [B, H, T, D] holds every position dequantized; window_past [B, H, W, D] the last W float
    positions before this step (zeros where the sequence was shorter). Position j >= T - W reads
    window slot j - (T - W) of the updated window, i.e. index j + W of cat(full, window).
    """
    window = _call(graph, aten.slice.Tensor, (_call(graph, aten.cat.default, ([window_past, new], 2), like),
                                              2, -W, _MAXINT), like)
    ext = _call(graph, aten.cat.default, ([full, window], 2), like)
    T = _call(graph, aten.sym_size.int, (full, 2), like)
    j = graph.call_function(aten.arange.default, (T,), {"dtype": torch.long})
    recent = _call(graph, aten.ge.Scalar, (j, _call(graph, operator.sub, (T, W))), like)
    idx = _call(graph, aten.where.self, (recent, _call(graph, aten.add.Tensor, (j, W)), j), like)
    return _call(graph, aten.index_select.default, (ext, 2, idx), like), window


def _merge_sink(graph: fx.Graph, full: fx.Node, sink_past: fx.Node, new: fx.Node, past_len: fx.Node, N: int,
                like: fx.Node):
    """Attention input with the first N positions from the float sink; and the updated sink.

    sink_past [B, H, N, D] holds cache positions 0..N-1 in float as far as they exist (P of them,
    P = past length). Slot j < P keeps its value, slot j >= P takes new token j - P (index N + j - P
    of cat(sink_past, new), clamped: slots beyond the sequence hold a copy nobody reads). Then
    position j < N of the attention input reads slot j, index T + j of cat(full, sink).
    """
    ext = _call(graph, aten.cat.default, ([sink_past, new], 2), like)
    L = _call(graph, aten.sym_size.int, (ext, 2), like)
    slot = graph.call_function(aten.arange.default, (N,), {"dtype": torch.long})
    fresh = _call(graph, aten.clamp_max.default, (_call(graph, aten.add.Tensor, (
        _call(graph, aten.sub.Tensor, (slot, past_len), like), N), like), _call(graph, operator.sub, (L, 1))), like)
    kept = _call(graph, aten.lt.Scalar, (slot, past_len), like)
    sink = _call(graph, aten.index_select.default, (ext, 2, _call(graph, aten.where.self, (kept, slot, fresh), like)),
                 like)
    T = _call(graph, aten.sym_size.int, (full, 2), like)
    j = graph.call_function(aten.arange.default, (T,), {"dtype": torch.long})
    first = _call(graph, aten.lt.Scalar, (j, N), like)
    idx = _call(graph, aten.where.self, (first, _call(graph, aten.add.Tensor, (j, T), like), j), like)
    both = _call(graph, aten.cat.default, ([full, sink], 2), like)
    return _call(graph, aten.index_select.default, (both, 2, idx), like), sink


# ---------------------------------------------------------------------------------------------
# The passes


def graph_fingerprint(gm: fx.GraphModule, batches: list[torch.Tensor], *extra) -> str:
    """A digest of what calibration results depend on: the graph's code and state, the data, options."""
    return tensor_digest(batches, graph_digest(gm) + repr(extra))[:16]


def _cached(cache_dir: str, name: str, compute):
    """`compute()` -> dict of tensors, stored as `cache_dir/name.safetensors` and reused when present."""
    if not cache_dir:
        return compute()
    from safetensors.torch import load_file, save_file

    path = os.path.join(os.path.expanduser(cache_dir), name + ".safetensors")
    if os.path.exists(path):
        try:
            out = load_file(path)
            log(f"reusing {path}")
            return out
        except Exception as e:  # a damaged file is recomputed, not trusted
            log(f"ignoring unreadable {path}: {e}")
    out = compute()
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in out.items()}, tmp)
    return out


def _check_calibration(ctx: PassContext, name: str) -> list[torch.Tensor]:
    if not ctx.calibration:
        raise ConfigError(f"{name} needs calibration data: pass calibration=... to llmc.compile or --calib")
    if ctx.program is None:
        raise PassError(f"{name} needs the Program (its cache layout) in the pass context")
    return ctx.calibration


@register_pass("cq_kv")
@dataclass(frozen=True)
class CoupledKVQuant(Pass):
    """Store the KV cache as coupled-quantization codes (b/c bits per channel).

    Options: config `<c>c<b>b` (8c8b = 1 bit/channel, 4c8b = 2, 2c8b = 4); fisher: weight k-means
    by the Fisher information (else plain k-means); window: recent tokens also kept in float;
    sink: the first cache positions also kept in float (attention sinks; with left padding these
    are the first slots of the cache, padding included); exact_current (default true): the tokens
    of a step attend to each other's unquantized keys and values, as a decoder that quantizes on
    write does (module docstring); false reads them back from their codes too;
    tokens: calibration tokens per layer sampled for k-means; iters: k-means iterations;
    calib_sequences: calibration sequences run (forward + backward); cache_dir: where to keep the
    collected activations and learned codebooks, keyed by a fingerprint of graph, data and
    options, so a sweep over configurations or a rerun after an interruption skips what is done.
    Matches: every float key/value cache write. Emits: llmc::cq_encode / llmc::cq_decode, uint8
    cache inputs/outputs. Numerics: lossy.
    """

    config: str = "4c8b"
    fisher: bool = True
    window: int = 0
    sink: int = 0
    exact_current: bool = True
    tokens: int = 8192
    iters: int = 20
    calib_sequences: int = 16
    cache_dir: str = ""

    requires = ("calibration", "float_kv_cache")
    invalidates = ("float_kv_cache",)
    provides = ("quantized_kv_cache",)

    def __post_init__(self):
        parse_cq_config(self.config)
        if self.window < 0:
            raise ConfigError(f"cq_kv.window must be >= 0 (recent tokens kept in float), got {self.window}")
        if self.sink < 0:
            raise ConfigError(f"cq_kv.sink must be >= 0 (first cache positions kept in float), got {self.sink}")
        if self.tokens < 2 ** parse_cq_config(self.config)[1]:
            raise ConfigError(f"cq_kv.tokens ({self.tokens}) must be at least the codebook size "
                              f"2^{parse_cq_config(self.config)[1]}")
        if self.iters < 1 or self.calib_sequences < 1:
            raise ConfigError("cq_kv.iters and cq_kv.calib_sequences must be >= 1")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        c, b = parse_cq_config(self.config)
        batches = _check_calibration(ctx, "cq_kv")[: self.calib_sequences]
        program = ctx.program
        layout = program.cache_layout
        head_dim = layout[0].shape[3]
        if head_dim % c:
            raise ConfigError(f"cq_kv.config '{self.config}': {c} channels per group must divide head_dim {head_dim}")
        sites = cache_sites(gm, layout)
        n_tokens = sum(x.numel() for x in batches)
        if n_tokens < 2 ** b:
            raise ConfigError(f"cq_kv: {n_tokens} calibration tokens, fewer than the {2 ** b} centroids of a codebook")
        fp = graph_fingerprint(gm, batches, "cq_kv", CALIBRATION_VERSION, self.fisher, self.tokens, ctx.seed)

        def calibrate():
            log(f"cq_kv: calibrating on {len(batches)} sequences ({n_tokens} tokens, fisher={self.fisher})")
            data = collect_kv(gm, sites, batches, lambda B: program.empty_cache(B, 0), fisher=self.fisher,
                              max_tokens=self.tokens, seed=ctx.seed, progress=ctx.progress)
            return {f"{k}.{f}": t for k, d in data.items() for f, t in d.items()}

        def learn():
            data = _cached(self.cache_dir, f"kv-{fp}", calibrate)
            out = {}
            for s in bar(sites, desc="cq_kv k-means", unit="tensor", enabled=ctx.progress):
                key = f"{s.layer}.{s.kind}"
                x = data[f"{key}.x"]
                N, HD = x.shape
                H, G = HD // head_dim, head_dim // c
                pts = x.view(N, H * G, c).transpose(0, 1)  # [H*G, N, c]
                w = None
                if self.fisher:
                    w = data[f"{key}.fisher"].view(N, H * G, c).sum(-1).transpose(0, 1)  # [H*G, N]
                    w = w / w.amax(-1, keepdim=True).clamp_min(1e-30)
                cent, st = weighted_kmeans(pts, 2 ** b, w, iters=self.iters,
                                           seed=ctx.seed + 2 * s.layer + (s.kind == "value"))
                out[key] = cent.view(H, G, 2 ** b, c)
                err = float(self._sq_error(pts, cent))
                out[f"{key}.relative_mse"] = torch.tensor(err / max(float(pts.pow(2).sum()), 1e-30))
                out[f"{key}.iterations"] = torch.tensor(st["iterations"])
            return out

        learned = _cached(self.cache_dir, f"cq-{fp}-{self.config}-{self.iters}", learn)
        codebooks = {(s.layer, s.kind): learned[f"{s.layer}.{s.kind}"] for s in sites}
        kstats = [{"layer": s.layer, "kind": s.kind, "iterations": int(learned[f"{s.layer}.{s.kind}.iterations"]),
                   "relative_mse": round(float(learned[f"{s.layer}.{s.kind}.relative_mse"]), 6)} for s in sites]
        self.rewrite(gm, program, sites, codebooks)
        stats = {"bits_per_channel": b / c, "codebook_values": sum(cb.numel() for cb in codebooks.values()),
                 "calibration_tokens": n_tokens, "kmeans": kstats,
                 "mean_relative_mse": {k: round(sum(s["relative_mse"] for s in kstats if s["kind"] == k) /
                                                max(1, sum(s["kind"] == k for s in kstats)), 6)
                                       for k in ("key", "value")}}
        return PassResult(gm, True, stats)

    @staticmethod
    def _sq_error(points: torch.Tensor, cent: torch.Tensor) -> torch.Tensor:
        from llmc.ops.cq import nearest

        return nearest(points, cent)[1].sum()

    def rewrite(self, gm: fx.GraphModule, program, sites: list[CacheSite], codebooks: dict) -> None:
        """Turn every site's float cache into codes (see the module docstring); updates program.cache_layout."""
        c, b = parse_cq_config(self.config)
        graph = gm.graph
        W, N = self.window, self.sink
        layout = list(program.cache_layout)
        dtype = str(code_dtype(b)).removeprefix("torch.")
        # extra float cache tensors, appended after the codes: (kind suffix, length, meaning)
        extras = [("window", W, f"last {W} positions")] * bool(W) + [("sink", N, f"first {N} positions")] * bool(N)
        extra_inputs = {}
        for suffix, _, _ in extras:
            phs = _add_cache_inputs(gm, [f"past_{suffix}_{s.layer}_{s.kind}" for s in sites])
            extra_inputs[suffix] = dict(zip([(s.layer, s.kind) for s in sites], phs))
        tables = None
        new_outputs = {suffix: [] for suffix, _, _ in extras}
        out_node = next(n for n in graph.nodes if n.op == "output")
        for s in sites:
            attn = _attention_users(s)
            before = attn[0]
            target = f"model.layers.{s.layer}.self_attn.cq_{s.kind}.codebooks"
            set_attr_tensor(gm, target, codebooks[(s.layer, s.kind)].contiguous(), parameter=False)
            like = s.new
            with graph.inserting_before(before):
                cb = graph.get_attr(target)
                codes = _call(graph, torch.ops.llmc.cq_encode.default, (s.pre, cb), like)
                present = _call(graph, aten.cat.default, ([s.past, codes], 2), like)
                if self.exact_current:  # codes of earlier steps, this step's tokens as they are
                    full = _call(graph, aten.cat.default,
                                 ([_call(graph, torch.ops.llmc.cq_decode.default, (s.past, cb), like), s.pre], 2), like)
                else:
                    full = _call(graph, torch.ops.llmc.cq_decode.default, (present, cb), like)
                if W:
                    full, window = _merge_window(graph, full, extra_inputs["window"][(s.layer, s.kind)], s.pre, W, like)
                    new_outputs["window"].append(window)
                if N:
                    past_len = _call(graph, aten.sym_size.int, (s.past, 2), like)
                    full, sink = _merge_sink(graph, full, extra_inputs["sink"][(s.layer, s.kind)], s.pre, past_len,
                                             N, like)
                    new_outputs["sink"].append(sink)
            if s.kind == "key":
                if tables is None:
                    tables = _key_position_tables(gm, sites, before, present)
                region = between(s.pre, s.new) + [s.new]
                subs = {s.pre: full, **{t: tables[t] for t in s.tables}}
                full = copy_nodes(graph, region, subs, before)[s.new]
            else:
                region = []
            for u in attn:
                u.replace_input_with(s.write, full)
            out_node.replace_input_with(s.write, present)
            graph.erase_node(s.write)
            _erase_dead(graph, region)
            idx = layout.index(next(ct for ct in layout if ct.layer == s.layer and ct.kind == s.kind))
            old = layout[idx]
            G = old.shape[3] // c
            what = "key before RoPE" if s.kind == "key" else "value"
            layout[idx] = CacheTensor(old.layer, old.kind, dtype, (old.shape[0], old.shape[1], old.shape[2], G),
                                      f"{what}: CQ {self.config} codes ({b / c:g} bits/channel)")
        fdt = program.cache_layout[0].dtype
        for suffix, length, meaning in extras:
            _append_outputs(gm, new_outputs[suffix])
            for s in sites:
                old = next(ct for ct in program.cache_layout if ct.layer == s.layer and ct.kind == s.kind)
                what = "keys before RoPE" if s.kind == "key" else "values"
                layout.append(CacheTensor(s.layer, f"{s.kind}_{suffix}", fdt,
                                          (old.shape[0], old.shape[1], length, old.shape[3]), f"{meaning}, {what}, float"))
        for n in graph.nodes:  # placeholders' traced values no longer describe them
            if n.op == "placeholder":
                n.meta.pop("val", None)
        drop_input_guards(gm)
        graph.lint()
        gm.recompile()
        program.cache_layout = layout


def _uniform_keys(graph, x, lo, scale, qmax, like):
    """x̂ = clamp(round((x - lo) / scale), 0, qmax) * scale + lo, for calibrated per-channel lo, scale."""
    q = _call(graph, aten.round.default, (_call(graph, aten.div.Tensor, (_call(graph, aten.sub.Tensor, (x, lo), like),
                                                                        scale), like),), like)
    q = _call(graph, aten.clamp.default, (q, 0, qmax), like)
    return _call(graph, aten.add.Tensor, (_call(graph, aten.mul.Tensor, (q, scale), like), lo), like)


def _uniform_tokens(graph, x, qmax, like):
    """Per-token asymmetric min/max quantization over the last dim, dequantized."""
    lo = _call(graph, aten.amin.default, (x, [-1], True), like)
    hi = _call(graph, aten.amax.default, (x, [-1], True), like)
    scale = _call(graph, aten.clamp_min.default, (_call(graph, aten.div.Tensor, (
        _call(graph, aten.sub.Tensor, (hi, lo), like), qmax), like), 1e-8), like)
    return _uniform_keys(graph, x, lo, scale, qmax, like)


def calibrate_channel_ranges(x: torch.Tensor, bits: int, head_dim: int,
                             clips=(1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (lo, scale) of x [N, H*D] for `bits`-bit uniform codes, clipping chosen per channel.

    Each channel tries its min/max range shrunk by each factor in `clips` (around its midpoint)
    and keeps the one with the least squared error on x. Returns lo, scale as [1, H, 1, D].
    """
    qmax = 2 ** bits - 1
    lo0, hi0 = x.amin(0), x.amax(0)
    mid, half = (lo0 + hi0) / 2, (hi0 - lo0) / 2
    best_err, best_lo, best_scale = None, None, None
    for f in clips:
        lo = mid - half * f
        scale = (2 * half * f / qmax).clamp_min(1e-8)
        err = ((torch.clamp(torch.round((x - lo) / scale), 0, qmax) * scale + lo - x) ** 2).sum(0)
        if best_err is None:
            best_err, best_lo, best_scale = err, lo, scale
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_scale = torch.where(better, lo, best_lo), torch.where(better, scale, best_scale)
    H = x.shape[1] // head_dim
    return best_lo.view(1, H, 1, head_dim), best_scale.view(1, H, 1, head_dim)


@register_pass("uniform_kv")
@dataclass(frozen=True)
class UniformKVQuant(Pass):
    """Simulated uniform KV-cache quantization, the baseline for cq_kv at equal bits.

    mode=static: keys (before RoPE) per channel, with ranges calibrated per (layer, head,
    channel) and the clipping that minimises the error on calibration keys; values per token,
    min/max over the head's channels. No per-token overhead for keys, no float tokens.
    mode=kivi: KIVI's cache (llmc/ops/kivi.py): keys (after RoPE, as the cache holds them) per
    channel over groups of `group` tokens, values per token over groups of `value_group`
    channels, each group with its own min/max, and the `residual` newest tokens (plus an
    unfinished key group) kept in float. Needs no calibration. exact_current: as cq_kv's.
    The cache stays float and holds the dequantized values (module docstring).
    Options: bits (1..8), mode, group, value_group, residual, exact_current, calib_sequences, tokens.
    Numerics: lossy.
    """

    bits: int = 2
    mode: str = dataclasses.field(default="static", metadata={"help": "static | kivi"})
    group: int = dataclasses.field(default=32, metadata={"help": "kivi: tokens per key group"})
    value_group: int = dataclasses.field(default=32, metadata={"help": "kivi: channels per value group"})
    residual: int = dataclasses.field(default=128, metadata={"help": "kivi: newest tokens kept in float"})
    exact_current: bool = dataclasses.field(default=False, metadata={
        "help": "kivi: a step's tokens attend to each other unquantized (as cq_kv's option)"})
    tokens: int = 8192
    calib_sequences: int = 16

    requires = ("float_kv_cache",)  # mode=static also needs calibration: checked when it runs
    invalidates = ("float_kv_cache",)
    provides = ("quantized_kv_cache",)

    def __post_init__(self):
        if not 1 <= self.bits <= 8:
            raise ConfigError(f"uniform_kv.bits must be in 1..8, got {self.bits}")
        if self.mode not in ("static", "kivi"):
            raise ConfigError(f"uniform_kv.mode must be 'static' or 'kivi', got '{self.mode}'")
        if self.exact_current and self.mode != "kivi":
            raise ConfigError("uniform_kv.exact_current needs mode=kivi")
        if self.group < 1 or self.value_group < 1 or self.residual < 0:
            raise ConfigError(f"uniform_kv needs group >= 1, value_group >= 1 and residual >= 0, got group="
                              f"{self.group}, value_group={self.value_group}, residual={self.residual}")

    def overhead_bits(self) -> float:
        """Bits per cached channel for scales and zero points (fp16 each): kivi mode only."""
        return 16 / self.group + 16 / self.value_group if self.mode == "kivi" else 0.0

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        program = ctx.program
        head_dim = program.cache_layout[0].shape[3]
        sites = cache_sites(gm, program.cache_layout)
        if self.mode == "kivi":
            return self._run_kivi(gm, program, sites, head_dim)
        batches = _check_calibration(ctx, "uniform_kv")[: self.calib_sequences]
        keys = [s for s in sites if s.kind == "key"]
        data = collect_kv(gm, keys, batches, lambda B: program.empty_cache(B, 0), fisher=False,
                          max_tokens=self.tokens, seed=ctx.seed, progress=ctx.progress)
        qmax = 2 ** self.bits - 1
        graph = gm.graph
        for s in sites:
            like = s.new
            first_user = next(n for n in graph.nodes if n in s.pre.users)
            with graph.inserting_before(first_user):
                if s.kind == "key":
                    lo, scale = calibrate_channel_ranges(data[f"{s.layer}.key"]["x"], self.bits, head_dim)
                    base = f"model.layers.{s.layer}.self_attn.uniform_key"
                    set_attr_tensor(gm, f"{base}.zero", lo, parameter=False)
                    set_attr_tensor(gm, f"{base}.scale", scale, parameter=False)
                    xq = _uniform_keys(graph, s.pre, graph.get_attr(f"{base}.zero"), graph.get_attr(f"{base}.scale"),
                                       qmax, like)
                else:
                    xq = _uniform_tokens(graph, s.pre, qmax, like)
            s.pre.replace_all_uses_with(xq, delete_user_cb=lambda u: u.graph is graph and u not in ancestors(xq))
        graph.lint()
        gm.recompile()
        layout = [dataclasses.replace(ct, meaning=f"{ct.meaning}, uniform {self.bits}-bit "
                                      f"({'per channel' if ct.kind == 'key' else 'per token'}), dequantized")
                  for ct in program.cache_layout]
        program.cache_layout = layout
        return PassResult(gm, True, {"bits": self.bits, "layers": len(keys)})

    def _run_kivi(self, gm: fx.GraphModule, program, sites: list[CacheSite], head_dim: int) -> PassResult:
        if head_dim % self.value_group:
            raise ConfigError(f"uniform_kv.value_group={self.value_group} must divide head_dim {head_dim}")
        graph = gm.graph
        out_node = next(n for n in graph.nodes if n.op == "output")
        for s in sites:
            with graph.inserting_after(s.write):
                present = _call(graph, torch.ops.llmc.kivi_append.default,
                                (s.past, s.new, self.bits, self.group, self.value_group, self.residual,
                                 s.kind == "key"), like=s.new)
            if self.exact_current:  # attention reads cat(past as stored, new as computed); the cache gets `present`
                out_node.replace_input_with(s.write, present)
            else:
                s.write.replace_all_uses_with(present)
                graph.erase_node(s.write)
        graph.lint()
        gm.recompile()
        grouping = {"key": f"per channel over {self.group} tokens", "value": f"per token over {self.value_group} channels"}
        program.cache_layout = [
            dataclasses.replace(ct, meaning=f"{ct.meaning}, KIVI {self.bits}-bit ({grouping[ct.kind]}, newest "
                                            f"{self.residual} in float), dequantized") if ct.kind in grouping else ct
            for ct in program.cache_layout]
        return PassResult(gm, True, {"bits": self.bits, "layers": len(sites) // 2,
                                     "bits_per_channel": self.bits + self.overhead_bits()})
