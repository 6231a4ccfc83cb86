"""Fingerprinted, atomically written checkpoints: how long calibration and tuning runs resume.

A checkpoint is a `torch.save`d dict carrying the fingerprint of everything that determined it
(configuration, model digest, data digest, seed). It is written to a temporary file and renamed,
so an interrupted write never leaves a truncated file, and it is read back only when the
fingerprint matches: a file of another run is ignored (and said so), never half-trusted.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from torch import fx

from llmc.fsutil import atomic_file, tensor_digest
from llmc.graph import graph_digest
from llmc.progress import log


def fingerprint(config: dict, *parts: str) -> str:
    """A 16-hex-digit sha256 of a JSON-able config and strings (model and data digests)."""
    return hashlib.sha256(json.dumps([config, *parts], sort_keys=True).encode()).hexdigest()[:16]


def graph_fingerprint(gm: fx.GraphModule, batches: list[torch.Tensor], *extra) -> str:
    """A digest of what calibration results depend on: the graph's code and state, the data, options."""
    return tensor_digest(batches, graph_digest(gm) + repr(extra))[:16]


def save_checkpoint(path: str, fingerprint: str, **payload) -> None:
    """`torch.save({"fingerprint": fingerprint, **payload})` to `path`, atomically."""
    with atomic_file(path) as tmp:
        torch.save({"fingerprint": fingerprint, **payload}, tmp)


def load_checkpoint(path: str | None, fingerprint: str, label: str = "") -> dict | None:
    """The checkpoint at `path` when it exists and was written under `fingerprint`, else None.

    A file of another run, or one that cannot be read, is reported (prefixed by `label`) and ignored.
    """
    if not path or not os.path.exists(path):
        return None
    prefix = f"{label}: " if label else ""
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint is recomputed, not trusted
        log(f"{prefix}{path} is unreadable ({e}); starting over")
        return None
    if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint:
        log(f"{prefix}{path} belongs to another run; starting over")
        return None
    return saved


def cache_path(cache_dir: str, name: str) -> str:
    """Where `cached_tensors` keeps `name` in `cache_dir`."""
    return os.path.join(os.path.expanduser(cache_dir), name + ".safetensors")


def read_cached(cache_dir: str | None, name: str) -> dict[str, torch.Tensor] | None:
    """The tensors kept as `cache_dir/name.safetensors`, or None when there is no readable file."""
    if not cache_dir or not os.path.exists(path := cache_path(cache_dir, name)):
        return None
    from safetensors.torch import load_file

    try:
        out = load_file(path)
    except Exception as e:  # noqa: BLE001 - a damaged file is recomputed, not trusted
        log(f"ignoring unreadable {path}: {e}")
        return None
    log(f"reusing {path}")
    return out


def cached_tensors(cache_dir: str | None, name: str, compute) -> dict[str, torch.Tensor]:
    """`compute()` -> dict of tensors, kept as `cache_dir/name.safetensors` and reused when present.

    `name` must carry the fingerprint of what the tensors depend on. Without `cache_dir`, computes.
    """
    if (out := read_cached(cache_dir, name)) is not None:
        return out
    out = compute()
    if cache_dir:
        from safetensors.torch import save_file

        with atomic_file(cache_path(cache_dir, name)) as tmp:
            save_file({k: v.contiguous() for k, v in out.items()}, tmp)
    return out
