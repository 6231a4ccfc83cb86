"""Progress bars and status lines on stderr (quiet with LLMC_QUIET=1 or when asked)."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def quiet() -> bool:
    return os.environ.get("LLMC_QUIET", "") not in ("", "0")


def log(message: str) -> None:
    """One status line on stderr."""
    if not quiet():
        print(f"llmc: {message}", file=sys.stderr, flush=True)


def bar(iterable=None, *, total=None, desc: str = "", unit: str = "it", enabled: bool = True):
    """A tqdm progress bar on stderr with time remaining; disabled when quiet."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=quiet() or not enabled,
                file=sys.stderr, dynamic_ncols=True, leave=False)
