"""The `onnxruntime` backend: its options, and the lower / load / owns contract of llmc.backend."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from llmc.backend import Backend
from llmc.backends.onnxruntime.runtime import ONNX_MANIFEST, OrtModel
from llmc.errors import ConfigError


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    """How a Program is written as ONNX (see `lower`)."""

    parity: bool = field(default=True, metadata={"help": "check ONNX Runtime against torch (logits and a greedy "
                                                          "decode) before the folder is renamed into place"})
    vq_lowering: Literal["auto", "kernel", "dequantize"] = field(default="auto", metadata={
        "help": "vector-quantized layers as llmc's custom op reading uint8 codes at run time (kernel), as "
                "standard ONNX that ONNX Runtime dequantizes at load (dequantize), or kernel where a C compiler "
                "can build it (auto)"})
    atol: float = field(default=1e-3, metadata={"help": "parity: largest allowed logit difference"})
    fuse: bool = field(default=True, metadata={"help": "rewrite RMSNorm (+ residual add), the rotary embedding and "
                                                       "MatMulNBits layers sharing an input into ONNX Runtime's "
                                                       "fused contrib ops (the manifest's 'fusions' counts them)"})

    def __post_init__(self):
        if self.vq_lowering not in ("auto", "kernel", "dequantize"):
            raise ConfigError(f"onnxruntime.vq_lowering must be auto, kernel or dequantize, got {self.vq_lowering!r}")
        if not self.atol > 0:
            raise ConfigError(f"onnxruntime.atol must be > 0, got {self.atol}")


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime: a compact, parity-checked ONNX folder (codes stay packed), run by `OrtModel`."""

    name = "onnxruntime"
    Options = OnnxRuntimeOptions

    def lower(self, program, out_dir: str, options=None, overwrite: bool = False) -> str:
        from llmc.backends.onnxruntime.export import lower

        opts = self.options(options)
        return lower(program, out_dir, parity=opts.parity, overwrite=overwrite, atol=opts.atol,
                     vq_lowering=opts.vq_lowering, fuse=opts.fuse)

    def load(self, folder: str, threads: int | None = None) -> OrtModel:
        return OrtModel(folder, threads=threads)

    def owns(self, folder: str) -> bool:
        return os.path.isfile(os.path.join(folder, ONNX_MANIFEST))
