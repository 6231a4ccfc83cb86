"""Helpers for testing passes and backends: tiny seeded random models, SQNR, op histograms."""

from __future__ import annotations

import torch
from torch import Tensor

from llmc.graph import count_ops, op_name  # noqa: F401  (re-exported: tests count ops)

TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3")

# The further families the tracer supports, tested in tests/test_families.py only (every test
# parametrized over TINY_ARCHITECTURES would otherwise run over them too).
FAMILY_ARCHITECTURES = ("gemma", "gemma2", "gemma3_text", "olmo2", "granite", "stablelm", "gpt_neox", "starcoder2",
                        "mixtral", "qwen3_moe")

_CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
                   "qwen3": "Qwen3Config", "phi3": "Phi3Config", "gemma": "GemmaConfig", "gemma2": "Gemma2Config",
                   "gemma3_text": "Gemma3TextConfig", "olmo2": "Olmo2Config", "granite": "GraniteConfig",
                   "stablelm": "StableLmConfig", "gpt_neox": "GPTNeoXConfig", "starcoder2": "Starcoder2Config",
                   "mixtral": "MixtralConfig", "qwen3_moe": "Qwen3MoeConfig"}

# What each further family's tiny config sets beyond the shared shape: every feature the tracer must
# reproduce is switched on, with values small enough to matter (windows shorter than the test
# prompts, soft caps near the logits' scale, multipliers away from 1).
_FAMILY_OVERRIDES = {
    "gemma": dict(head_dim=16, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True),
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=6, attn_logit_softcapping=2.0,
                   final_logit_softcapping=3.0, layer_types=["sliding_attention", "full_attention"]),
    "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=6, final_logit_softcapping=3.0,
                        layer_types=["sliding_attention", "full_attention"]),
    "olmo2": dict(),
    "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.6, attention_multiplier=0.2,
                    logits_scaling=2.5),
    "stablelm": dict(partial_rotary_factor=0.5, use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=True,
                     layer_norm_eps=1e-5),
    "gpt_neox": dict(num_key_value_heads=None, partial_rotary_factor=0.25, use_parallel_residual=True,
                     layer_norm_eps=1e-5),
    "starcoder2": dict(sliding_window=6, use_bias=True, hidden_act="gelu_pytorch_tanh"),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                      norm_topk_prob=True, mlp_only_layers=[1]),
}

# Shared shape of every tiny model: 2 layers, hidden 64, 4 query heads over 2 KV heads (GQA).
_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
               pad_token_id=0)


def tiny_config(arch: str = "llama", **overrides):
    """A transformers config of `arch` with tiny dimensions (see TINY_ARCHITECTURES)."""
    import transformers

    if arch not in _CONFIG_CLASSES:
        raise ValueError(f"no tiny config for '{arch}'; choose one of "
                         f"{', '.join(TINY_ARCHITECTURES + FAMILY_ARCHITECTURES)}")
    kw = dict(_COMMON)
    kw.update(_FAMILY_OVERRIDES.get(arch, {}))
    if kw.get("num_key_value_heads", 0) is None:
        del kw["num_key_value_heads"]
    if arch == "mistral":
        kw["sliding_window"] = 6  # short enough that the tests cross it
    if arch == "qwen2":
        kw["use_sliding_window"] = False
    if arch == "qwen3":
        kw["head_dim"] = 16
    kw.update(overrides)
    return getattr(transformers, _CONFIG_CLASSES[arch])(**kw)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A seeded random float32 causal LM of `arch`, in eval mode.

    Weights are drawn with a larger std than the default init so that the logits are not all
    near-ties: greedy-decoding parity tests then compare meaningful argmaxes.
    """
    import transformers

    config = tiny_config(arch, **overrides)
    # The further families are compared with Hugging Face's eager attention (Gemma 2 has no sdpa path).
    config._attn_implementation = "sdpa" if arch in TINY_ARCHITECTURES else "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
            elif "norm" in name and not name.endswith(".bias"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model.eval()


class VQLinear(torch.nn.Module):
    """A module around `llmc::vq_linear` with its tensors as buffers (for export tests of the op)."""

    def __init__(self, codes: Tensor, codebooks: Tensor, scales: Tensor):
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("codebooks", codebooks)
        self.register_buffer("scales", scales)

    def forward(self, x):
        import llmc.ops  # noqa: F401  (registers the op)

        return torch.ops.llmc.vq_linear(x, self.codes, self.codebooks, self.scales)


def random_batches(n: int = 6, seq: int = 48, seed: int = 0) -> list[Tensor]:
    """`n` seeded batches [1, seq] of random token ids in 3..255 (the tiny vocabulary, no special ids)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (1, seq), generator=gen) for _ in range(n)]


def tiny_tokenizer():
    """A byte-level tokenizer with 256 ids matching the tiny models' vocabulary (no files needed)."""
    from llmc.tokenizer import ByteTokenizer

    return ByteTokenizer()


def sqnr(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(‖ref‖² / ‖ref − approx‖²)."""
    ref, approx = reference.double(), approx.double()
    noise = (ref - approx).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def assert_logits_match_hf(model, cm, prompts: list[list[int]], decode_steps: int = 2, tol: float = 1e-5) -> None:
    """A compiled model's logits equal the HF model's: a prefill of `prompts` (left-padded to one
    batch), then `decode_steps` greedy steps through the compiled model's cache."""
    from llmc.generation import left_pad, position_ids_from_mask

    ids, mask = left_pad(prompts, pad_id=0)
    pos = position_ids_from_mask(mask)
    B = ids.shape[0]
    logits, present = cm.step(ids, mask, pos, cm.empty_cache(B))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref[real], atol=tol, rtol=tol)
    seq, m, p = ids, mask, pos
    for _ in range(decode_steps):
        nxt = logits[:, -1:].argmax(-1)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones(B, 1, dtype=m.dtype)], 1)
        p = torch.cat([p, p[:, -1:] + 1], 1)
        logits, present = cm.step(nxt, m, p[:, -1:], present)
        with torch.no_grad():
            ref = model(input_ids=seq, attention_mask=m, position_ids=p).logits[:, -1:]
        torch.testing.assert_close(logits, ref, atol=tol, rtol=tol)
    assert present[0].shape[2] == ids.shape[1] + decode_steps
