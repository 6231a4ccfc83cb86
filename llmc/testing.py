"""Helpers for testing passes and backends: tiny seeded random models, SQNR, op histograms."""

from __future__ import annotations

import torch
from torch import Tensor

from llmc.graph import count_ops, op_name  # noqa: F401  (re-exported: tests count ops)

TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3")

# Shared shape of every tiny model: 2 layers, hidden 64, 4 query heads over 2 KV heads (GQA).
_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
               pad_token_id=0)


def tiny_config(arch: str = "llama", **overrides):
    """A transformers config of `arch` with tiny dimensions (see TINY_ARCHITECTURES)."""
    import transformers

    classes = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
               "qwen3": "Qwen3Config", "phi3": "Phi3Config"}
    if arch not in classes:
        raise ValueError(f"no tiny config for '{arch}'; choose one of {', '.join(TINY_ARCHITECTURES)}")
    kw = dict(_COMMON)
    if arch == "mistral":
        kw["sliding_window"] = 6  # short enough that the tests cross it
    if arch == "qwen2":
        kw["use_sliding_window"] = False
    if arch == "qwen3":
        kw["head_dim"] = 16
    kw.update(overrides)
    return getattr(transformers, classes[arch])(**kw)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A seeded random float32 causal LM of `arch`, in eval mode.

    Weights are drawn with a larger std than the default init so that the logits are not all
    near-ties: greedy-decoding parity tests then compare meaningful argmaxes.
    """
    import transformers

    config = tiny_config(arch, **overrides)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
            elif "norm" in name or "layernorm" in name:
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


