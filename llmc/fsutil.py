"""Writing outputs so that a failure leaves nothing half-written, and digests that name resumable work."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile

from llmc.errors import ArtifactError


@contextlib.contextmanager
def atomic_folder(directory: str, overwrite: bool = False, error=ArtifactError):
    """Yield a temporary sibling of `directory` to write into; rename it into place on success.

    An existing `directory` is refused (raising `error`) unless `overwrite`; on any exception the
    temporary folder is removed and `directory` is left as it was.
    """
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise error(f"{directory} already exists; choose another folder or pass overwrite=True "
                    "(--overwrite on the command line)")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a temporary path beside `path` to write; rename it onto `path` on success, remove it on failure."""
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def tensor_digest(tensors, extra: str = "") -> str:
    """sha256 over tensors' shapes, dtypes and bytes (in order) and a string."""
    import torch

    h = hashlib.sha256(extra.encode())
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
