"""Weak-to-strong search: steer a frozen base model with a small tuned / untuned guide pair.

Zhou et al. (arXiv 2405.19262, §3) align a large model at decoding time by maximising the guides'
log-likelihood ratio s(y) = Σ log π_tuned(y_t) − Σ log π_untuned(y_t) over responses sampled from
the base model. Chunk-level beam search (CBS) with width W, successors K and chunk length L:

    replicate each prompt W·K times; repeat until every row has finished or max_new_tokens:
        sample L base tokens for every row (temperature / top-k / top-p, one KV cache)
        score every row's response so far with the guides
        keep the top W rows of each prompt, repeat each K times (beam_idx.repeat(K))

The base model's KV cache is reordered with the kept rows (`reorder_cache`: an index_select on
the batch dim of every cache tensor), never recomputed. W=1, K=N, L=∞ is best-of-N; W=K=1 is
plain sampling; EFT (token-level logit arithmetic) is plain sampling of the fused model that
`fuse_guidance:mode=eft` builds. Everything runs through `search`.

The scorer is a `Model` whose step returns the running Σ of the log ratio as logits [B, S, 1]
(the Program `fuse_guidance` builds, in the torch runtime or ONNX Runtime). `GuideScorer` feeds it
incrementally with its own caches (each chunk costs the chunk) when it shares the base model's
vocabulary, and otherwise re-scores every response from scratch through text, as the reference
does across vocabularies: base tokens → text → the guides' tokens.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmc.errors import ConfigError
from llmc.generation import SamplingConfig, _filter_logits, left_pad, position_ids_from_mask
from llmc.progress import bar

_SPEC_KEYS = {"cbs": ("w", "k", "l"), "bon": ("n",), "sampling": (), "eft": ("beta",)}


@dataclass(frozen=True)
class SearchSpec:
    """What `search` does: `kind` cbs / bon / sampling / eft, beam width W, successors K, chunk L.

    chunk None is L = ∞ (score once, at the end). Parse one with `SearchSpec.parse`:
    `cbs:w=4,k=4,l=5`, `cbs:w=1,k=16,l=inf`, `bon:n=16`, `sampling`, `eft:beta=1`.
    """

    kind: str = "sampling"
    width: int = 1
    successors: int = 1
    chunk: int | None = None
    beta: float = 1.0

    def __post_init__(self):
        if self.kind not in _SPEC_KEYS:
            raise ConfigError(f"unknown search '{self.kind}': use cbs:w=W,k=K,l=L, bon:n=N, sampling or eft:beta=B")
        for name, v in (("w", self.width), ("k", self.successors)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"search {self.kind}: {name} must be a positive integer, got {v!r}")
        if self.chunk is not None and (not isinstance(self.chunk, int) or self.chunk < 1):
            raise ConfigError(f"search {self.kind}: l must be a positive integer or inf, got {self.chunk!r}")

    @property
    def rows(self) -> int:
        """Rows per prompt: W·K."""
        return self.width * self.successors

    @property
    def name(self) -> str:
        """The method's name in results: sampling, bon-16, eft, cbs-4-4-5 (cbs-W-K-inf for L = ∞)."""
        if self.kind in ("sampling", "eft"):
            return self.kind
        if self.kind == "bon":
            return f"bon-{self.successors}"
        return f"cbs-{self.width}-{self.successors}-{self.chunk if self.chunk is not None else 'inf'}"

    @classmethod
    def parse(cls, spec: "str | SearchSpec") -> "SearchSpec":
        """A SearchSpec from `kind` or `kind:key=value,...` (see the class docstring)."""
        if isinstance(spec, SearchSpec):
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError(f"empty search spec {spec!r}: use cbs:w=4,k=4,l=5, bon:n=16, sampling or eft:beta=1")
        kind, _, rest = spec.strip().partition(":")
        if kind not in _SPEC_KEYS:
            raise ConfigError(f"unknown search '{kind}' in '{spec}': use cbs:w=W,k=K,l=L, bon:n=N, sampling or "
                              "eft:beta=B")
        values: dict = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or not value:
                raise ConfigError(f"search spec '{spec}': '{item}' has no value; write {key}=VALUE")
            if key not in _SPEC_KEYS[kind]:
                allowed = ", ".join(_SPEC_KEYS[kind]) or "none"
                raise ConfigError(f"search '{kind}' has no option '{key}' (options: {allowed})")
            if key in values:
                raise ConfigError(f"search spec '{spec}': '{key}' given twice")
            if key == "beta":
                try:
                    values[key] = float(value)
                except ValueError:
                    raise ConfigError(f"search spec '{spec}': beta must be a number, got '{value}'") from None
            elif key == "l" and value.lower() in ("inf", "none"):
                values[key] = None
            elif re.fullmatch(r"\d+", value):
                values[key] = int(value)
            else:
                raise ConfigError(f"search spec '{spec}': {key} must be a positive integer"
                                  f"{' or inf' if key == 'l' else ''}, got '{value}'")
        missing = [k for k in _SPEC_KEYS[kind] if k not in values and k != "beta"]
        if missing:
            raise ConfigError(f"search spec '{spec}' lacks {', '.join(missing)}: e.g. cbs:w=4,k=4,l=5 or bon:n=16")
        if kind == "cbs":
            return cls("cbs", values["w"], values["k"], values["l"])
        if kind == "bon":
            return cls("bon", 1, values["n"], None)
        return cls(kind, beta=values.get("beta", 1.0))


