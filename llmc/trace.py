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
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmc.errors import TraceError, UnsupportedArchitectureError

# model_type -> how its attention projections are laid out.
SUPPORTED_ARCHITECTURES = {
    "llama": "separate q/k/v projections",
    "mistral": "separate q/k/v projections, sliding window",
    "qwen2": "separate q/k/v projections with bias",
    "qwen3": "separate q/k/v projections, per-head q/k RMSNorm",
    "phi3": "fused qkv_proj, fused gate_up_proj",
}

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
            "llmc.trace.SUPPORTED_ARCHITECTURES and parity tests")


def _check_supported(model: nn.Module) -> None:
    """Raise UnsupportedArchitectureError naming the architecture and the first thing missing."""
    config = getattr(model, "config", None)
    check_architecture(config, type(model).__name__)
    arch = config.model_type
    archs = ", ".join(getattr(config, "architectures", None) or [type(model).__name__])
    inner = getattr(model, "model", None)
    missing = [name for name, ok in [
        ("model.embed_tokens", hasattr(inner, "embed_tokens")),
        ("model.layers", hasattr(inner, "layers")),
        ("model.norm", hasattr(inner, "norm")),
        ("model.rotary_emb", hasattr(inner, "rotary_emb")),
        ("lm_head", hasattr(model, "lm_head")),
    ] if not ok]
    if not missing:
        for i, layer in enumerate(inner.layers):
            attn = getattr(layer, "self_attn", None)
            has_qkv = attn is not None and (
                hasattr(attn, "qkv_proj") or all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")))
            for name, ok in [("self_attn", attn is not None), ("self_attn q/k/v projections", has_qkv),
                             ("self_attn.o_proj", hasattr(attn, "o_proj")), ("mlp", hasattr(layer, "mlp")),
                             ("input_layernorm", hasattr(layer, "input_layernorm")),
                             ("post_attention_layernorm", hasattr(layer, "post_attention_layernorm"))]:
                if not ok:
                    missing.append(f"model.layers.{i}.{name}")
            if missing:
                break
    if missing:
        raise UnsupportedArchitectureError(
            f"cannot trace architecture '{arch}' ({archs}): missing {', '.join(missing)}")
    if getattr(config, "attn_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None):
        raise UnsupportedArchitectureError(f"cannot trace architecture '{arch}': logit soft-capping is not supported")


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


class DecoderStep(nn.Module):
    """One decode step of a Hugging Face causal LM with the KV cache passed in and returned.

    Submodules keep their Hugging Face names (`model.layers.0.self_attn.q_proj`, `lm_head`), so
    node FQNs in the traced graph equal the checkpoint's parameter names.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        _check_supported(hf_model)
        self.config = hf_model.config
        self.model = hf_model.model
        self.lm_head = hf_model.lm_head
        cfg = self.config
        self.num_layers = len(self.model.layers)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.windows = [self._window(i) for i in range(self.num_layers)]

    def _window(self, i: int) -> int | None:
        attn = self.model.layers[i].self_attn
        if hasattr(attn, "sliding_window"):  # qwen2/qwen3 decide per layer
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
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if hasattr(attn, "qkv_proj"):
            qkv = attn.qkv_proj(x)
            q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q, k, v = q.view(B, S, hq, d), k.view(B, S, hkv, d), v.view(B, S, hkv, d)
        if hasattr(attn, "q_norm"):  # qwen3: RMSNorm over each head before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                past: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        B, S = input_ids.shape
        past_len = past[0].shape[2]
        h = self.model.embed_tokens(input_ids)
        cos, sin = rope_tables(*self.model.rotary_emb(h, position_ids))  # [B, 1, S, Drot] each
        biases: dict = {}
        present: list[Tensor] = []
        groups = self.num_heads // self.num_kv_heads
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            w = self.windows[i]
            if w not in biases:
                biases[w] = self._attention_bias(attention_mask, past_len, S, w, h.dtype, groups)
            q, k, v = self._qkv(attn, layer.input_layernorm(h))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            # The cache write: keys after RoPE, values as projected.  [B, Hkv, P+S, D]
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            present += [k, v]
            if groups > 1:
                # Grouped-query attention without copying the cache: fold each KV head's query heads
                # into the sequence dim, q [B, Hkv, groups*S, D]; the mask was built repeated to match.
                # Query head h uses KV head h // groups, so heads split as (Hkv, groups).
                qg = q.reshape(B, self.num_kv_heads, groups * S, self.head_dim)
                o = F.scaled_dot_product_attention(qg, k, v, attn_mask=biases[w], scale=attn.scaling)
                o = o.unflatten(2, (groups, S)).permute(0, 3, 1, 2, 4)  # [B, S, Hkv, groups, D]
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=biases[w], scale=attn.scaling)
                o = o.transpose(1, 2)  # [B, S, H, D]
            h = h + attn.o_proj(o.reshape(B, S, self.num_heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.lm_head(self.model.norm(h))
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
