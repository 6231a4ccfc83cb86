"""Token generation over any decode step `(input_ids, attention_mask, position_ids, past) -> (logits, present)`.

Shared by every runtime (`llmc.model.Model.generate`): prompts are left-padded into one batch, prefilled with an empty cache,
then decoded one token per step. Greedy decoding reproduces Hugging Face's `generate` exactly
(same position ids for left padding, same padding of finished rows).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch
from torch import Tensor

from llmc.calibration.checkpoint import load_checkpoint, save_checkpoint
from llmc.errors import ConfigError, check_finite
from llmc.progress import bar


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. `do_sample=False` is greedy; otherwise temperature / top-k / top-p."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token lists into input_ids [B, S] and attention_mask [B, S]."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ConfigError("every prompt must have at least one token")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def position_ids_from_mask(mask: Tensor) -> Tensor:
    """Positions counting only real tokens, as Hugging Face computes them for left padding."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def greedy(logits: Tensor) -> Tensor:
    """argmax over the last dim (the first of equal maxima; a NaN counts as the maximum, as in torch). On CPU through
    numpy, whose argmax over a vocabulary of float32 logits takes a few microseconds where torch's takes tens, per
    generated token."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(logits.detach().numpy().argmax(-1))
    return logits.argmax(-1)


def _filter_logits(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def generate_tokens(step: typing.Callable, empty_cache: typing.Callable[[int], list], prompts: list[list[int]],
                    cfg: SamplingConfig, pad_id: int, stop_ids: typing.Iterable[int] = (),
                    prefill_step: typing.Callable | None = None, progress: bool = False) -> list[list[int]]:
    """Generate up to cfg.max_new_tokens for each prompt; returns only the new tokens of each row.

    A row stops after emitting a stop id (the stop id is kept); finished rows are fed `pad_id`.
    `prefill_step`, if given, runs the prompt and may return logits of the last position only.
    """
    ids, mask = left_pad(prompts, pad_id)
    pos = position_ids_from_mask(mask)
    batch = ids.shape[0]
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    out = torch.empty(batch, 0, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    if cfg.max_new_tokens == 0:
        return [[] for _ in prompts]
    with torch.inference_mode(), bar(total=cfg.max_new_tokens, desc="generating", unit="token",
                                     enabled=progress) as pbar:
        logits, cache = (prefill_step or step)(ids, mask, pos, empty_cache(batch))
        for t in range(cfg.max_new_tokens):
            pbar.update(1)
            last = logits[:, -1, :].float()
            check_finite(last, f"generating token {t + 1}")
            if cfg.do_sample:
                probs = _filter_logits(last, cfg).softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            else:
                nxt = greedy(last)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if stop.numel():
                done = done | torch.isin(nxt, stop)
            if bool(done.all()) or t == cfg.max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
            pos = pos[:, -1:] + 1
            logits, cache = step(nxt[:, None], mask, pos, cache)
    return cut_at_stop(out.tolist(), stop.tolist())


def cut_at_stop(rows: list[list[int]], stop_ids: typing.Iterable[int]) -> list[list[int]]:
    """Each row up to and with its first stop id (the padding after it dropped)."""
    stop_set = set(stop_ids)
    out = []
    for row in rows:
        cut = next((j for j, tok in enumerate(row) if tok in stop_set), None)
        out.append(row if cut is None else row[: cut + 1])
    return out


def sample_windows(step: typing.Callable, empty_cache: typing.Callable[[int], list], prompts: Tensor, length: int,
                   seed: int, batch_size: int = 32, path: str | None = None, fingerprint: str = "",
                   progress: bool = True) -> Tensor:
    """Windows [N, length] of text a model writes itself: each prompt row of `prompts` [N, P]
    continued by plain sampling (temperature 1, no top-k/top-p, no stop at EOS) to `length` tokens.

    Rows are sampled `batch_size` at a time and batch i is seeded with `seed + i`, so the result
    does not depend on where a run stopped. With `path`, the rows done so far are saved after
    each batch (with `fingerprint`); a later call with the same fingerprint continues from them.
    """
    n, p = prompts.shape
    if not 0 < p < length:
        raise ConfigError(f"prompts of {p} tokens cannot start windows of {length}")
    done = torch.empty(0, length, dtype=torch.long)
    saved = load_checkpoint(path, fingerprint, "sampling")
    if saved is not None and saved["rows"].shape[1:] == (length,):
        done = saved["rows"][:n].long()
    if done.shape[0] == n:
        return done
    batches = range(done.shape[0] // batch_size, -(-n // batch_size))
    done = done[: batches.start * batch_size]
    rows = [done]
    for i in bar(batches, desc="sampling text", unit="batch", enabled=progress):
        chunk = prompts[i * batch_size: (i + 1) * batch_size]
        cfg = SamplingConfig(length - p, do_sample=True, seed=seed + i)
        new = generate_tokens(step, empty_cache, chunk.tolist(), cfg, pad_id=0)
        rows.append(torch.cat([chunk, torch.as_tensor(new, dtype=torch.long)], dim=1))
        if path:
            save_checkpoint(path, fingerprint, rows=torch.cat(rows).int())
    return torch.cat(rows)
