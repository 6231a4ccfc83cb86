"""`Model`: the one interface of every runnable model (the torch runtime, ONNX Runtime, backends to come).

A model is a decode step over a functional KV cache plus what generation and evaluation need:

    step(input_ids, attention_mask, position_ids, past) -> (logits, present)
    empty_cache(batch, past_len=0) -> past            (zeros in `cache_layout`)
    generate(prompts, max_new_tokens, ...) -> text    (greedy or sampled, batched with left padding)
    perplexity(data, protocol) -> PplResult           (the protocols of llmc.eval)
    report() -> dict                                  (history, cache layout, ops, sizes)

A subclass implements `step` and `report` and sets `cache_layout`, `tokenizer` and `eos_ids`;
`prefill_step` (logits of the last position only) is an optional speed-up.
"""

from __future__ import annotations

import torch

from llmc.errors import ConfigError
from llmc.generation import SamplingConfig, generate_tokens
from llmc.trace import CacheTensor, empty_cache


class Model:
    """Base class of runnable models; see the module docstring."""

    cache_layout: list[CacheTensor]
    tokenizer: object = None
    eos_ids: tuple = ()

    def step(self, input_ids, attention_mask, position_ids, past):
        """One decode step: logits [B, S, V] and the present cache (what the next step takes as `past`)."""
        raise NotImplementedError

    def prefill_step(self, input_ids, attention_mask, position_ids, past):
        """Like `step`, with logits [B, 1, V] of the last position only (generation's prefill)."""
        logits, present = self.step(input_ids, attention_mask, position_ids, past)
        return logits[:, -1:], present

    def empty_cache(self, batch: int, past_len: int = 0) -> list[torch.Tensor]:
        """Cache tensors of `past_len` positions (zeros) in the layout `step` expects."""
        return empty_cache(self.cache_layout, batch, past_len)

    def report(self) -> dict:
        raise NotImplementedError

    def perplexity(self, data: str = "wikitext2-test", protocol: str = "ppl-512x40", batch_size: int = 1,
                   progress: bool = True):
        """Perplexity on a data set (name or file, tokenized with this model's tokenizer) under a protocol."""
        from llmc import data as datasets
        from llmc.eval import Protocol, perplexity

        proto = Protocol.parse(protocol) if isinstance(protocol, str) else protocol
        ids = datasets.tokenize(self.tokenizer, datasets.text(data))
        return perplexity(self, ids, proto, batch_size=batch_size, progress=progress)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, past=None):
        """`step` with defaults: an empty cache, a full attention mask, positions after the past."""
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        B, S = input_ids.shape
        past = past if past is not None else self.empty_cache(B)
        shape = past[0].shape() if callable(past[0].shape) else past[0].shape  # torch tensor or OrtValue
        past_len = shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(B, past_len + S, dtype=torch.long)
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + S).expand(B, S)
        return self.step(input_ids, attention_mask, position_ids, past)

    def __repr__(self) -> str:
        layout = getattr(self, "cache_layout", None) or []
        where = f" {self.folder}" if getattr(self, "folder", None) else ""
        return (f"<{type(self).__name__}{where}: {len(layout)} cache tensors, "
                f"tokenizer {'loaded' if self.tokenizer is not None else 'none'}>")

    def _generate_tokens(self, prompts: list[list[int]], cfg: SamplingConfig, pad_id: int, stop_ids: set[int],
                         progress: bool) -> list[list[int]]:
        """The new tokens of each prompt (`llmc.generation.generate_tokens` over `step`; a runtime may have a faster
        loop for some settings)."""
        return generate_tokens(self.step, self.empty_cache, prompts, cfg, pad_id, stop_ids,
                               prefill_step=self.prefill_step, progress=progress)

    def _stop_ids(self, stop, ignore_eos: bool = False) -> set[int]:
        """The model's EOS ids (as its generation config lists them) plus the user's stop tokens."""
        ids = set() if ignore_eos else set(self.eos_ids)
        if not ids and not ignore_eos and isinstance(getattr(self.tokenizer, "eos_token_id", None), int):
            ids.add(self.tokenizer.eos_token_id)
        for s in stop or ():
            if isinstance(s, int):
                ids.add(s)
                continue
            toks = self.tokenizer.encode(s, add_special_tokens=False)
            if len(toks) != 1:
                raise ConfigError(f"stop string {s!r} is {len(toks)} tokens; stop strings must be one token")
            ids.add(toks[0])
        return ids

    def generate(self, prompts, max_new_tokens: int = 20, *, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, stop=None, seed: int | None = None,
                 return_tokens: bool = False, ignore_eos: bool = False, progress: bool = False):
        """Continue one prompt (str) or a batch (list of str, or lists of token ids).

        Greedy by default; `do_sample=True` samples with temperature / top_k / top_p (seeded by
        `seed`). Stops at the model's EOS (unless `ignore_eos`) and at `stop` (token ids or
        single-token strings).
        Returns the continuation text (a str for one prompt, else a list), or the new token ids
        with `return_tokens=True`. `progress`: a bar of the tokens generated, on stderr.
        """
        cfg = SamplingConfig(max_new_tokens, do_sample, temperature, top_k, top_p, seed)
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        if self.tokenizer is None and (return_tokens is False or any(isinstance(p, str) for p in batch)):
            raise ConfigError("this model has no tokenizer, so it cannot encode or decode text: pass tokenizer= to "
                              "llmc.compile (e.g. AutoTokenizer.from_pretrained(...)), or give token ids and "
                              "return_tokens=True")
        token_lists = [self.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in batch]
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.tokenizer, "eos_token_id", None) or 0
        rows = self._generate_tokens(token_lists, cfg, pad, self._stop_ids(stop, ignore_eos), progress)
        out = rows if return_tokens else [self.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
        return out[0] if single else out
