"""Writing outputs so that a failure leaves nothing half-written, and digests that name resumable work."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

from llmc.errors import ArtifactError


CHECKSUMS = "checksums.json"
CHECKSUMS_FORMAT = "llmc-checksums/1"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_folder(directory: str, overwrite: bool = False, error=ArtifactError, checksums: bool = True):
    """Yield a temporary sibling of `directory` to write into; rename it into place on success.

    An existing `directory` is refused (raising `error`) unless `overwrite`; on any exception the
    temporary folder is removed and `directory` is left as it was. With `checksums`, the size and
    sha256 of every file written are recorded in `checksums.json` before the rename (`verify_folder`).
    The folder gets the permissions the umask gives a new folder (not the private ones of a temporary).
    """
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise error(f"{directory} already exists; choose another folder or pass overwrite=True "
                    "(--overwrite on the command line)")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if checksums:
            write_checksums(tmp)
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != CHECKSUMS:
                out.append(rel)
    return sorted(out)


def write_checksums(folder: str) -> None:
    """Record the size and sha256 of every file under `folder` in `folder/checksums.json`."""
    files = {rel: {"bytes": os.path.getsize(os.path.join(folder, rel)), "sha256": file_sha256(os.path.join(folder, rel))}
             for rel in _files(folder)}
    with open(os.path.join(folder, CHECKSUMS), "w") as f:
        json.dump({"format": CHECKSUMS_FORMAT, "files": files}, f, indent=1)


def verify_folder(folder: str, required: bool = False) -> int | None:
    """Check every file listed in `folder/checksums.json`: present, of its size, of its sha256.

    Returns how many files were checked, or None when the folder has no checksums.json (written before
    llmc recorded them) and not `required`. A missing, truncated or altered file is an ArtifactError
    naming the file and saying to write the folder again.
    """
    folder = os.path.abspath(folder)
    path = os.path.join(folder, CHECKSUMS)
    if not os.path.isfile(path):
        if required:
            raise ArtifactError(f"{folder} has no {CHECKSUMS}: it was not written by this llmc (or before llmc "
                                "recorded checksums); its files cannot be verified. Compile or export it again")
        return None
    try:
        with open(path) as f:
            doc = json.load(f)
        files = doc["files"]
        if doc.get("format") != CHECKSUMS_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {doc.get('format')!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path} is corrupt ({e}); compile or export the model again") from None
    for rel, want in files.items():
        f = os.path.join(folder, rel)
        if not os.path.isfile(f):
            raise ArtifactError(f"{folder} is incomplete: {rel} is missing; compile or export the model again")
        size = os.path.getsize(f)
        if size != want["bytes"]:
            raise ArtifactError(f"{folder} is corrupt: {rel} is {size} bytes, {want['bytes']} were written "
                                f"({'truncated' if size < want['bytes'] else 'grown'}); compile or export the model again")
        if file_sha256(f) != want["sha256"]:
            raise ArtifactError(f"{folder} is corrupt: {rel} does not match the checksum written with it; compile "
                                "or export the model again")
    return len(files)


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a temporary path beside `path` to write; rename it onto `path` on success, remove it on failure.

    The file gets the permissions the umask gives a new file, whatever mode its writer created it with.
    """
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
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
