"""Frontend: trace a Hugging Face causal LM into an FX graph with a functional KV cache.

The traced function is one decode step,

    (input_ids [B, S], attention_mask [B, P+S], position_ids [B, S], past [2L x (B, Hkv, P, D)])
        -> (logits [B, S, V], present [2L x (B, Hkv, P+S, D)])

with batch, sequence and past length dynamic. Prefill is the same graph with an empty past (P = 0).

llmc owns the attention block instead of tracing Hugging Face's: `DecoderStep` reuses the model's
own submodules (embeddings, norms, projections, MLPs, rotary embedding, lm_head) under their
original names (`model.layers.3.mlp.down_proj`), but writes the cache update and the masked
attention itself. That makes the cache write an explicit `cat(past, new)` node that cache passes
can rewrite, keeps Hugging Face's mask and cache machinery (data-dependent branches, mutable cache
objects) out of the graph, and gives a graph with nothing but tensor ops. Its numerics are checked
against Hugging Face's `generate` for every supported architecture in the tests.

What differs between model families (module paths, qkv layout, q/k norms, residual wiring, the
scalars of Gemma 2 or Granite, routed experts) is data: one `Family` per `model_type` in `FAMILIES`
(docs/families.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmc.errors import TraceError, UnsupportedArchitectureError


@dataclass(frozen=True)
class Family:
    """What the tracer must know about one model family beyond the modules it reuses.

    Norms, activations and biases live in the model's own modules (an `nn.LayerNorm` with bias, a
    Gemma RMSNorm scaling by 1 + w, a GeGLU MLP), so they need no entry here; this is only what
    sits *between* modules: where they are, how the residual stream is wired, and the scalars that
    multiply it. A new family is one entry here plus what is truly new.
    """

    description: str
    # Module paths in the Hugging Face model.
    body: str = "model"  # the decoder body under the causal LM
    embed: str = "embed_tokens"
    final_norm: str = "norm"
    attn: str = "self_attn"  # attention module in a layer
    out_proj: str = "o_proj"
    # "separate" q/k/v_proj; "fused" one qkv_proj [q | k | v]; "fused_per_head" one projection laid out
    # per head as [H, 3, D] (GPT-NeoX's query_key_value).
    qkv: str = "separate"
    qkv_proj: str = "qkv_proj"
    # Query/key norms, applied when the attention module has them: "head" normalises each head's
    # D channels, "full" the whole H*D projection before it is split into heads (OLMo 2).
    qk_norm: str = "head"
    qk_norm_names: tuple = ("q_norm", "k_norm")
    # Residual wiring of a layer (x: the stream; ln1/ln2 input_layernorm/post_attention_layernorm):
    #   "pre":      x += attn(ln1(x)); x += mlp(ln2(x))
    #   "sandwich": x += post_attention_layernorm(attn(ln1(x)))
    #               x += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))
    #   "post":     x += post_attention_layernorm(attn(x)); x += post_feedforward_layernorm(mlp(x))
    #   "parallel": x += attn(ln1(x)) + mlp(ln2(x))   (ln2 = ln1 when the layer has none)
    residual: str = "pre"
    parallel_flag: str | None = None  # config flag that switches "pre" to "parallel" (GPT-NeoX, StableLM)
    # Scalars read from the config (None: not used).
    embedding_multiplier: str | None = None  # x = embed(ids) * c
    residual_multiplier: str | None = None  # x += c * branch
    logits_divisor: str | None = None  # logits / c
    final_softcap: str | None = None  # logits = c * tanh(logits / c)
    attn_softcap: str | None = None  # scores = c * tanh(scores / c), before the mask
    rotary_per_layer_type: bool = False  # rotary_emb(x, pos, layer_type): local and global RoPE bases
    moe: bool = False  # `mlp` is a routed mixture of experts in layers that have a router


# model_type -> Family. The query scaling always comes from the attention module's `scaling`, and
# sliding windows from its `sliding_window` (per layer) or the config's.
FAMILIES = {
    "llama": Family("separate q/k/v projections"),
    "mistral": Family("separate q/k/v projections, sliding window"),
    "qwen2": Family("separate q/k/v projections with bias"),
    "qwen3": Family("separate q/k/v projections, per-head q/k RMSNorm"),
    "phi3": Family("fused qkv_proj, fused gate_up_proj", qkv="fused"),
    "gemma": Family("RMSNorm scaling by 1 + w, embeddings scaled by sqrt(hidden), GeGLU"),
    "gemma2": Family("pre- and post-norms around attention and MLP, attention and final logit soft-capping, "
                     "query_pre_attn_scalar, alternating sliding-window and global layers",
                     residual="sandwich", attn_softcap="attn_logit_softcapping",
                     final_softcap="final_logit_softcapping"),
    "gemma3_text": Family("gemma2's layout plus per-head q/k RMSNorm and a local RoPE base on sliding layers",
                          residual="sandwich", attn_softcap="attn_logit_softcapping",
                          final_softcap="final_logit_softcapping", rotary_per_layer_type=True),
    "olmo2": Family("norms after attention and MLP (no input norms), q/k RMSNorm over the whole projection",
                    residual="post", qk_norm="full"),
    "granite": Family("embedding, residual, attention and logit multipliers",
                      embedding_multiplier="embedding_multiplier", residual_multiplier="residual_multiplier",
                      logits_divisor="logits_scaling"),
    "stablelm": Family("LayerNorm, partial rotary, optional q/k bias, per-head q/k LayerNorm and parallel residual",
                       qk_norm_names=("q_layernorm", "k_layernorm"), parallel_flag="use_parallel_residual"),
    "gpt_neox": Family("fused per-head query_key_value, LayerNorm with bias, partial rotary, parallel residual",
                       body="gpt_neox", embed="embed_in", final_norm="final_layer_norm", attn="attention",
                       out_proj="dense", qkv="fused_per_head", qkv_proj="query_key_value",
                       parallel_flag="use_parallel_residual"),
    "starcoder2": Family("LayerNorm with bias, biases everywhere, GELU MLP (c_fc/c_proj), sliding window"),
    "mixtral": Family("top-k routed experts (softmax, top-k, renormalised)", moe=True),
    "qwen3_moe": Family("per-head q/k RMSNorm, top-k routed experts (renormalised when norm_topk_prob)", moe=True),
}

# model_type -> one line on what it needs (kept for callers that list the supported architectures).
SUPPORTED_ARCHITECTURES = {arch: f.description for arch, f in FAMILIES.items()}


INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")


def past_name(layer: int, kind: str) -> str:
    """Optimum / onnxruntime-genai name of a past cache input (`kind` is "key" or "value")."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """Optimum / onnxruntime-genai name of a present cache output."""
    return f"present.{layer}.{kind}"


@dataclass(frozen=True)
class CacheTensor:
    """What one cache tensor is: its I/O names, dtype, shape (symbolic dims as strings), meaning."""

    layer: int
    kind: str  # "key" | "value"
    dtype: str  # "float32", or "uint8" for codes
    shape: tuple  # e.g. ("batch", 3, "past_sequence_length", 64)
    meaning: str  # e.g. "key after RoPE, float"
    # What the tensor costs when that is not its dtype times its last dim: the channels per head it
    # stands for (codes of groups of channels) and the bits a real cache of its representation stores
    # per channel per token (packed codes; scales and zero points; a simulated quantization's floats).
    channels: int | None = None
    bits_per_channel: float | None = None

    def cost(self) -> tuple[int, float]:
        """(channels per head, bits per channel per token) of this tensor as the size report counts it."""
        channels = self.channels if self.channels is not None else self.shape[3]
        if self.bits_per_channel is not None:
            return channels, self.bits_per_channel
        return channels, 8 * torch.empty((), dtype=getattr(torch, self.dtype)).element_size() * self.shape[3] / channels

    @property
    def input_name(self) -> str:
        return past_name(self.layer, self.kind)

    @property
    def output_name(self) -> str:
        return present_name(self.layer, self.kind)

    def to_json(self) -> dict:
        out = {"layer": self.layer, "kind": self.kind, "dtype": self.dtype, "shape": list(self.shape),
               "meaning": self.meaning}
        if self.channels is not None:
            out["channels"] = self.channels
        if self.bits_per_channel is not None:
            out["bits_per_channel"] = self.bits_per_channel
        return out

    @classmethod
    def from_json(cls, d: dict) -> "CacheTensor":
        return cls(d["layer"], d["kind"], d["dtype"], tuple(d["shape"]), d["meaning"], d.get("channels"),
                   d.get("bits_per_channel"))


def empty_cache(layout: list[CacheTensor], batch: int, past_len: int = 0) -> list[torch.Tensor]:
    """Cache tensors of `past_len` positions (zeros) in `layout`."""
    out = []
    for c in layout:
        shape = [batch if d == "batch" else past_len if d == "past_sequence_length" else d for d in c.shape]
        out.append(torch.zeros(shape, dtype=getattr(torch, c.dtype)))
    return out


def check_architecture(config, fallback_name: str = "model") -> None:
    """Raise UnsupportedArchitectureError unless `config.model_type` is one llmc can trace.

    Needs only the config, so a model folder can be refused before its weights are loaded.
    """
    arch = getattr(config, "model_type", None) or fallback_name
    if arch not in SUPPORTED_ARCHITECTURES:
        archs = ", ".join(getattr(config, "architectures", None) or [fallback_name])
        raise UnsupportedArchitectureError(
            f"cannot trace architecture '{arch}' ({archs}): llmc traces "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}; a new architecture needs an entry in "
            "llmc.trace.FAMILIES (see docs/families.md) and parity tests")


def _check_supported(model: nn.Module) -> Family:
    """The model's Family, or UnsupportedArchitectureError naming the architecture and what is missing."""
    config = getattr(model, "config", None)
    check_architecture(config, type(model).__name__)
    arch = config.model_type
    fam = FAMILIES[arch]
    archs = ", ".join(getattr(config, "architectures", None) or [type(model).__name__])
    inner = getattr(model, fam.body, None)
    b = fam.body
    missing = [name for name, ok in [
        (f"{b}.{fam.embed}", hasattr(inner, fam.embed)),
        (f"{b}.layers", hasattr(inner, "layers")),
        (f"{b}.{fam.final_norm}", hasattr(inner, fam.final_norm)),
        (f"{b}.rotary_emb", hasattr(inner, "rotary_emb")),
        ("lm_head", hasattr(model, "lm_head")),
    ] if not ok]
    if not missing:
        norms = {"pre": ["input_layernorm", "post_attention_layernorm"],
                 "sandwich": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                              "post_feedforward_layernorm"],
                 "post": ["post_attention_layernorm", "post_feedforward_layernorm"]}[fam.residual]
        if fam.parallel_flag and getattr(config, fam.parallel_flag, False):
            norms = ["input_layernorm"]
        for i, layer in enumerate(inner.layers):
            attn = getattr(layer, fam.attn, None)
            if fam.qkv == "separate":
                has_qkv = attn is not None and all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj"))
            else:
                has_qkv = attn is not None and hasattr(attn, fam.qkv_proj)
            mlp = getattr(layer, "mlp", None)
            checks = [(fam.attn, attn is not None), (f"{fam.attn} q/k/v projections", has_qkv),
                      (f"{fam.attn}.{fam.out_proj}", hasattr(attn, fam.out_proj)), ("mlp", mlp is not None)]
            checks += [(n, getattr(layer, n, None) is not None) for n in norms]
            if fam.moe and mlp is not None and hasattr(mlp, "experts"):
                experts = mlp.experts
                checks += [("mlp.gate (router weight)", hasattr(getattr(mlp, "gate", None), "weight")),
                           ("mlp.experts.gate_up_proj [E, 2I, H]", getattr(experts, "gate_up_proj", None) is not None
                            and experts.gate_up_proj.dim() == 3),
                           ("mlp.experts.down_proj [E, H, I]", getattr(experts, "down_proj", None) is not None
                            and experts.down_proj.dim() == 3),
                           ("mlp.shared_expert (not supported)", not hasattr(mlp, "shared_expert"))]
            missing += [f"{b}.layers.{i}.{name}" for name, ok in checks if not ok]
            if missing:
                break
    if missing:
        raise UnsupportedArchitectureError(
            f"cannot trace architecture '{arch}' ({archs}): missing {', '.join(missing)}")
    for flag in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, flag, None) and flag not in (fam.attn_softcap, fam.final_softcap):
            raise UnsupportedArchitectureError(f"cannot trace architecture '{arch}': {flag} is not supported for it")
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedArchitectureError(f"cannot trace architecture '{arch}': bidirectional attention "
                                           "(use_bidirectional_attention) is not a causal decode step")
    return fam


