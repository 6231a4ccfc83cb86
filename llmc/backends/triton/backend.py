"""The `triton` backend: its options, `lower`, and the lower / load / owns contract of llmc.backend."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from llmc.backend import Backend
from llmc.backends.triton.runtime import FORMAT, FORMAT_VERSION, PROGRAM_DIR, TRITON_MANIFEST, TritonModel
from llmc.errors import ConfigError, UnsupportedOpError

_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class TritonOptions:
    """How a Triton folder runs when it is opened right after `llmc compile` (saved folders take the
    same choices as TritonModel arguments)."""

    dtype: str = field(default="auto", metadata={"help": "floating weights and activations at run time: "
                                                          "bfloat16 on CUDA and float32 on CPU (auto), or "
                                                          "float32 / float16 / bfloat16"})

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ConfigError(f"triton.dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")


def lower(program, out_dir: str, overwrite: bool = False) -> str:
    """Write `program` as a Triton folder: the program as the core saves it (program/: exported graph,
    compact safetensors weights, config, tokenizer, checksums) and llmc_triton.json naming the kernels.

    UnsupportedOpError, naming every such op, when the graph calls an llmc op without a Triton kernel;
    nothing is written then. Needs neither a GPU nor triton: only running the folder does.
    """
    from llmc.compiled import save_program, versions
    from llmc.fsutil import atomic_folder

    from llmc.backends.triton import ops as triton_ops

    missing = triton_ops.unsupported_ops(program.gm)
    if missing:
        raise UnsupportedOpError(f"the triton backend has no kernel for {', '.join('llmc::' + m for m in missing)}; "
                                 "compile without the pass that emits it, or use the torch backend")
    counts: dict = {}
    for node in program.gm.graph.nodes:
        op = triton_ops.llmc_op(node)
        if op:
            counts[op] = counts.get(op, 0) + 1
    out_dir = os.path.abspath(out_dir)
    with atomic_folder(out_dir, overwrite) as tmp:
        save_program(program, os.path.join(tmp, PROGRAM_DIR))
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "name": program.name, "source": program.source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "program": PROGRAM_DIR,
            "versions": versions() | _triton_version(),
            "ops": {f"llmc::{op}": n for op, n in sorted(counts.items())},
            "kernels": {f"llmc::{op}": triton_ops.LOWERING[op][1] for op in sorted(counts)},
            "cache_layout": [c.to_json() for c in program.cache_layout],
            "history": [h.to_json() for h in program.history],
        }
        with open(os.path.join(tmp, TRITON_MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
    return out_dir


def _triton_version() -> dict:
    import importlib.metadata as md

    try:
        return {"triton": md.version("triton")}
    except md.PackageNotFoundError:
        return {}


class TritonBackend(Backend):
    """Triton kernels for every llmc op; the graph through torch.compile on CUDA (`TritonModel`)."""

    name = "triton"
    Options = TritonOptions

    def lower(self, program, out_dir: str, options=None, overwrite: bool = False) -> str:
        self._options = self.options(options)
        return lower(program, out_dir, overwrite=overwrite)

    def load(self, folder: str) -> TritonModel:
        opts = getattr(self, "_options", None) or self.Options()
        return TritonModel(folder, dtype=None if opts.dtype == "auto" else opts.dtype)

    def owns(self, folder: str) -> bool:
        return os.path.isfile(os.path.join(folder, TRITON_MANIFEST))
