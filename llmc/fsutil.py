"""Writing output folders so that a failure leaves nothing half-written."""

from __future__ import annotations

import contextlib
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
