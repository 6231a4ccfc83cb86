"""Data sets by name or path: evaluation text and calibration token batches."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from llmc.errors import DataError

# Name -> path relative to a data folder (see ../shared/data/README.md).
DATASETS = {
    "wikitext2-test": "wikitext-2-raw/wiki.test.raw",
    "wikitext2-valid": "wikitext-2/valid.txt",
}


def data_dirs() -> list[Path]:
    """Folders searched for named data sets: $LLMC_DATA_DIR, then shared/data beside the checkout."""
    dirs = []
    if os.environ.get("LLMC_DATA_DIR"):
        dirs.append(Path(os.environ["LLMC_DATA_DIR"]))
    repo = Path(__file__).resolve().parent.parent
    dirs += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"]
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def resolve(name_or_path: str) -> Path:
    """Path of a named data set (`wikitext2-test`, `wikitext2-valid`) or an explicit file path."""
    p = Path(os.path.expanduser(str(name_or_path)))
    if p.is_file():
        return p
    if name_or_path in DATASETS:
        for d in data_dirs():
            cand = d / DATASETS[name_or_path]
            if cand.is_file():
                return cand
        raise DataError(f"data set '{name_or_path}' ({DATASETS[name_or_path]}) not found in "
                        f"{', '.join(str(d) for d in data_dirs())}; set LLMC_DATA_DIR to the folder holding it "
                        "or pass the file path")
    if p.exists():
        raise DataError(f"{name_or_path} is not a file")
    raise DataError(f"no such data set or file: '{name_or_path}' (named sets: {', '.join(DATASETS)})")


def text(name_or_path: str) -> str:
    """The whole text of a data set, read as-is (UTF-8)."""
    path = resolve(name_or_path)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def sha256(name_or_path: str) -> str:
    return hashlib.sha256(resolve(name_or_path).read_bytes()).hexdigest()


def tokenize(tokenizer, content: str) -> torch.Tensor:
    """Token ids [N] of a whole text with the tokenizer's default special tokens."""
    import transformers

    # The length warning of HF tokenizers is meaningless here: the ids are cut into windows later.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return torch.as_tensor(tokenizer.encode(content), dtype=torch.long)
    finally:
        transformers.logging.set_verbosity(verbosity)


def calibration_batches(tokenizer, source: str = "wikitext2-valid", num_samples: int = 32, seq_len: int = 512,
                        seed: int = 0) -> list[torch.Tensor]:
    """`num_samples` random windows of `seq_len` tokens from a data set, each a LongTensor [1, seq_len]."""
    ids = tokenize(tokenizer, text(source))
    if ids.numel() <= seq_len:
        raise DataError(f"{source} has {ids.numel()} tokens, fewer than one calibration window of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=gen)
    return [ids[s: s + seq_len][None] for s in starts.tolist()]


def prompt_slices(batches: list[torch.Tensor], num: int, length: int, seed: int = 0) -> torch.Tensor:
    """`num` random slices [num, length] of token batches (each [B, S], S > length), as prompts."""
    rows = [row for b in batches for row in b]
    if not rows or any(r.numel() <= length for r in rows):
        raise DataError(f"prompts of {length} tokens need token batches longer than that; calibrate on "
                        "longer windows")
    gen = torch.Generator().manual_seed(seed)
    which = torch.randint(0, len(rows), (num,), generator=gen).tolist()
    offsets = torch.rand(num, generator=gen).tolist()
    out = torch.empty(num, length, dtype=torch.long)
    for i, (r, f) in enumerate(zip(which, offsets)):
        start = int(f * (rows[r].numel() - length + 1))
        out[i] = rows[r][start: start + length]
    return out


def sentence_starts(text: str, words: int, limit: int, min_words: int = 12) -> list[str]:
    """The first `words` words of each sentence of `text` with at least `min_words` words, up to `limit`.

    Headings (`= ... =`) and empty lines are skipped, as are sentences with `<unk>` among the kept
    words; wikitext's spaced punctuation (` @-@ `, ` , `) is joined back so the prefixes read as text.
    """
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        line = line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
        for sentence in re.split(r"(?<=[.!?]) ", line):
            toks = sentence.split()
            if len(toks) < min_words or "<unk>" in toks[:words]:
                continue
            prefix = " ".join(toks[:words])
            prefix = re.sub(r" ([,.;:!?')])", r"\1", prefix).replace("( ", "(").replace(" 's", "'s")
            out.append(prefix)
            if len(out) >= limit:
                return out
    return out
