"""Knowledge-conflict tasks: MemoTrap (JSONL) and KRE (COSE_KRE, a JSON array) examples as prompt pairs
and answer tokens, and how a model is scored on them (does it follow the context or its memory?).

Used by the `ircan` pass (to mine context-aware neurons) and by `llmc eval memotrap|kre`.

A file's format is recognised by its records' fields: `prompt`, `classes`, `answer_index` (MemoTrap)
or `question`, `choices`, `candidate`, `negative_context` (KRE). Every error names the file and the
line of the record at fault.

Prompts (the research notes' formats, with the leading space byte-level BPE tokenizers need):
- MemoTrap: with context, the whole `prompt` ("Write a quote that ends in the word "kings": No man can
  serve two"); without context, what follows its first ": " (the instruction is the context; the
  reference code splits at the last ": ", which also cuts the quote of 14 dev prompts). The answer is
  `classes[answer_index]` stripped of spaces and its final period, tokenized with one leading space;
  the memorised answer is the other class.
- KRE: "Choose the correct option to answer the following question: \\n{negative_context}\\n{question}\\n"
  then one line "A. choice" per option, then "Answer:" (no trailing space); without context, the same
  without the context line. The context-consistent answer is " {candidate}" (the letter of the option
  the context supports); the memorised one is " {answer}".
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from llmc.data import data_dirs
from llmc.errors import ConfigError, DataError, check_finite
from llmc.generation import left_pad, position_ids_from_mask
from llmc.progress import bar

# task shortcut -> its files under a data folder (../shared/data or $LLMC_DATA_DIR); {split}: dev | test
TASKS = {"memotrap": "ircan/memotrap/{split}.jsonl", "cose": "ircan/cose/{split}.json"}
LETTERS = "ABCDEFGHIJ"
KRE_FIELDS = ("question", "choices", "candidate", "negative_context", "answer")
MEMOTRAP_FIELDS = ("prompt", "classes", "answer_index")


@dataclass(frozen=True)
class Example:
    """One example: the prompts with and without the context, the answers as text (leading space)."""

    task: str            # "memotrap" | "kre"
    with_context: str
    without_context: str
    answer: str          # context-consistent answer, e.g. " kings" or " A"
    memorised: str       # the parametric answer, e.g. " masters" or " C"
    where: str           # "file:line"
    options: tuple = ()  # KRE: every option letter (" A", " B", ...), scored against each other


def task_file(task: str, split: str = "dev") -> Path:
    """The `split` (dev | test) file of a task shortcut, found in llmc's data folders."""
    rel = TASKS[task].format(split=split)
    for d in data_dirs():
        if (d / rel).is_file():
            return d / rel
    raise DataError(f"the {task} {split} file ({rel}) is not in {', '.join(str(d) for d in data_dirs())}; "
                    "set LLMC_DATA_DIR to the folder holding it or pass data=PATH")


def load_examples(path: str | os.PathLike) -> list[Example]:
    """Every example of a MemoTrap JSONL or KRE JSON file, recognised by its fields."""
    path = Path(os.path.expanduser(str(path)))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    records = _array_records(text, path) if text.lstrip().startswith("[") else _jsonl_records(text, path)
    if not records:
        raise DataError(f"{path} holds no examples")
    out = []
    for line, rec in records:
        where = f"{path}:{line}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        if all(k in rec for k in MEMOTRAP_FIELDS):
            out.append(_memotrap(rec, where))
        elif all(k in rec for k in KRE_FIELDS):
            out.append(_kre(rec, where))
        else:
            have = ", ".join(sorted(rec)) or "none"
            raise DataError(f"{where}: not a MemoTrap record (fields {', '.join(MEMOTRAP_FIELDS)}) nor a KRE "
                            f"record (fields {', '.join(KRE_FIELDS)}); it has {have}")
    return out


