"""Perplexity protocols of BENCHMARKS.md, on any model llmc can run.

`ppl-512xN`: tokenize the test text once, cut non-overlapping 512-token windows, take the first N,
score each window on its own (its first token is not predicted), ppl = exp(total NLL / predicted).
`ppl-512xN-kv`: the same windows, but each is prefilled with 256 tokens and the rest fed in
chunks of 32 through the model's KV cache, so a cache-compressing pass is really exercised.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmc.errors import ConfigError, NumericalError, check_finite
from llmc.progress import bar

PROTOCOL_RE = re.compile(r"^ppl-(\d+)x(\d+)(-kv)?$")
PROTOCOLS = ("ppl-512x40", "ppl-512x5", "ppl-512x40-kv", "ppl-512x5-kv")
KV_PREFILL, KV_CHUNK = 256, 32


@dataclass(frozen=True)
class Protocol:
    """Window length, number of windows, and whether tokens go through the KV cache in chunks."""

    window: int
    windows: int
    kv_chunked: bool = False

    @classmethod
    def parse(cls, name: str) -> "Protocol":
        m = PROTOCOL_RE.match(name)
        if not m or int(m.group(1)) < 2 or int(m.group(2)) < 1:
            raise ConfigError(f"unknown protocol '{name}'; use ppl-<window>x<windows>[-kv], e.g. "
                              f"{', '.join(PROTOCOLS)}")
        p = cls(int(m.group(1)), int(m.group(2)), bool(m.group(3)))
        if p.kv_chunked and p.window <= KV_PREFILL:
            raise ConfigError(f"protocol '{name}': the KV-chunked variant needs windows longer than {KV_PREFILL}")
        return p

    @property
    def name(self) -> str:
        return f"ppl-{self.window}x{self.windows}" + ("-kv" if self.kv_chunked else "")


@dataclass
class PplResult:
    protocol: str
    ppl: float
    nll: float
    tokens: int
    windows: int
    seconds: float

    def to_json(self) -> dict:
        return {"protocol": self.protocol, "ppl": round(self.ppl, 4), "windows": self.windows,
                "predicted_tokens": self.tokens, "seconds": round(self.seconds, 2)}


class StepScorer:
    """Scores windows through a decode step `(ids, mask, pos, past) -> (logits, present)`."""

    def __init__(self, step, empty_cache):
        self.step, self.empty_cache = step, empty_cache

    def chunks(self, ids: torch.Tensor, sizes: list[int]):
        """Yield logits [B, n, V] for consecutive chunks of `ids` [B, S], carrying the cache."""
        B = ids.shape[0]
        cache, start = self.empty_cache(B), 0
        for n in sizes:
            end = start + n
            mask = torch.ones(B, end, dtype=torch.long)
            pos = torch.arange(start, end).expand(B, n)
            logits, cache = self.step(ids[:, start:end], mask, pos, cache)
            yield logits
            start = end


class HFScorer:
    """Scores windows with a Hugging Face model's own forward (and DynamicCache for chunking)."""

    def __init__(self, model):
        self.model = model

    def chunks(self, ids: torch.Tensor, sizes: list[int]):
        from transformers import DynamicCache

        cache, start = DynamicCache(config=self.model.config), 0
        for n in sizes:
            out = self.model(input_ids=ids[:, start:start + n], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            start += n
            yield out.logits


def scorer_for(model):
    """A scorer for an HF model, a CompiledModel / runtime model (anything with `.step`)."""
    if hasattr(model, "step") and hasattr(model, "empty_cache"):
        return StepScorer(model.step, model.empty_cache)
    if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        return HFScorer(model)
    raise ConfigError(f"cannot evaluate a {type(model).__name__}: expected a Hugging Face causal LM or an llmc model")


def windows(token_ids: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """The first `protocol.windows` non-overlapping windows [N, window] of a token stream."""
    n = token_ids.numel() // protocol.window
    if n < protocol.windows:
        raise ConfigError(f"{protocol.name} needs {protocol.windows} windows of {protocol.window} tokens; "
                          f"the text has only {n}")
    return token_ids[: protocol.windows * protocol.window].view(protocol.windows, protocol.window)


def perplexity(model, token_ids: torch.Tensor, protocol: str | Protocol = "ppl-512x40", batch_size: int = 1,
               progress: bool = True) -> PplResult:
    """Perplexity of `model` on a token stream under a protocol (see module docstring)."""
    proto = protocol if isinstance(protocol, Protocol) else Protocol.parse(protocol)
    wins = windows(token_ids, proto)
    scorer = scorer_for(model)
    if proto.kv_chunked:
        rest = proto.window - KV_PREFILL
        sizes = [KV_PREFILL] + [KV_CHUNK] * (rest // KV_CHUNK) + ([rest % KV_CHUNK] if rest % KV_CHUNK else [])
    else:
        sizes = [proto.window]
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.inference_mode(), bar(total=proto.windows, desc=proto.name, unit="win", enabled=progress) as pbar:
        for b in range(0, proto.windows, batch_size):
            ids = wins[b:b + batch_size]
            start = 0
            for logits in scorer.chunks(ids, sizes):
                n = logits.shape[1]
                # logits at position t predict token t+1; the window's last logit predicts nothing
                targets = ids[:, start + 1:start + n + 1]
                lg = logits[:, : targets.shape[1]].float()
                loss = float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets.reshape(-1), reduction="sum"))
                if not math.isfinite(loss):
                    check_finite(lg, f"perplexity, tokens {start}..{start + n} of a window")
                    raise NumericalError(f"the loss is {loss} at tokens {start}..{start + n} of a window")
                nll += loss
                count += targets.numel()
                start += n
            pbar.update(ids.shape[0])
    return PplResult(proto.name, math.exp(nll / count), nll / count, count, proto.windows, time.perf_counter() - t0)