def rope_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Per-step RoPE tables for `apply_rope`, from the rotary embedding's cos/sin [B, S, Drot].

    rotate_half(x) * sin == roll(x, Drot/2) * [-sin_1, sin_2] (halves of the last dim), so the
    sign goes into the table once per step instead of a chunk/neg/cat per head tensor per layer.
    Returns cos, signed sin as [B, 1, S, Drot].
    """
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos.unsqueeze(1), signed.unsqueeze(1)


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotate the first Drot channels of x [B, H, S, D] with tables from `rope_tables`.

    Partial rotary (Drot < D) keeps the remaining channels as they are.
    """
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + x.roll(rot // 2, dims=-1) * signed_sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + x_rot.roll(rot // 2, dims=-1) * signed_sin, x_pass), dim=-1)


class RoutedExperts(nn.Module):
    """A mixture-of-experts MLP as graph nodes: the router, top-k, and one pair of linears per expert.

    Hugging Face stores the experts as 3-D tensors and runs only the experts a token was routed to
    (data-dependent shapes, which neither torch.export nor ONNX keeps). Here every expert is its own
    module (`mlp.experts.{e}.gate_up_proj`, `mlp.experts.{e}.down_proj`: `aten.linear` nodes that
    weight quantizers see, one layout per expert) and runs on every token; its output is weighted by
    the token's routing weight, which is 0 for the experts not in its top k. The result equals the
    sparse computation (the skipped terms are exact zeros) at E/k times its expert FLOPs. The router
    is a matmul, not a linear, so weight quantizers leave routing in float.
    """

    def __init__(self, hf_moe: nn.Module, top_k: int, normalize: bool):
        super().__init__()
        self.gate = hf_moe.gate  # the router; its weight [E, H] is read directly
        self.top_k, self.normalize = top_k, normalize
        self.act_fn = hf_moe.experts.act_fn
        gate_up, down = hf_moe.experts.gate_up_proj.detach(), hf_moe.experts.down_proj.detach()
        self.experts = nn.ModuleList()
        for e in range(gate_up.shape[0]):
            expert = nn.Module()
            expert.gate_up_proj = nn.Linear(gate_up.shape[2], gate_up.shape[1], bias=False, device="meta")
            expert.down_proj = nn.Linear(down.shape[2], down.shape[1], bias=False, device="meta")
            expert.gate_up_proj.weight = nn.Parameter(gate_up[e].clone(), requires_grad=False)
            expert.down_proj.weight = nn.Parameter(down[e].clone(), requires_grad=False)
            self.experts.append(expert)

    def forward(self, x: Tensor) -> Tensor:
        logits = torch.matmul(x, self.gate.weight.t())  # [B, S, E]
        probs = torch.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, self.top_k, dim=-1)  # [B, S, k]
        if self.normalize:
            top = top / top.sum(dim=-1, keepdim=True)
        weights = torch.zeros_like(probs).scatter(-1, idx, top).to(x.dtype)  # [B, S, E], 0 off the top k
        out = None
        for e, expert in enumerate(self.experts):  # in expert order, as Hugging Face accumulates them
            gate, up = expert.gate_up_proj(x).chunk(2, dim=-1)
            y = expert.down_proj(self.act_fn(gate) * up) * weights[..., e:e + 1]
            out = y if out is None else out + y
        return out


