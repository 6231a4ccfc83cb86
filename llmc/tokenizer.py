"""Tokenizer handling: Hugging Face tokenizers, plus a byte-level tokenizer for tiny test models."""

from __future__ import annotations

import json
import os

BYTE_TOKENIZER_FILE = "llmc_byte_tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255. Used with tiny random models, which have 256-token vocabularies."""

    eos_token_id = 2
    pad_token_id = 0
    bos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save_pretrained(self, directory: str) -> None:
        with open(os.path.join(directory, BYTE_TOKENIZER_FILE), "w") as f:
            json.dump({"type": "bytes", "vocab_size": 256}, f)


def load_tokenizer(directory: str):
    """Load the tokenizer saved in `directory` (HF or llmc's byte tokenizer), or None if it has none."""
    if os.path.exists(os.path.join(directory, BYTE_TOKENIZER_FILE)):
        return ByteTokenizer()
    if not any(os.path.exists(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)
