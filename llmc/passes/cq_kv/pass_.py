"""cq_kv: coupled quantization of the KV cache (CQ, "KV Cache is 1 Bit Per Channel").

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

The obvious alternative at equal bits is the `uniform_kv` pass.
"""

from __future__ import annotations

import operator
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import fx

from llmc.calibration import cache_path, cached_tensors, graph_fingerprint, read_cached
from llmc.errors import ConfigError, PassError
from llmc.graph import between, copy_nodes, drop_input_guards, set_attr_tensor
from llmc.kv_cache import (CALIBRATION_VERSION, CacheSite, add_cache_inputs, append_outputs, attention_users,
                           cache_sites, call_like, erase_dead, placeholders, stream_kv)
from llmc.ops.cq import MAX_BITS, code_dtype, weighted_kmeans
from llmc.passes_base import Pass, PassContext, PassResult, register_pass
from llmc.progress import log
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


def _key_position_tables(gm: fx.GraphModule, sites: list[CacheSite], before: fx.Node, length_of: fx.Node):
    """RoPE tables for every cached key, [B, 1, T, Drot] each, from the attention mask.

    The query tables are computed from position_ids by a subgraph of the traced rotary embedding;
    the same subgraph is copied with position_ids replaced by the keys' positions
    cumsum(mask) - 1 (padding clamped to 0), taken for the T = P + S keys in the cache.
    """
    graph = gm.graph
    ids, mask, pos = placeholders(gm)[:3]
    tables = sites[0].tables
    if any(s.tables != tables for s in sites if s.kind == "key"):
        raise PassError("layers use different RoPE tables; cq_kv expects one rotary embedding for all layers")
    with graph.inserting_before(before):
        cum = call_like(graph, aten.cumsum.default, (mask, 1))
        kpos = call_like(graph, aten.clamp_min.default, (call_like(graph, aten.sub.Tensor, (cum, 1)), 0))
        T = call_like(graph, aten.sym_size.int, (length_of, 2))
        idx = graph.call_function(aten.arange.default, (T,), {"dtype": torch.long})
        kpos = call_like(graph, aten.index_select.default, (kpos, 1, idx))
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
    window = call_like(graph, aten.slice.Tensor, (call_like(graph, aten.cat.default, ([window_past, new], 2), like),
                                              2, -W, _MAXINT), like)
    ext = call_like(graph, aten.cat.default, ([full, window], 2), like)
    T = call_like(graph, aten.sym_size.int, (full, 2), like)
    j = graph.call_function(aten.arange.default, (T,), {"dtype": torch.long})
    recent = call_like(graph, aten.ge.Scalar, (j, call_like(graph, operator.sub, (T, W))), like)
    idx = call_like(graph, aten.where.self, (recent, call_like(graph, aten.add.Tensor, (j, W)), j), like)
    return call_like(graph, aten.index_select.default, (ext, 2, idx), like), window


def _merge_sink(graph: fx.Graph, full: fx.Node, sink_past: fx.Node, new: fx.Node, past_len: fx.Node, N: int,
                like: fx.Node):
    """Attention input with the first N positions from the float sink; and the updated sink.

    sink_past [B, H, N, D] holds cache positions 0..N-1 in float as far as they exist (P of them,
    P = past length). Slot j < P keeps its value, slot j >= P takes new token j - P (index N + j - P
    of cat(sink_past, new), clamped: slots beyond the sequence hold a copy nobody reads). Then
    position j < N of the attention input reads slot j, index T + j of cat(full, sink).
    """
    ext = call_like(graph, aten.cat.default, ([sink_past, new], 2), like)
    L = call_like(graph, aten.sym_size.int, (ext, 2), like)
    slot = graph.call_function(aten.arange.default, (N,), {"dtype": torch.long})
    fresh = call_like(graph, aten.clamp_max.default, (call_like(graph, aten.add.Tensor, (
        call_like(graph, aten.sub.Tensor, (slot, past_len), like), N), like), call_like(graph, operator.sub, (L, 1))), like)
    kept = call_like(graph, aten.lt.Scalar, (slot, past_len), like)
    sink = call_like(graph, aten.index_select.default, (ext, 2, call_like(graph, aten.where.self, (kept, slot, fresh), like)),
                 like)
    T = call_like(graph, aten.sym_size.int, (full, 2), like)
    j = graph.call_function(aten.arange.default, (T,), {"dtype": torch.long})
    first = call_like(graph, aten.lt.Scalar, (j, N), like)
    idx = call_like(graph, aten.where.self, (first, call_like(graph, aten.add.Tensor, (j, T), like), j), like)
    both = call_like(graph, aten.cat.default, ([full, sink], 2), like)
    return call_like(graph, aten.index_select.default, (both, 2, idx), like), sink


