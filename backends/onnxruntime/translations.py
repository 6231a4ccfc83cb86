"""ONNX translations of llmc's custom ops: one function per `llmc::*` op, all in one table.

A translation is a function over onnxscript ops that receives the op's tensor arguments as
symbolic values and its int/float arguments as Python values (usable as attributes). The
table maps the op overload (`torch.ops.llmc.<name>.default`) to its translation; `lower`
passes it to `torch.onnx.export(custom_translation_table=...)`. Ops of the `llmc` namespace
that are missing here make `lower` raise UnsupportedOpError before anything is written.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op
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


def _dims(value, name: str) -> list[int]:
    """Static shape of a translation input (codebooks are initializers, so their shape is known)."""
    shape = getattr(value, "shape", None)
    dims = [d if isinstance(d, int) else None for d in shape] if shape is not None else None
    if not dims or any(d is None for d in dims):
        raise TypeError(f"the ONNX translation needs a static shape for {name}, got {shape}")
    return dims


def cq_decode(codes, codebooks):
    """llmc::cq_decode -> Gather from the flattened codebooks.

    codes [B, H, T, G] -> int64 row index code + (h*G + g)*K into the [H*G*K, c] table, one Gather,
    reshaped to [B, H, T, G*c]. Codes stay uint8 in the cache tensors; only this gather widens them.
    """
    H, G, K, c = _dims(codebooks, "codebooks")
    table = op.Reshape(codebooks, op.Constant(value_ints=[H * G * K, c]))
    offsets = op.Constant(value=onnx.numpy_helper.from_array(
        (np.arange(H * G, dtype=np.int64) * K).reshape(H, 1, G)))
    rows = op.Add(op.Cast(codes, to=onnx.TensorProto.INT64), offsets)
    return op.Reshape(op.Gather(table, rows, axis=0), op.Constant(value_ints=[0, 0, 0, G * c]))


def cq_encode(x, codebooks):
    """llmc::cq_encode -> nearest centroid by ArgMin of ||C||² - 2 x·C over each group's codebook.

    x [B, H, S, G*c] is regrouped to [H, G, B*S, c] so one batched MatMul scores every group against
    its own codebook; the argmin [H, G, B*S] goes back to [B, H, S, G] and to the code dtype.
    """
    from llmc.ops.cq import code_bits, code_dtype

    H, G, K, c = _dims(codebooks, "codebooks")
    shape = op.Shape(x)
    grouped = op.Reshape(x, op.Constant(value_ints=[0, 0, 0, G, c]))
    rows = op.Reshape(op.Transpose(grouped, perm=[1, 3, 0, 2, 4]), op.Constant(value_ints=[H, G, -1, c]))
    scores = op.MatMul(rows, op.Transpose(codebooks, perm=[0, 1, 3, 2]))  # [H, G, B*S, K]
    norms = op.Unsqueeze(op.ReduceSumSquare(codebooks, op.Constant(value_ints=[3]), keepdims=0),
                         op.Constant(value_ints=[2]))  # [H, G, 1, K]
    dist = op.Sub(norms, op.Mul(scores, op.Constant(value_float=2.0)))
    best = op.ArgMin(dist, axis=3, keepdims=0)  # [H, G, B*S]
    bhsg = op.Concat(op.Constant(value_ints=[H, G]), op.Slice(shape, op.Constant(value_ints=[0]),
                                                             op.Constant(value_ints=[1])),
                     op.Slice(shape, op.Constant(value_ints=[2]), op.Constant(value_ints=[3])), axis=0)
    codes = op.Transpose(op.Reshape(best, bhsg), perm=[2, 0, 3, 1])
    onnx_type = {torch.uint8: onnx.TensorProto.UINT8, torch.int16: onnx.TensorProto.INT16,
                 torch.int32: onnx.TensorProto.INT32}[code_dtype(code_bits(K))]
    return op.Cast(codes, to=onnx_type)


def nbits_linear(x, codes, scales, zero_points, K: int, N: int, bits: int, block_size: int):
    """llmc::nbits_linear -> com.microsoft::MatMulNBits (the torch buffers are already in its layout)."""
    return MSFT.MatMulNBits(x, codes, scales, zero_points, K=K, N=N, bits=bits, block_size=block_size)


register_matmulnbits_schema()

# op overload -> translation function.
TRANSLATIONS: dict = {
    torch.ops.llmc.nbits_linear.default: nbits_linear,
    torch.ops.llmc.cq_encode.default: cq_encode,
    torch.ops.llmc.cq_decode.default: cq_decode,
}