def _as_tensor(t) -> Tensor:
    """A torch tensor from a torch tensor or a runtime's own array (an ONNX Runtime OrtValue)."""
    if isinstance(t, Tensor):
        return t
    if hasattr(t, "numpy"):
        return torch.from_numpy(t.numpy())
    return torch.as_tensor(t)


def reorder_cache(past: list, layout, index: Tensor) -> list[Tensor]:
    """Rows `index` of every batch-major cache tensor (`index_select` on dim 0): the beams kept.

    Works for every cache layout (float keys/values, cq_kv's codes and float windows): a tensor
    whose layout dim 0 is "batch" is indexed, any other is left as it is.
    """
    out = []
    for c, t in zip(layout, past):
        t = _as_tensor(t)
        out.append(t.index_select(0, index) if c.shape[0] == "batch" else t)
    return out


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers map text to the same ids (same class, same vocabulary where they list one)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    va, vb = getattr(a, "get_vocab", None), getattr(b, "get_vocab", None)
    if va is None or vb is None:
        return va is vb
    return va() == vb()


class GuideScorer:
    """Scores partial responses with a guide-scorer Model (step -> running Σ log-ratio [B, S, 1]).

    cache=True (possible when the scorer shares the base's vocabulary) keeps the scorer's own KV
    caches across chunks: each call feeds the previous chunk's last token and the new chunk, and
    drops the last position from the returned cache (it is fed again as the next call's first
    token, whose score needs the context before it). cache=False re-scores prompt + response from
    scratch at every call; with another vocabulary it goes through text.
    """

    def __init__(self, model, base_tokenizer, cache: bool | None = None):
        self.model = model
        self.shared = same_vocabulary(model.tokenizer, base_tokenizer)
        if cache and not self.shared:
            raise ConfigError("the scorer's tokenizer differs from the base model's: it re-scores through text, "
                              "without its own cache (cache=False)")
        self.cache = self.shared if cache is None else bool(cache)
        if self.cache:
            bad = [c.input_name for c in model.cache_layout if len(c.shape) < 3 or c.shape[2] != "past_sequence_length"]
            if bad:
                raise ConfigError(f"the scorer's cache tensors {', '.join(bad[:3])} have no position dim to drop; "
                                  "use cache=False")
        self.base_tokenizer = base_tokenizer
        pad = getattr(model.tokenizer, "pad_token_id", None)
        self.pad = pad if pad is not None else (getattr(model.tokenizer, "eos_token_id", None) or 0)
        eos = getattr(model, "eos_ids", ()) or ()
        self.eos = eos[0] if eos else getattr(model.tokenizer, "eos_token_id", None)
        self.seconds = 0.0
        self.calls = 0

    # -- state ---------------------------------------------------------------------------
    def start(self, prompt_ids: list[list[int]], prompts_text: list[str]) -> None:
        """Prefill the prompts (one row each); `expand` then copies rows to the search's rows."""
        t0 = time.perf_counter()
        self.total = torch.zeros(len(prompt_ids))
        if self.cache:
            ids, mask = left_pad(prompt_ids, self.pad)
            self.pending, self.pending_mask = ids[:, -1], mask[:, -1]
            self.cache_mask = mask[:, :-1]
            past = self.model.empty_cache(len(prompt_ids))
            if ids.shape[1] > 1:
                _, present = self.model.step(ids[:, :-1], mask[:, :-1], position_ids_from_mask(mask[:, :-1]), past)
                past = [_as_tensor(t) for t in present]
                self.calls += 1
            self.past = past
        else:
            self.prompt_tokens = [list(p) for p in prompt_ids] if self.shared else \
                [self.model.tokenizer.encode(t) for t in prompts_text]
        self.seconds += time.perf_counter() - t0

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (beam selection, or the initial replication)."""
        self.total = self.total.index_select(0, index)
        if self.cache:
            self.past = reorder_cache(self.past, self.model.cache_layout, index)
            self.pending = self.pending.index_select(0, index)
            self.pending_mask = self.pending_mask.index_select(0, index)
            self.cache_mask = self.cache_mask.index_select(0, index)
        else:
            self.prompt_tokens = [self.prompt_tokens[int(i)] for i in index]

    def score(self, new: Tensor, new_mask: Tensor, responses: Tensor, response_mask: Tensor,
              finished: Tensor) -> Tensor:
        """Scores [R] of every row's response so far, after `new` [R, n] base tokens (mask: real tokens).

        `responses` / `response_mask` [R, T] are the whole responses (used when re-scoring).
        """
        t0 = time.perf_counter()
        if self.cache:
            ids = torch.cat([self.pending[:, None], new], dim=1)
            mask = torch.cat([self.cache_mask, self.pending_mask[:, None], new_mask.long()], dim=1)
            pos = position_ids_from_mask(mask)[:, -ids.shape[1]:]
            running, present = self.model.step(ids, mask, pos, self.past)
            self.total = self.total + _as_tensor(running)[:, -1, 0].float()
            self.past = [_as_tensor(t)[:, :, :-1] for t in present]
            self.cache_mask = mask[:, :-1]
            self.pending, self.pending_mask = new[:, -1], new_mask[:, -1].long()
        else:
            self.total = self._rescore(responses, response_mask, finished)
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        return self.total

    def _rescore(self, responses: Tensor, response_mask: Tensor, finished: Tensor) -> Tensor:
        rows, lengths = [], []
        for i, (r, m) in enumerate(zip(responses.tolist(), response_mask.tolist())):
            toks = [t for t, keep in zip(r, m) if keep]
            if not self.shared:  # the text round trip: the guides read the response as text
                text = self.base_tokenizer.decode(toks, skip_special_tokens=True)
                toks = self.model.tokenizer.encode(text, add_special_tokens=False)
                if bool(finished[i]) and self.eos is not None:
                    toks = toks + [self.eos]
            rows.append(self.prompt_tokens[i] + toks)
            lengths.append(len(toks))
        ids, mask = left_pad(rows, self.pad)
        running, _ = self.model.step(ids, mask, position_ids_from_mask(mask), self.model.empty_cache(len(rows)))
        running = _as_tensor(running)[..., 0].float()  # [R, S]
        S = ids.shape[1]
        prompt_end = torch.tensor([S - 1 - n for n in lengths])  # the column of each row's last prompt token
        return running[:, -1] - running.gather(1, prompt_end[:, None])[:, 0]


@dataclass
class SearchResult:
    """What `search` returns, one entry per prompt (the chosen continuation) plus run totals."""

    texts: list[str]
    tokens: list[list[int]]
    scores: list[float | None]       # the guides' Σ log-ratio of the chosen continuation (None: no scorer)
    base_logprob: list[float]        # Σ log π_base (temperature 1) of the chosen continuation's tokens
    base_tokens: list[int]           # base-model tokens generated for each prompt, over all rows
    spec: SearchSpec = field(default_factory=SearchSpec)
    # With keep_candidates: every final row of each prompt, in row order, as (tokens, score, base log-prob).
    # For best-of-N these are the N samples, so best-of-M (M < N) over the first M is read off the same run.
    candidates: list = field(default_factory=list)
    seconds: float = 0.0
    scorer_seconds: float = 0.0
    scorer_calls: int = 0


def search(base, prompts, spec="sampling", scorer=None, *, max_new_tokens: int = 20, temperature: float = 0.7,
           top_k: int = 50, top_p: float = 1.0, seed: int | None = 0, batch_prompts: int = 1, stop=None,
           ignore_eos: bool = False, scorer_cache: bool | None = None, keep_candidates: bool = False,
           progress: bool = False) -> SearchResult:
    """Continue `prompts` (a str or a list) with `base` (any llmc Model) under the search `spec`.

    spec: a SearchSpec or its string (`cbs:w=4,k=4,l=5`, `bon:n=16`, `sampling`, `eft`); for `eft`
    `base` must be the EFT model (`fuse_guidance:mode=eft`), sampled like `sampling`.
    scorer: the guide scorer (a Model from `fuse_guidance`), or a GuideScorer; needed when W·K > 1.
    Sampling follows the reference: temperature 0.7, top-k 50, top-p 1. `seed` seeds one generator
    for the whole call; prompts are searched `batch_prompts` at a time (each with its own W·K rows).
    With W = K = 1 the tokens are those of `base.generate(..., do_sample=True)` with the same seed.
    keep_candidates: also return every final row (`SearchResult.candidates`).
    """
    spec = SearchSpec.parse(spec)
    cfg = SamplingConfig(max_new_tokens, True, temperature, top_k, top_p, seed)
    if batch_prompts < 1:
        raise ConfigError(f"batch_prompts must be >= 1, got {batch_prompts}")
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    R = spec.rows
    if R > 1 and scorer is None:
        raise ConfigError(f"search '{spec.name}' keeps the best of {R} rows by the guides' score: pass scorer= "
                          "(the Program of fuse_guidance, e.g. llmc.compile(TUNED, passes=['fuse_guidance:untuned=UNTUNED']))")
    guide = None
    if scorer is not None and R > 1:
        guide = scorer if isinstance(scorer, GuideScorer) else GuideScorer(scorer, base.tokenizer, scorer_cache)
    tok = base.tokenizer
    pad = getattr(tok, "pad_token_id", None)
    if pad is None:
        pad = getattr(tok, "eos_token_id", None) or 0
    stop_ids = torch.tensor(sorted(base._stop_ids(stop, ignore_eos)), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    t_start = time.perf_counter()
    scorer_s0 = guide.seconds if guide else 0.0
    calls0 = guide.calls if guide else 0
    result = SearchResult([], [], [], [], [], spec)
    batches = [prompts[i:i + batch_prompts] for i in range(0, len(prompts), batch_prompts)]
    for batch in bar(batches, desc=f"search {spec.name}", unit="batch", enabled=progress):
        _search_batch(base, batch, spec, guide, cfg, pad, stop_ids, gen, result, keep_candidates)
    result.seconds = time.perf_counter() - t_start
    if guide:
        result.scorer_seconds, result.scorer_calls = guide.seconds - scorer_s0, guide.calls - calls0
    return result


def _search_batch(base, prompts: list[str], spec: SearchSpec, guide, cfg: SamplingConfig, pad: int,
                  stop_ids: Tensor, gen, result: SearchResult, keep_candidates: bool = False) -> None:
    P, R, W, K = len(prompts), spec.rows, spec.width, spec.successors
    prompt_ids = [base.tokenizer.encode(p) for p in prompts]
    ids, mask = left_pad(prompt_ids, pad)
    pos = position_ids_from_mask(mask)
    with torch.inference_mode():
        logits, past = base.prefill_step(ids, mask, pos, base.empty_cache(P))
        # Every prompt's prefill is copied to its W·K rows (rows of a prompt are contiguous).
        rows = torch.arange(P).repeat_interleave(R)
        if R > 1:
            logits, past = logits.index_select(0, rows), reorder_cache(past, base.cache_layout, rows)
            mask, pos = mask.index_select(0, rows), pos.index_select(0, rows)
        if guide is not None:
            guide.start(prompt_ids, prompts)
            guide.reorder(rows)
        B = P * R
        out = torch.empty(B, 0, dtype=torch.long)
        real = torch.empty(B, 0, dtype=torch.bool)   # which generated positions are tokens, not padding
        done = torch.zeros(B, dtype=torch.bool)
        logp = torch.zeros(B, dtype=torch.float64)
        generated = torch.zeros(P, dtype=torch.long)
        since = 0
        scores = None
        for t in range(cfg.max_new_tokens):
            last = _as_tensor(logits)[:, -1, :].float()
            probs = _filter_logits(last, cfg).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            live = ~done
            logp += torch.where(live, last.log_softmax(-1).gather(1, nxt[:, None])[:, 0].double(), 0.0)
            generated += live.view(P, R).sum(1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            real = torch.cat([real, live[:, None]], dim=1)
            if stop_ids.numel():
                done = done | torch.isin(nxt, stop_ids)
            since += 1
            finished = bool(done.all()) or t == cfg.max_new_tokens - 1
            if guide is not None and (finished or (spec.chunk is not None and since == spec.chunk)):
                scores = guide.score(out[:, -since:], real[:, -since:], out, real, done)
                since = 0
                if not finished:  # keep the top W rows of each prompt, each repeated K times
                    top = scores.view(P, R).topk(W, dim=1).indices            # [P, W], best first
                    keep = (top.repeat(1, K) + torch.arange(P)[:, None] * R).reshape(-1)
                    past = reorder_cache(past, base.cache_layout, keep)
                    out, real, done, logp = out[keep], real[keep], done[keep], logp[keep]
                    nxt, mask, pos = nxt[keep], mask[keep], pos[keep]
                    guide.reorder(keep)
            if finished:
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
            pos = pos[:, -1:] + 1
            logits, past = base.step(nxt[:, None], mask, pos, past)
    best = scores.view(P, R).argmax(1) + torch.arange(P) * R if scores is not None else torch.arange(P) * R
    stop_set = set(stop_ids.tolist())

    def tokens_of(row: int) -> list[int]:
        toks = [t for t, keep in zip(out[row].tolist(), real[row].tolist()) if keep]
        cut = next((j for j, x in enumerate(toks) if x in stop_set), None)
        return toks if cut is None else toks[: cut + 1]

    for p, row in enumerate(best.tolist()):
        toks = tokens_of(row)
        if keep_candidates:
            result.candidates.append([(tokens_of(r), float(scores[r]) if scores is not None else None,
                                       float(logp[r])) for r in range(p * R, (p + 1) * R)])
        result.tokens.append(toks)
        result.texts.append(base.tokenizer.decode(toks, skip_special_tokens=True))
        result.scores.append(float(scores[row]) if scores is not None else None)
        result.base_logprob.append(float(logp[row]))
        result.base_tokens.append(int(generated[p]))


def continuation_logprob(model, prompts: list[str], continuations: list[list[int]]) -> list[float]:
    """Σ log π_model(continuation tokens | prompt) at temperature 1, one teacher-forced step per prompt."""
    out = []
    pad = getattr(model.tokenizer, "pad_token_id", None) or 0
    with torch.inference_mode():
        for prompt, cont in zip(prompts, continuations):
            p = model.tokenizer.encode(prompt)
            if not cont:
                out.append(0.0)
                continue
            ids, mask = left_pad([p + list(cont)], pad)
            logits, _ = model.step(ids, mask, position_ids_from_mask(mask), model.empty_cache(1))
            lp = _as_tensor(logits)[0, len(p) - 1:-1].double().log_softmax(-1)
            out.append(float(lp.gather(1, torch.as_tensor(cont)[:, None]).sum()))
    return out