_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")


def _canonical_body(body: nn.Module, fam: Family, config) -> nn.Module:
    """The decoder body with llmc's module names (`model.embed_tokens`, `model.layers.{i}.self_attn`,
    `model.norm`, ...) over the same modules, for families whose names differ and for routed experts.

    The passes' defaults (`layers.N.(self_attn|mlp).` targets, the final `norm`) then apply unchanged.
    """
    out = nn.Module()
    out.embed_tokens = getattr(body, fam.embed)
    out.layers = nn.ModuleList()
    top_k = getattr(config, "num_experts_per_tok", None)
    normalize = getattr(config, "norm_topk_prob", True)  # Mixtral always renormalises the top k
    for hf_layer in body.layers:
        layer = nn.Module()
        layer.self_attn = getattr(hf_layer, fam.attn)
        mlp = hf_layer.mlp
        layer.mlp = RoutedExperts(mlp, top_k, normalize) if fam.moe and hasattr(mlp, "experts") else mlp
        for name in _LAYER_NORMS:
            if getattr(hf_layer, name, None) is not None:
                setattr(layer, name, getattr(hf_layer, name))
        out.layers.append(layer)
    out.norm = getattr(body, fam.final_norm)
    out.rotary_emb = body.rotary_emb
    return out


class DecoderStep(nn.Module):
    """One decode step of a Hugging Face causal LM with the KV cache passed in and returned.

    Submodules keep their Hugging Face names (`model.layers.0.self_attn.q_proj`, `lm_head`), so
    node FQNs in the traced graph equal the checkpoint's parameter names; families whose names
    differ (GPT-NeoX) and routed experts appear under llmc's names (see `_canonical_body`).
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        fam = _check_supported(hf_model)
        self.family = fam
        self.config = hf_model.config
        body = getattr(hf_model, fam.body)
        same_names = (fam.body, fam.embed, fam.final_norm, fam.attn) == ("model", "embed_tokens", "norm", "self_attn")
        self.model = body if same_names and not fam.moe else _canonical_body(body, fam, self.config)
        self.lm_head = hf_model.lm_head
        cfg = self.config
        self.num_layers = len(self.model.layers)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.windows = [self._window(i) for i in range(self.num_layers)]
        self.parallel = bool(fam.parallel_flag and getattr(cfg, fam.parallel_flag, False))
        self.scalars = {name: getattr(cfg, attr) for name in ("embedding_multiplier", "residual_multiplier",
                                                              "logits_divisor", "final_softcap", "attn_softcap")
                        if (attr := getattr(fam, name)) and getattr(cfg, attr, None) is not None}

    def _window(self, i: int) -> int | None:
        attn = self.model.layers[i].self_attn
        if hasattr(attn, "sliding_window"):  # qwen2/qwen3/gemma2/gemma3 decide per layer
            return attn.sliding_window
        return getattr(self.config, "sliding_window", None)

    def _attention_bias(self, attention_mask: Tensor, past_len, seq_len, window, dtype, groups: int) -> Tensor:
        """Additive mask [B, 1, groups*S, P+S]: causal, padding (0 in attention_mask), optional window.

        The padding row is gathered from attention_mask by key index rather than used whole, so
        the traced graph does not tie the mask's length to P+S by a shape guard. With grouped-query
        attention the rows repeat once per query head of a KV head (see `forward`).
        """
        dev = attention_mask.device
        kv_idx = torch.arange(past_len + seq_len, device=dev)
        q_idx = torch.arange(seq_len, device=dev) + past_len
        allowed = kv_idx[None, :] <= q_idx[:, None]  # [S, T]
        if window is not None:
            allowed = allowed & (q_idx[:, None] - kv_idx[None, :] < window)
        pad = attention_mask.index_select(1, kv_idx) != 0  # [B, T]
        allowed = allowed[None, :, :] & pad[:, None, :]
        # A finite minimum, not -inf: fully masked rows (left padding) stay finite instead of NaN.
        bias = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)
        if groups == 1:
            return bias[:, None, :, :]
        B, T = bias.shape[0], bias.shape[-1]
        return bias[:, None, None].expand(B, 1, groups, seq_len, T).reshape(B, 1, groups * seq_len, T)

    def _qkv(self, attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, S, _ = x.shape
        fam = self.family
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if fam.qkv == "fused_per_head":  # [B, S, H, 3D] -> three [B, S, H, D]
            q, k, v = getattr(attn, fam.qkv_proj)(x).view(B, S, hq, 3 * d).chunk(3, dim=-1)
        else:
            if fam.qkv == "fused":
                q, k, v = getattr(attn, fam.qkv_proj)(x).split([hq * d, hkv * d, hkv * d], dim=-1)
            else:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q_norm, k_norm = (getattr(attn, n, None) for n in fam.qk_norm_names)
            if fam.qk_norm == "full" and q_norm is not None:  # OLMo 2: over all heads at once
                q, k = q_norm(q), k_norm(k)
            q, k, v = q.view(B, S, hq, d), k.view(B, S, hkv, d), v.view(B, S, hkv, d)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
        if fam.qk_norm == "head":
            q_norm, k_norm = (getattr(attn, n, None) for n in fam.qk_norm_names)
            if q_norm is not None:  # over each head's D channels, before RoPE
                q, k = q_norm(q), k_norm(k)
        return q, k, v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
        cap = self.scalars.get("attn_softcap")
        if cap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        scores = torch.tanh(scores / cap) * cap + bias  # soft-capped before the mask
        return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)

    def _self_attention(self, i: int, attn: nn.Module, x: Tensor, rope: tuple, bias: Tensor, past: list[Tensor],
                        present: list[Tensor]) -> Tensor:
        B, S, _ = x.shape
        groups = self.num_heads // self.num_kv_heads
        q, k, v = self._qkv(attn, x)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # The cache write: keys after RoPE, values as projected.  [B, Hkv, P+S, D]
        k = torch.cat([past[2 * i], k], dim=2)
        v = torch.cat([past[2 * i + 1], v], dim=2)
        present += [k, v]
        if groups > 1:
            # Grouped-query attention without copying the cache: fold each KV head's query heads
            # into the sequence dim, q [B, Hkv, groups*S, D]; the mask was built repeated to match.
            # Query head h uses KV head h // groups, so heads split as (Hkv, groups).
            qg = q.reshape(B, self.num_kv_heads, groups * S, self.head_dim)
            o = self._attend(qg, k, v, bias, attn.scaling)
            o = o.unflatten(2, (groups, S)).permute(0, 3, 1, 2, 4)  # [B, S, Hkv, groups, D]
        else:
            o = self._attend(q, k, v, bias, attn.scaling).transpose(1, 2)  # [B, S, H, D]
        return getattr(attn, self.family.out_proj)(o.reshape(B, S, self.num_heads * self.head_dim))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                past: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        B, S = input_ids.shape
        past_len = past[0].shape[2]
        fam, c = self.family, self.scalars
        h = self.model.embed_tokens(input_ids)
        if "embedding_multiplier" in c:
            h = h * c["embedding_multiplier"]
        layer_types = getattr(self.config, "layer_types", None)
        ropes: dict = {}
        biases: dict = {}
        present: list[Tensor] = []
        groups = self.num_heads // self.num_kv_heads

        def scaled(branch: Tensor) -> Tensor:
            return branch * c["residual_multiplier"] if "residual_multiplier" in c else branch

        for i, layer in enumerate(self.model.layers):
            kind = layer_types[i] if fam.rotary_per_layer_type else None
            if kind not in ropes:  # [B, 1, S, Drot] each; one table per RoPE base
                args = (h, position_ids) + ((kind,) if fam.rotary_per_layer_type else ())
                ropes[kind] = rope_tables(*self.model.rotary_emb(*args))
            w = self.windows[i]
            if w not in biases:
                biases[w] = self._attention_bias(attention_mask, past_len, S, w, h.dtype, groups)

            def attention(x: Tensor) -> Tensor:
                return self._self_attention(i, layer.self_attn, x, ropes[kind], biases[w], past, present)

            if self.parallel:
                x = layer.input_layernorm(h)
                ln2 = getattr(layer, "post_attention_layernorm", None)
                a = attention(x)
                h = h + a + layer.mlp(ln2(h) if ln2 is not None else x)
            elif fam.residual == "pre":
                h = h + scaled(attention(layer.input_layernorm(h)))
                h = h + scaled(layer.mlp(layer.post_attention_layernorm(h)))
            elif fam.residual == "sandwich":
                h = h + layer.post_attention_layernorm(attention(layer.input_layernorm(h)))
                h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
            else:  # "post"
                h = h + layer.post_attention_layernorm(attention(h))
                h = h + layer.post_feedforward_layernorm(layer.mlp(h))
        logits = self.lm_head(self.model.norm(h))
        if "logits_divisor" in c:
            logits = logits / c["logits_divisor"]
        if "final_softcap" in c:
            logits = torch.tanh(logits / c["final_softcap"]) * c["final_softcap"]
        return logits, present

    def cache_layout(self) -> list[CacheTensor]:
        dtype = str(next(self.parameters()).dtype).removeprefix("torch.")
        shape = ("batch", self.num_kv_heads, "past_sequence_length", self.head_dim)
        return [CacheTensor(i, kind, dtype, shape, meaning)
                for i in range(self.num_layers)
                for kind, meaning in (("key", "key after RoPE"), ("value", "value"))]

    def example_inputs(self, batch: int = 2, seq: int = 3, past_len: int = 4):
        """Inputs for tracing; every dynamic dim is >= 2 so export does not specialise it."""
        dev = next(self.parameters()).device
        dtype = next(self.parameters()).dtype
        ids = torch.zeros(batch, seq, dtype=torch.long, device=dev)
        mask = torch.ones(batch, past_len + seq, dtype=torch.long, device=dev)
        pos = torch.arange(past_len, past_len + seq, device=dev).expand(batch, seq).contiguous()
        past = [torch.zeros(batch, self.num_kv_heads, past_len, self.head_dim, dtype=dtype, device=dev)
                for _ in range(2 * self.num_layers)]
        return ids, mask, pos, past


def dynamic_shapes(cache):
    """Dynamic dims of the decode step: batch, sequence, past length (may be 0), total length.

    `cache` is the cache layout (a list of CacheTensor), or the number of cache tensors when all
    are [batch, heads, past_sequence_length, head_dim]. A layout's dims named "batch" and
    "past_sequence_length" are dynamic; its integer dims are fixed.
    """
    Dim = torch.export.Dim
    batch, seq = Dim("batch", min=1, max=4096), Dim("sequence_length", min=1, max=65536)
    past, total = Dim("past_sequence_length", min=0, max=131072), Dim("total_sequence_length", min=1, max=196608)
    named = {"batch": batch, "past_sequence_length": past}
    if isinstance(cache, int):
        cache_dims = [{0: batch, 2: past} for _ in range(cache)]
    else:
        cache_dims = [{i: named[d] for i, d in enumerate(c.shape) if d in named} for c in cache]
    return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, cache_dims)


def export_step(module: nn.Module, example_inputs, num_cache_tensors: int) -> torch.export.ExportedProgram:
    """torch.export (non-strict) of a decode step, with every dim that should be dynamic declared."""
    with torch.no_grad():
        return torch.export.export(module, example_inputs, dynamic_shapes=dynamic_shapes(num_cache_tensors),
                                   strict=False)


@dataclass
class Traced:
    """What `trace` produces: the exported program, the cache layout and the time it took."""

    exported: torch.export.ExportedProgram
    cache_layout: list[CacheTensor]
    seconds: float


def trace(hf_model: nn.Module) -> Traced:
    """Trace a Hugging Face causal LM into a decode-step ExportedProgram with a functional cache."""
    hf_model.eval()
    step = DecoderStep(hf_model)
    t0 = time.perf_counter()
    try:
        ep = export_step(step, step.example_inputs(), 2 * step.num_layers)
    except Exception as e:  # torch.export errors are long; keep the first line and say what was traced
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(f"torch.export failed on {step.config.model_type}: {type(e).__name__}: {first}") from e
    return Traced(ep, step.cache_layout(), time.perf_counter() - t0)
