"""ONNX Runtime backend: lower a Program to a compact, parity-checked ONNX folder, and run it.

    from llmc.backends.onnxruntime import OrtModel, lower
    lower(program, "out/onnx")          # model.onnx + external data, tokenizer, genai_config.json
    model = OrtModel("out/onnx")        # step / generate / perplexity / report

`lower`, `unsupported_ops` and `TRANSLATIONS` import the exporter (onnx, onnxscript) on first use.
"""

import logging

from llmc.backends.onnxruntime.backend import OnnxRuntimeBackend, OnnxRuntimeOptions
from llmc.backends.onnxruntime.runtime import ONNX_MANIFEST, OrtModel, is_onnx_folder

# torch's ONNX exporter logs "torchvision is not installed. Skipping ..." for each torchvision op it could
# register; llmc graphs never contain one, so the line says nothing to a user.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

_LAZY = {"lower": "export", "unsupported_ops": "export", "check_parity": "export", "TRANSLATIONS": "translations"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"llmc.backends.onnxruntime.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeOptions", "OrtModel", "is_onnx_folder", "ONNX_MANIFEST", "lower",
           "unsupported_ops", "check_parity", "TRANSLATIONS"]
