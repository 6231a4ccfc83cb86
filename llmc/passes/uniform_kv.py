"""uniform_kv: simulated uniform quantization of the KV cache, the baseline `cq_kv` is measured against.

Two forms. `mode=static`: keys quantized per channel with clipping ranges calibrated per
(layer, head, channel) (KVQuant style, before RoPE), values per token (min/max over the head's
channels), no overhead per token and no float tokens, so its bits are CQ's bits. `mode=kivi`:
KIVI's cache (llmc/ops/kivi.py), min/max per group of 32 tokens (keys, per channel) or 32
channels (values, per token), the newest tokens in float: stronger, at the price of fp16 scales
and zero points (+1 bit per channel at groups of 32) and a float tail. Both simulate a quantized
cache: the cache keeps float tensors holding exactly the dequantized values a quantized cache
would return, so their quality numbers are those of the real thing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import fx

from llmc.errors import ConfigError
from llmc.graph import ancestors, set_attr_tensor
from llmc.kv_cache import CacheSite, cache_sites, call_like, collect_kv
from llmc.passes_base import Pass, PassContext, PassResult, register_pass

aten = torch.ops.aten


def _uniform_keys(graph, x, lo, scale, qmax, like):
    """x̂ = clamp(round((x - lo) / scale), 0, qmax) * scale + lo, for calibrated per-channel lo, scale."""
    q = call_like(graph, aten.round.default, (call_like(graph, aten.div.Tensor, (call_like(graph, aten.sub.Tensor, (x, lo), like),
                                                                        scale), like),), like)
    q = call_like(graph, aten.clamp.default, (q, 0, qmax), like)
    return call_like(graph, aten.add.Tensor, (call_like(graph, aten.mul.Tensor, (q, scale), like), lo), like)


def _uniform_tokens(graph, x, qmax, like):
    """Per-token asymmetric min/max quantization over the last dim, dequantized."""
    lo = call_like(graph, aten.amin.default, (x, [-1], True), like)
    hi = call_like(graph, aten.amax.default, (x, [-1], True), like)
    scale = call_like(graph, aten.clamp_min.default, (call_like(graph, aten.div.Tensor, (
        call_like(graph, aten.sub.Tensor, (hi, lo), like), qmax), like), 1e-8), like)
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
        batches = ctx.require_calibration("uniform_kv")[: self.calib_sequences]
        keys = [s for s in sites if s.kind == "key"]
        data = collect_kv(gm, keys, batches, program.empty_cache, fisher=False,
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
        # A real cache of these codes: keys `bits` per channel (their ranges are per layer, constant);
        # values `bits` plus an fp16 scale and zero point per token and head.
        layout = [dataclasses.replace(ct, meaning=f"{ct.meaning}, uniform {self.bits}-bit "
                                      f"({'per channel' if ct.kind == 'key' else 'per token'}), dequantized",
                                      bits_per_channel=self.bits + (0 if ct.kind == "key" else 32 / ct.shape[3]))
                  for ct in program.cache_layout]
        return PassResult(gm, True, {"bits": self.bits, "layers": len(keys)}, cache_layout=layout)

    def _run_kivi(self, gm: fx.GraphModule, program, sites: list[CacheSite], head_dim: int) -> PassResult:
        if head_dim % self.value_group:
            raise ConfigError(f"uniform_kv.value_group={self.value_group} must divide head_dim {head_dim}")
        graph = gm.graph
        out_node = next(n for n in graph.nodes if n.op == "output")
        for s in sites:
            with graph.inserting_after(s.write):
                present = call_like(graph, torch.ops.llmc.kivi_append.default,
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
        layout = [
            dataclasses.replace(ct, meaning=f"{ct.meaning}, KIVI {self.bits}-bit ({grouping[ct.kind]}, newest "
                                            f"{self.residual} in float), dequantized",
                                bits_per_channel=self.bits + 32 / (self.group if ct.kind == "key" else self.value_group))
            if ct.kind in grouping else ct
            for ct in program.cache_layout]
        return PassResult(gm, True, {"bits": self.bits, "layers": len(sites) // 2,
                                     "bits_per_channel": self.bits + self.overhead_bits()}, cache_layout=layout)