# ---------------------------------------------------------------------------------------------
# The passes


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
    tokens: calibration tokens per layer sampled for k-means; minibatch, steps: mini-batch k-means
    (points per codebook and step, steps; minibatch=0: plain Lloyd from k-means++ on all points);
    iters: Lloyd iterations over all points after the mini-batch steps; calib_sequences:
    calibration sequences run (forward + backward); cache_dir: where to keep each layer's collected
    activations and learned codebooks, keyed by a fingerprint of graph, data and options, so a sweep
    over configurations or a rerun after an interruption skips what is done. Calibration streams
    block by block (`llmc.kv_cache.stream_kv`): one layer's activations are held at a time.
    Matches: every float key/value cache write. Emits: llmc::cq_encode / llmc::cq_decode, uint8
    cache inputs/outputs. Numerics: lossy.
    """

    config: str = "4c8b"
    fisher: bool = True
    window: int = 0
    sink: int = 0
    exact_current: bool = True
    tokens: int = 8192
    iters: int = 3
    minibatch: int = 1024
    steps: int = 30
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
        if self.minibatch < 0 or self.steps < 0:
            raise ConfigError("cq_kv.minibatch (points per mini-batch step, 0 = none) and cq_kv.steps must be >= 0")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        c, b = parse_cq_config(self.config)
        batches = ctx.require_calibration("cq_kv")[: self.calib_sequences]
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
        t0 = time.perf_counter()
        learned, kmeans_seconds = self._learn(gm, sites, batches, program.empty_cache, fp, head_dim, ctx)
        seconds = {"calibration": round(time.perf_counter() - t0 - kmeans_seconds, 1),
                   "kmeans": round(kmeans_seconds, 1)}
        codebooks = {(s.layer, s.kind): learned[f"{s.layer}.{s.kind}"] for s in sites}
        kstats = [{"layer": s.layer, "kind": s.kind, "iterations": int(learned[f"{s.layer}.{s.kind}.iterations"]),
                   "relative_mse": round(float(learned[f"{s.layer}.{s.kind}.relative_mse"]), 6)} for s in sites]
        new_layout = self.rewrite(gm, program.cache_layout, sites, codebooks)
        stats = {"bits_per_channel": b / c, "codebook_values": sum(cb.numel() for cb in codebooks.values()),
                 "calibration_tokens": n_tokens, "kmeans": kstats, "seconds": seconds,
                 "mean_relative_mse": {k: round(sum(s["relative_mse"] for s in kstats if s["kind"] == k) /
                                                max(1, sum(s["kind"] == k for s in kstats)), 6)
                                       for k in ("key", "value")}}
        return PassResult(gm, True, stats, cache_layout=new_layout)

    def _learn(self, gm, sites, batches, empty_cache, fp: str, head_dim: int, ctx: PassContext) -> tuple[dict, float]:
        """Codebooks of every site, {"<layer>.<kind>": [H, G, 2^b, c], ... + k-means stats}, learned one
        layer at a time as `stream_kv` yields its data, so only one layer's activations are ever held;
        and the seconds spent in k-means.

        With `cache_dir`, each layer's data and codebooks are kept there as they are made: a rerun
        after an interruption redoes only the missing layers' k-means, and a sweep over `config`
        reuses the collected data."""
        c, b = parse_cq_config(self.config)
        n_tokens = sum(x.numel() for x in batches)
        layers = sorted({s.layer for s in sites})
        km = f"{self.config}-{self.iters}-{self.minibatch}-{self.steps}"
        learned = {}
        for layer in layers:  # layers learned by an earlier run (cache_dir)
            learned.update(read_cached(self.cache_dir, f"cq-{fp}-{km}-layer{layer}") or {})
        todo = [layer for layer in layers
                if any(f"{s.layer}.{s.kind}" not in learned for s in sites if s.layer == layer)]
        if not todo:
            return learned, 0.0
        data_names = {layer: f"kv-{fp}-layer{layer}" for layer in layers}

        def layer_data():  # (layer, its sites' data): kept files one at a time, else from the model
            if self.cache_dir and all(os.path.exists(cache_path(self.cache_dir, data_names[la])) for la in todo):
                for layer in todo:
                    data = read_cached(self.cache_dir, data_names[layer])
                    if data is None:  # unreadable: calibrate again
                        break
                    yield layer, data
                else:
                    return
            log(f"cq_kv: calibrating on {len(batches)} sequences ({n_tokens} tokens, fisher={self.fisher})")
            for layer, per_site in stream_kv(gm, sites, batches, empty_cache, fisher=self.fisher,
                                             max_tokens=self.tokens, seed=ctx.seed, progress=ctx.progress):
                flat = {f"{k}.{f}": t for k, d in per_site.items() for f, t in d.items()}
                yield layer, cached_tensors(self.cache_dir, data_names[layer], lambda: flat)

        threads = torch.get_num_threads()
        kmeans_seconds = 0.0
        with ThreadPoolExecutor(max(1, min(2, threads))) as pool:  # a layer's key and value sites side by side
            for layer, data in layer_data():
                if all(f"{s.layer}.{s.kind}" in learned for s in sites if s.layer == layer):
                    continue
                t0 = time.perf_counter()
                torch.set_num_threads(1)  # each k-means single-threaded on its own worker
                try:
                    fits = list(pool.map(lambda s: self._kmeans(s, data, head_dim, c, b, ctx.seed),
                                         [s for s in sites if s.layer == layer]))
                finally:
                    torch.set_num_threads(threads)
                kmeans_seconds += time.perf_counter() - t0
                out = {k: v for fit in fits for k, v in fit.items()}
                learned.update(cached_tensors(self.cache_dir, f"cq-{fp}-{km}-layer{layer}", lambda o=out: o))
        return learned, kmeans_seconds

    def _kmeans(self, s, data: dict, head_dim: int, c: int, b: int, seed: int) -> dict:
        """One site's codebooks [H, G, 2^b, c] (keyed "<layer>.<kind>") and their k-means stats."""
        key = f"{s.layer}.{s.kind}"
        x = data[f"{key}.x"]
        N, HD = x.shape
        H, G = HD // head_dim, head_dim // c
        pts = x.view(N, H * G, c).transpose(0, 1)  # [H*G, N, c]
        w = None
        if self.fisher:
            w = data[f"{key}.fisher"].view(N, H * G, c).sum(-1).transpose(0, 1)  # [H*G, N]
            w = w / w.amax(-1, keepdim=True).clamp_min(1e-30)
        cent, st = weighted_kmeans(pts, 2 ** b, w, iters=self.iters, minibatch=self.minibatch, steps=self.steps,
                                   seed=seed + 2 * s.layer + (s.kind == "value"))
        rel = st["squared_error"] / max(float(pts.pow(2).sum()), 1e-30)
        return {key: cent.view(H, G, 2 ** b, c), f"{key}.relative_mse": torch.tensor(rel),
                f"{key}.iterations": torch.tensor(st["iterations"])}

    def rewrite(self, gm: fx.GraphModule, layout_in: list[CacheTensor], sites: list[CacheSite],
                codebooks: dict) -> list[CacheTensor]:
        """Turn every site's float cache into codes (see the module docstring); returns the new cache layout."""
        c, b = parse_cq_config(self.config)
        graph = gm.graph
        W, N = self.window, self.sink
        layout = list(layout_in)
        dtype = str(code_dtype(b)).removeprefix("torch.")
        # extra float cache tensors, appended after the codes: (kind suffix, length, meaning)
        extras = [("window", W, f"last {W} positions")] * bool(W) + [("sink", N, f"first {N} positions")] * bool(N)
        extra_inputs = {}
        for suffix, _, _ in extras:
            phs = add_cache_inputs(gm, [f"past_{suffix}_{s.layer}_{s.kind}" for s in sites])
            extra_inputs[suffix] = dict(zip([(s.layer, s.kind) for s in sites], phs))
        tables = None
        new_outputs = {suffix: [] for suffix, _, _ in extras}
        out_node = next(n for n in graph.nodes if n.op == "output")
        for s in sites:
            attn = attention_users(s)
            before = attn[0]
            target = f"model.layers.{s.layer}.self_attn.cq_{s.kind}.codebooks"
            set_attr_tensor(gm, target, codebooks[(s.layer, s.kind)].contiguous(), parameter=False)
            like = s.new
            with graph.inserting_before(before):
                cb = graph.get_attr(target)
                codes = call_like(graph, torch.ops.llmc.cq_encode.default, (s.pre, cb), like)
                present = call_like(graph, aten.cat.default, ([s.past, codes], 2), like)
                if self.exact_current:  # codes of earlier steps, this step's tokens as they are
                    full = call_like(graph, aten.cat.default,
                                 ([call_like(graph, torch.ops.llmc.cq_decode.default, (s.past, cb), like), s.pre], 2), like)
                else:
                    full = call_like(graph, torch.ops.llmc.cq_decode.default, (present, cb), like)
                if W:
                    full, window = _merge_window(graph, full, extra_inputs["window"][(s.layer, s.kind)], s.pre, W, like)
                    new_outputs["window"].append(window)
                if N:
                    past_len = call_like(graph, aten.sym_size.int, (s.past, 2), like)
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
            erase_dead(graph, region)
            idx = layout.index(next(ct for ct in layout if ct.layer == s.layer and ct.kind == s.kind))
            old = layout[idx]
            G = old.shape[3] // c
            what = "key before RoPE" if s.kind == "key" else "value"
            layout[idx] = CacheTensor(old.layer, old.kind, dtype, (old.shape[0], old.shape[1], old.shape[2], G),
                                      f"{what}: CQ {self.config} codes ({b / c:g} bits/channel)",
                                      channels=old.shape[3], bits_per_channel=b / c)
        fdt = layout_in[0].dtype
        for suffix, length, meaning in extras:
            append_outputs(gm, new_outputs[suffix])
            for s in sites:
                old = next(ct for ct in layout_in if ct.layer == s.layer and ct.kind == s.kind)
                what = "keys before RoPE" if s.kind == "key" else "values"
                layout.append(CacheTensor(s.layer, f"{s.kind}_{suffix}", fdt,
                                          (old.shape[0], old.shape[1], length, old.shape[3]), f"{meaning}, {what}, float"))
        for n in graph.nodes:  # placeholders' traced values no longer describe them
            if n.op == "placeholder":
                n.meta.pop("val", None)
        drop_input_guards(gm)
        graph.lint()
        gm.recompile()
        return layout