def _jsonl_records(text: str, path: Path) -> list[tuple[int, object]]:
    out = []
    for k, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((k, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{k}: not valid JSON ({e.msg} at column {e.colno}); a MemoTrap file holds one "
                            "JSON object per line") from None
    return out


def _array_records(text: str, path: Path) -> list[tuple[int, object]]:
    """The elements of a JSON array with the line each starts on."""
    dec = json.JSONDecoder()

    def skip(i):
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def fail(i, msg):
        raise DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: {msg}; a KRE file is one JSON array of objects")

    out, i = [], skip(0) + 1  # past "["
    i = skip(i)
    if i < len(text) and text[i] == "]":
        return out
    while True:
        try:
            obj, j = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            fail(e.pos, f"not valid JSON ({e.msg})")
        out.append((text.count("\n", 0, i) + 1, obj))
        i = skip(j)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
        elif i < len(text) and text[i] == "]":
            if skip(i + 1) != len(text):
                fail(i + 1, "unexpected text after the array")
            return out
        else:
            fail(i, "expected ',' or ']' after an element")


def _memotrap(rec: dict, where: str) -> Example:
    prompt, classes, idx = rec["prompt"], rec["classes"], rec["answer_index"]
    if isinstance(classes, str):
        try:
            classes = ast.literal_eval(classes)
        except (ValueError, SyntaxError):
            raise DataError(f"{where}: 'classes' is not a list of strings: {rec['classes']!r}") from None
    if not (isinstance(classes, (list, tuple)) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise DataError(f"{where}: 'classes' must be a list of at least two strings, got {classes!r}")
    if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(classes):
        raise DataError(f"{where}: 'answer_index' must be an index into 'classes' (0..{len(classes) - 1}), got {idx!r}")
    if not isinstance(prompt, str) or ": " not in prompt:
        raise DataError(f"{where}: 'prompt' must be a string 'instruction: text' (the instruction is the context "
                        f"removed for the no-context prompt), got {prompt!r}")
    without = prompt.partition(": ")[2]
    words = [_word(c) for c in classes]
    if not all(words):
        raise DataError(f"{where}: a class is empty: {classes!r}")
    memorised = next(w for k, w in enumerate(words) if k != idx)
    return Example("memotrap", prompt, without, " " + words[idx], " " + memorised, where)


def _word(c: str) -> str:
    c = c.strip()
    return c[:-1] if c.endswith(".") else c


def kre_prompt(question: str, choices: list[str], context: str | None) -> str:
    lines = ["Choose the correct option to answer the following question: "]
    if context is not None:
        lines.append(context)
    lines.append(question)
    lines += [f"{LETTERS[k]}. {c}" for k, c in enumerate(choices)]
    lines.append("Answer:")
    return "\n".join(lines)


def _kre(rec: dict, where: str) -> Example:
    choices = rec["choices"]
    if not (isinstance(choices, list) and 2 <= len(choices) <= len(LETTERS) and all(isinstance(c, str) for c in choices)):
        raise DataError(f"{where}: 'choices' must be a list of 2..{len(LETTERS)} strings, got {choices!r}")
    valid = LETTERS[:len(choices)]
    for key in ("candidate", "answer"):
        if not (isinstance(rec[key], str) and len(rec[key]) == 1 and rec[key] in valid):
            raise DataError(f"{where}: '{key}' must be one of the option letters {', '.join(valid)}, got {rec[key]!r}")
    for key in ("question", "negative_context"):
        if not isinstance(rec[key], str) or not rec[key].strip():
            raise DataError(f"{where}: '{key}' must be a non-empty string")
    return Example("kre", kre_prompt(rec["question"], choices, rec["negative_context"]),
                   kre_prompt(rec["question"], choices, None), " " + rec["candidate"], " " + rec["answer"], where,
                   tuple(" " + letter for letter in valid))


def encode(tokenizer, text: str, special: bool = True) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=special))


def answer_token(tokenizer, answer: str, where: str) -> int:
    """The first token of an answer (with its leading space), without special tokens."""
    ids = encode(tokenizer, answer, special=False)
    if not ids:
        raise DataError(f"{where}: the answer {answer!r} tokenizes to nothing")
    return ids[0]


# -- scoring ----------------------------------------------------------------------------------------
# A KRE example is answered by the argmax over its option letters' logits at the last prompt
# position; a MemoTrap example by a greedy continuation of MEMOTRAP_TOKENS tokens, whose text up to
# the first period (stripped) is matched exactly against the two classes. Accuracy: the fraction
# that follow the context; stubbornness: the fraction that give the memorised answer. With `cad`
# = α > 0 (context-aware decoding), every next-token logit is (1 + α)·ℓ(with context) − α·ℓ(without).

MEMOTRAP_TOKENS = 10


def _pad_id(model) -> int:
    tok = model.tokenizer
    pad = getattr(tok, "pad_token_id", None)
    if pad is None:
        pad = getattr(tok, "eos_token_id", None) or 0
    return int(pad)


