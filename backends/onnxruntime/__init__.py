"""ONNX Runtime backend: lower a Program to a compact, parity-checked ONNX folder.

    from llmc.backends.onnxruntime import lower
    lower(program, "out/onnx")          # model.onnx + external data, tokenizer, genai_config.json
"""

from llmc.backends.onnxruntime.lower import ONNX_MANIFEST, lower, unsupported_ops
from llmc.backends.onnxruntime.translations import TRANSLATIONS

__all__ = ["lower", "unsupported_ops", "TRANSLATIONS", "ONNX_MANIFEST"]
