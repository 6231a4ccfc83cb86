"""ONNX translations of llmc's custom ops: one function per `llmc::*` op, all in one table.

A translation is a function over onnxscript ops that receives the op's tensor arguments as
symbolic values and its int/float arguments as Python values (usable as attributes). The
table maps the op overload (`torch.ops.llmc.<name>.default`) to its translation; `lower`
passes it to `torch.onnx.export(custom_translation_table=...)`. Ops of the `llmc` namespace
that are missing here make `lower` raise UnsupportedOpError before anything is written.
"""

from __future__ import annotations

# op overload -> translation function. Ops register here as the passes that emit them land.
TRANSLATIONS: dict = {}