class _Batch:
    """A left-padded batch of prompts decoded together; `logits` is the last position's, [B, V]."""

    def __init__(self, model, prompts: list[list[int]], pad_id: int):
        ids, self.mask = left_pad(prompts, pad_id)
        self.model, self.pos = model, position_ids_from_mask(self.mask)
        logits, self.cache = model.prefill_step(ids, self.mask, self.pos, model.empty_cache(len(prompts)))
        self.logits = logits[:, -1].float()
        check_finite(self.logits, "the prompts' last position")

    def advance(self, tokens: torch.Tensor) -> None:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.pos = self.pos[:, -1:] + 1
        logits, self.cache = self.model.step(tokens[:, None], self.mask, self.pos, self.cache)
        self.logits = logits[:, -1].float()
        check_finite(self.logits, "a decode step")


def continuations(model, with_ids: list[list[int]], without_ids: list[list[int]] | None, tokens: int,
                  cad: float = 0.0, stop_ids=()) -> list[list[int]]:
    """Greedy continuations of a batch of prompts `with_ids` (left-padded together); with `cad` > 0
    every step's logits are CAD-combined with the same continuation of `without_ids` (a second batch
    with its own cache). A row stops after a stop id (kept); finished rows are fed the pad token."""
    pad = _pad_id(model)
    w = _Batch(model, with_ids, pad)
    o = _Batch(model, without_ids, pad) if cad else None
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
    done = torch.zeros(len(with_ids), dtype=torch.bool)
    out = []
    for t in range(tokens):
        logits = (1 + cad) * w.logits - cad * o.logits if cad else w.logits
        nxt = torch.where(done, torch.full_like(done, pad, dtype=torch.long), logits.argmax(-1))
        out.append(nxt)
        done |= torch.isin(nxt, stop)
        if bool(done.all()) or t == tokens - 1:
            break
        w.advance(nxt)
        if cad:
            o.advance(nxt)
    rows = []
    for row in torch.stack(out, 1).tolist():
        cut = next((j for j, tok in enumerate(row) if tok in set(stop.tolist())), None)
        rows.append(row if cut is None else row[: cut + 1])
    return rows


def continuation(model, with_ids: list[int], without_ids: list[int] | None, tokens: int, cad: float = 0.0,
                 stop_ids=()) -> list[int]:
    """`continuations` of one prompt."""
    return continuations(model, [with_ids], [without_ids] if cad else None, tokens, cad, stop_ids)[0]


def predict_batch(model, examples: list[Example], cad: float = 0.0) -> list[str]:
    """The model's answers to examples of one task, run as one batch: an option letter (KRE) or the
    continuation's first sentence (MemoTrap), with a leading space as the Example's answers have."""
    tok = model.tokenizer
    with_ids = [encode(tok, ex.with_context) for ex in examples]
    without_ids = [encode(tok, ex.without_context) for ex in examples] if cad else None
    if examples[0].task == "kre":
        pad = _pad_id(model)
        logits = _Batch(model, with_ids, pad).logits
        if cad:
            logits = (1 + cad) * logits - cad * _Batch(model, without_ids, pad).logits
        answers = []
        for ex, row in zip(examples, logits):
            letters = [answer_token(tok, o, ex.where) for o in ex.options]
            answers.append(ex.options[int(row[letters].argmax())])
        return answers
    eos = set(getattr(model, "eos_ids", ()) or ())
    rows = continuations(model, with_ids, without_ids, MEMOTRAP_TOKENS, cad, eos)
    return [" " + tok.decode(r, skip_special_tokens=True).strip().split(".")[0].strip() for r in rows]


def predict(model, ex: Example, cad: float = 0.0) -> str:
    """The model's answer to one example (see `predict_batch`)."""
    return predict_batch(model, [ex], cad)[0]


def context_following(model, examples: list[Example], cad: float = 0.0, progress: bool = True,
                      batch_size: int = 16) -> dict:
    """Accuracy (follows the context) and stubbornness (gives the memorised answer) over `examples`,
    scored `batch_size` examples at a time (left-padded; greedy answers as at batch 1 up to float
    rounding)."""
    if cad < 0:
        raise ConfigError(f"cad (context-aware decoding's alpha) must be >= 0, got {cad}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    follows = stubborn = 0
    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    with torch.inference_mode():
        for chunk in bar(batches, desc="context tasks", unit="batch", enabled=progress):
            for ex, answer in zip(chunk, predict_batch(model, chunk, cad)):
                follows += answer == ex.answer
                stubborn += answer == ex.memorised
    n = len(examples)
    return {"examples": n, "accuracy": follows / n, "stubbornness": stubborn / n, "cad": cad}
