"""ONNX translations of llmc's custom ops: one function per `llmc::*` op, all in one table.

A translation is a function over onnxscript ops that receives the op's tensor arguments as
symbolic values and its int/float arguments as Python values (usable as attributes). The
table maps the op overload (`torch.ops.llmc.<name>.default`) to its translation; `lower`
passes it to `torch.onnx.export(custom_translation_table=...)`. Ops of the `llmc` namespace
that are missing here make `lower` raise UnsupportedOpError before anything is written.
"""

from __future__ import annotations

import onnx
import torch
from onnx.defs import OpSchema
from onnxscript import values

import llmc.ops  # noqa: F401  (registers the torch ops named below)

MSFT = values.Opset("com.microsoft", 1)


def register_matmulnbits_schema() -> None:
    """Declare ORT's contrib op to onnx, so onnxscript can emit it (the exporter needs a schema)."""
    if onnx.defs.has("MatMulNBits", "com.microsoft"):
        return
    P = OpSchema.FormalParameter
    Opt = OpSchema.FormalParameterOption.Optional
    A = OpSchema.Attribute
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        doc="y = A @ dequant(B)ᵀ with B blockwise-quantized to `bits` along K (ONNX Runtime contrib op).",
        inputs=[P("A", "T1"), P("B", "T2"), P("scales", "T1"), P("zero_points", "T3", param_option=Opt)],
        outputs=[P("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], "activations and scales"),
                          ("T2", ["tensor(uint8)", "tensor(int32)"], "packed codes"),
                          ("T3", ["tensor(uint8)", "tensor(int32)", "tensor(float)", "tensor(float16)"], "zero points")],
        attributes=[A("K", OpSchema.AttrType.INT, "input features"), A("N", OpSchema.AttrType.INT, "output features"),
                    A("bits", OpSchema.AttrType.INT, "bits per weight"),
                    A("block_size", OpSchema.AttrType.INT, "weights per block along K"),
                    A("accuracy_level", OpSchema.AttrType.INT, "minimum compute precision", required=False)],
    )
    onnx.defs.register_schema(schema)


def nbits_linear(x, codes, scales, zero_points, K: int, N: int, bits: int, block_size: int):
    """llmc::nbits_linear -> com.microsoft::MatMulNBits (the torch buffers are already in its layout)."""
    return MSFT.MatMulNBits(x, codes, scales, zero_points, K=K, N=N, bits=bits, block_size=block_size)


register_matmulnbits_schema()

# op overload -> translation function.
TRANSLATIONS: dict = {
    torch.ops.llmc.nbits_linear.default: nbits_linear,
}
