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
from llmc.ops.nbits_linear import ort_bits

MSFT = values.Opset("com.microsoft", 1)
LLMC = values.Opset("llmc", 1)  # llmc's own ops, run by the custom-op library (backends/onnxruntime/custom_ops.py)


def register_contrib_schemas() -> None:
    """Declare the ORT contrib ops llmc emits to onnx, so onnxscript can emit them (the exporter needs a schema)."""
    P = OpSchema.FormalParameter
    Opt = OpSchema.FormalParameterOption.Optional
    A = OpSchema.Attribute
    INT = OpSchema.AttrType.INT
    if not onnx.defs.has("MatMulNBits", "com.microsoft"):
        onnx.defs.register_schema(OpSchema(
            "MatMulNBits", "com.microsoft", 1,
            doc="y = A @ dequant(B)ᵀ with B blockwise-quantized to `bits` along K (ONNX Runtime contrib op).",
            inputs=[P("A", "T1"), P("B", "T2"), P("scales", "T1"), P("zero_points", "T3", param_option=Opt)],
            outputs=[P("Y", "T1")],
            type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], "activations and scales"),
                              ("T2", ["tensor(uint8)", "tensor(int32)"], "packed codes"),
                              ("T3", ["tensor(uint8)", "tensor(int32)", "tensor(float)", "tensor(float16)"],
                               "zero points")],
            attributes=[A("K", INT, "input features"), A("N", INT, "output features"), A("bits", INT, "bits per weight"),
                        A("block_size", INT, "weights per block along K"),
                        A("accuracy_level", INT, "minimum compute precision", required=False)]))
    if not onnx.defs.has("GatherBlockQuantized", "com.microsoft"):
        onnx.defs.register_schema(OpSchema(
            "GatherBlockQuantized", "com.microsoft", 1,
            doc="Gather of a blockwise-quantized table, dequantized (ONNX Runtime contrib op; uint8 data follows "
                "MatMulNBits' packing).",
            inputs=[P("data", "T1"), P("indices", "Tind"), P("scales", "T2"), P("zero_points", "T1", param_option=Opt)],
            outputs=[P("output", "T2")],
            type_constraints=[("T1", ["tensor(uint8)", "tensor(int4)", "tensor(uint4)"], "packed codes"),
                              ("T2", ["tensor(float)", "tensor(float16)"], "scales and output"),
                              ("Tind", ["tensor(int32)", "tensor(int64)"], "indices")],
            attributes=[A("gather_axis", INT, "axis gathered", required=False),
                        A("quantize_axis", INT, "axis quantized in blocks", required=False),
                        A("block_size", INT, "elements per block", required=False),
                        A("bits", INT, "bits per element", required=False)]))
    if not onnx.defs.has("GroupQueryAttention", "com.microsoft"):
        FLOAT = OpSchema.AttrType.FLOAT
        onnx.defs.register_schema(OpSchema(
            "GroupQueryAttention", "com.microsoft", 1,
            doc="Attention of grouped query heads over a KV cache that it extends by the step's keys and values "
                "(ONNX Runtime contrib op; the inputs llmc emits).",
            inputs=[P("query", "T"), P("key", "T", param_option=Opt), P("value", "T", param_option=Opt),
                    P("past_key", "T", param_option=Opt), P("past_value", "T", param_option=Opt),
                    P("seqlens_k", "M"), P("total_sequence_length", "M"), P("cos_cache", "T", param_option=Opt),
                    P("sin_cache", "T", param_option=Opt), P("position_ids", "I", param_option=Opt),
                    P("attention_bias", "T", param_option=Opt)],
            outputs=[P("output", "T"), P("present_key", "T"), P("present_value", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "activations and cache"),
                              ("M", ["tensor(int32)"], "sequence lengths"), ("I", ["tensor(int64)"], "positions")],
            attributes=[A("num_heads", INT, "query heads"), A("kv_num_heads", INT, "key/value heads"),
                        A("scale", FLOAT, "score scale", required=False),
                        A("do_rotary", INT, "rotate q and k inside", required=False),
                        A("local_window_size", INT, "left window", required=False)]))
    if not onnx.defs.has("VQLinear", "llmc"):
        onnx.defs.register_schema(OpSchema(
            "VQLinear", "llmc", 1,
            doc="y = x @ Wᵀ, W an additive vector quantization read from its codes at run time (llmc's custom-op "
                "library; layout in backends/onnxruntime/vq_linear_ort.c).",
            inputs=[P("x", "T"), P("codes", "T2"), P("codebooks", "T"), P("scales", "T"), P("codewords", "T")],
            outputs=[P("y", "T")],
            type_constraints=[("T", ["tensor(float)"], "activations, codewords, scales"),
                              ("T2", ["tensor(uint8)"], "codes [J*M, N]")]))
    if not onnx.defs.has("CQAttention", "llmc"):
        onnx.defs.register_schema(OpSchema(
            "CQAttention", "llmc", 1,
            doc="Attention of q over a CQ-coded KV cache read as codes, and this step's float tokens (llmc's "
                "custom-op library; layout in backends/onnxruntime/cq_ort.c).",
            inputs=[P("q", "T"), P("key_codes", "T2"), P("key_new", "T"), P("key_codebooks", "T"),
                    P("value_codes", "T2"), P("value_new", "T"), P("value_codebooks", "T"), P("cos", "T"),
                    P("signed_sin", "T"), P("bias", "T"), P("scale", "T")],
            outputs=[P("out", "T")],
            type_constraints=[("T", ["tensor(float)"], "queries, new tokens, codebooks, tables, mask, output"),
                              ("T2", ["tensor(uint8)"], "codes [B, H, P, G]")]))
    if not onnx.defs.has("CQCachedAttention", "llmc"):
        onnx.defs.register_schema(OpSchema(
            "CQCachedAttention", "llmc", 1,
            doc="CQAttention that also writes this step's codes into the cache it is given, with q_cos / "
                "q_signed_sin rotates q itself, and without key and value reads them from a packed q "
                "(llmc's custom-op library; layout in backends/onnxruntime/vq_linear_ort.c).",
            inputs=[P("q", "T"), P("key", "T", param_option=Opt), P("value", "T", param_option=Opt),
                    P("past_key_codes", "T2"),
                    P("past_value_codes", "T2"), P("key_codebooks", "T"), P("value_codebooks", "T"),
                    P("key_norms", "T"), P("value_norms", "T"), P("cos", "T"), P("signed_sin", "T"), P("bias", "T"),
                    P("scale", "T"), P("q_cos", "T", param_option=Opt), P("q_signed_sin", "T", param_option=Opt)],
            outputs=[P("out", "T"), P("present_key_codes", "T2"), P("present_value_codes", "T2")],
            type_constraints=[("T", ["tensor(float)"], "queries, keys, values, codebooks, tables, mask, output"),
                              ("T2", ["tensor(uint8)"], "codes [B, H, C, G]")],
            attributes=[A("rope_halves", INT, "1: the rows of cos repeat their first half and those of signed_sin "
                                              "negate their second, so the op reads half of each", required=False)]))
    if not onnx.defs.has("BinaryBasesLinear", "llmc"):
        onnx.defs.register_schema(OpSchema(
            "BinaryBasesLinear", "llmc", 1,
            doc="y = x @ Wᵀ, W a sum of scaled binary bases read from its packed signs (llmc's custom-op library; "
                "layout in backends/onnxruntime/binary_bases_ort.c).",
            inputs=[P("x", "T"), P("signs", "T2"), P("scales", "T"), P("outlier_index", "T3", param_option=Opt),
                    P("outlier_values", "T", param_option=Opt)], outputs=[P("y", "T")],
            type_constraints=[("T", ["tensor(float)"], "activations, scales [nb, N, G], outlier values [N, k]"),
                              ("T2", ["tensor(uint8)"], "signs [nb, N, K/8]"),
                              ("T3", ["tensor(int32)"], "outlier column indices [N, k]")]))
    if not onnx.defs.has("CQEncode", "llmc"):
        onnx.defs.register_schema(OpSchema(
            "CQEncode", "llmc", 1,
            doc="Nearest-centroid CQ codes of x (llmc's custom-op library; layout in backends/onnxruntime/cq_ort.c).",
            inputs=[P("x", "T"), P("codebooks_t", "T"), P("norms", "T")], outputs=[P("codes", "T2")],
            type_constraints=[("T", ["tensor(float)"], "x, codebooks_t [H, G, c, K], norms [H, G, K]"),
                              ("T2", ["tensor(uint8)"], "codes [B, H, S, G]")]))


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


def cq_attention_kernel(q, key_codes, key_new, key_codebooks, value_codes, value_new, value_codebooks, cos,
                        signed_sin, bias, scale):
    """llmc::cq_attention -> llmc.CQAttention, which reads the past from its codes and attends to this step's
    float tokens in the same softmax (backends/onnxruntime/cq_ort.c): one node where the standard lowering
    decodes the whole cache, concatenates, rotates every key and multiplies."""
    return LLMC.CQAttention(q, key_codes, key_new, key_codebooks, value_codes, value_new, value_codebooks, cos,
                            signed_sin, bias, op.Constant(value_floats=[scale]))


def _heads_last(x):
    """[B, heads, S, D] -> [B, S, heads * D] (the fused lowering's rules take the pair out where x comes from the
    same split)."""
    return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))


def cq_cached_attention_kernel(q, key, value, past_key_codes, past_value_codes, key_codebooks, value_codebooks, cos,
                               signed_sin, bias, scale, q_cos=None, q_signed_sin=None, rope_halves=False):
    """llmc::cq_cached_attention -> llmc.CQCachedAttention: CQAttention that also encodes the step's keys and values
    into the cache (cq_ort.c, vq_linear_ort.c), so one node per layer replaces the attention, two CQEncodes, the
    head splits and joins around them and the two concatenations of the cache; q goes in as [B, S, Hq * D]. The
    encoding reads the codebooks the attention reads (one copy); the centroids' squared norms come from the
    codebooks, initializers, so ONNX Runtime folds them at load. With q_cos / q_signed_sin (q before RoPE), the
    op rotates q itself. rope_halves (an attribute, 0 or 1): the key tables' rows are RoPE's halves, of which the op
    reads one."""
    def norms(books):
        return op.ReduceSumSquare(books, op.Constant(value_ints=[3]), keepdims=0)

    tables = () if q_cos is None else (q_cos, q_signed_sin)
    return LLMC.CQCachedAttention(_heads_last(q), key, value, past_key_codes, past_value_codes, key_codebooks,
                                  value_codebooks, norms(key_codebooks), norms(value_codebooks), cos, signed_sin, bias,
                                  op.Constant(value_floats=[scale]), *tables, rope_halves=int(bool(rope_halves)),
                                  _outputs=3)


def cq_encode_kernel(x, codebooks):
    """llmc::cq_encode -> llmc.CQEncode (one op instead of the standard lowering's dozen; the channel-major
    codebooks and the centroids' squared norms are computed from the codebooks, an initializer, so ONNX
    Runtime folds them at load). Codebooks of more than 256 centroids (int16 codes) take the standard
    lowering."""
    _, _, K, _ = _dims(codebooks, "codebooks")
    if K > 256:
        return cq_encode(x, codebooks)
    norms = op.ReduceSumSquare(codebooks, op.Constant(value_ints=[3]), keepdims=0)
    return LLMC.CQEncode(op.Cast(x, to=onnx.TensorProto.FLOAT), op.Transpose(codebooks, perm=[0, 1, 3, 2]), norms)


def cached_attention(q, key, value, past_key, past_value, bias, scale):
    """llmc::cached_attention -> one com.microsoft.GroupQueryAttention: the step's q/k/v as [B, S, heads*D], the
    past as it is (BNSH), every row's total length T = P + S (`seqlens_k` = T - 1: left padding counts as
    tokens, hidden by the mask) and `bias` [B, S, T] as attention_bias [B, 1, S, T]. Causality is also in the
    bias, so the op's own causal mask (query i sees keys up to P + i) changes nothing. Returns the output
    [B, S, H*D] and the present cache. ONNX Runtime's CPU kernel refuses a step of more than one token after a
    past at batch > 1; OrtModel runs such steps one row at a time."""
    H, Hkv = q.shape[1], key.shape[1]
    if not (isinstance(H, int) and isinstance(Hkv, int)):
        raise TypeError(f"GroupQueryAttention needs static head counts, got q {q.shape} and key {key.shape}")

    total = op.Shape(bias, start=2, end=3)  # [T]
    seqlens = op.Cast(op.Expand(op.Sub(total, op.Constant(value_ints=[1])), op.Shape(bias, start=0, end=1)),
                      to=onnx.TensorProto.INT32)
    total_length = op.Cast(op.Squeeze(total), to=onnx.TensorProto.INT32)
    out, present_key, present_value = MSFT.GroupQueryAttention(
        _heads_last(q), _heads_last(key), _heads_last(value), past_key, past_value, seqlens, total_length, None, None,
        None, op.Unsqueeze(bias, op.Constant(value_ints=[1])), num_heads=H, kv_num_heads=Hkv, scale=scale,
        _outputs=3)
    return out, present_key, present_value


def _int32(values) -> object:
    return op.Constant(value=onnx.numpy_helper.from_array(np.asarray(values, dtype=np.int32)))


def _widen_3bit(packed, lead: list[int], n_values: int):
    """uint8 [*lead, m] holding 3-bit values as a bit stream (8 values per 3 bytes, llmc.ops.nbits_linear)
    -> uint8 [*lead, n_values / 2] holding the first n_values as 4-bit values, two per byte (MatMulNBits').

    Integer arithmetic on initializers only, so ONNX Runtime folds it when the session loads: the file
    keeps 3 bits per weight, the session runs the 4-bit kernel."""
    m = _dims(packed, "packed 3-bit codes")[-1]
    chunks = m // 3
    b = op.Cast(op.Reshape(packed, op.Constant(value_ints=[*lead, chunks, 3])), to=onnx.TensorProto.INT32)
    stream = op.ReduceSum(op.Mul(b, _int32([1, 1 << 8, 1 << 16])), op.Constant(value_ints=[-1]), keepdims=1)
    q = op.Mod(op.Div(stream, _int32([8 ** i for i in range(8)])), _int32([8]))  # [*lead, chunks, 8]
    q = op.Reshape(q, op.Constant(value_ints=[*lead, chunks * 8]))
    if n_values < chunks * 8:
        q = op.Slice(q, op.Constant(value_ints=[0]), op.Constant(value_ints=[n_values]), op.Constant(value_ints=[-1]))
    pairs = op.Reshape(q, op.Constant(value_ints=[*lead, n_values // 2, 2]))
    byte = op.ReduceSum(op.Mul(pairs, _int32([1, 16])), op.Constant(value_ints=[-1]), keepdims=0)
    return op.Cast(byte, to=onnx.TensorProto.UINT8)


def _ort_codes(codes, zero_points, bits: int):
    """The codes and zero points in a width MatMulNBits / GatherBlockQuantized run (3 bits widen to 4)."""
    if bits != 3:
        return codes, zero_points
    N, n_blocks, blob = _dims(codes, "codes")
    codes = _widen_3bit(codes, [N, n_blocks], blob * 8 // 3)
    return codes, _widen_3bit(zero_points, [N], -(-n_blocks // 2) * 2)


def nbits_linear(x, codes, scales, zero_points, K: int, N: int, bits: int, block_size: int, int8_act: bool = False):
    """llmc::nbits_linear -> com.microsoft::MatMulNBits (the torch buffers are already in its layout;
    3-bit codes are widened to 4-bit ones by constant arithmetic, `_widen_3bit`).

    `int8_act` is `accuracy_level=4`: ONNX Runtime rounds the input to int8 per block and takes
    integer dot products, the numerics the torch op reproduces (llmc.ops.nbits_linear)."""
    codes, zero_points = _ort_codes(codes, zero_points, bits)
    return MSFT.MatMulNBits(x, codes, scales, zero_points, K=K, N=N, bits=ort_bits(bits), block_size=block_size,
                            accuracy_level=4 if int8_act else 0)


def nbits_embedding(ids, codes, scales, zero_points, K: int, bits: int, block_size: int):
    """llmc::nbits_embedding -> com.microsoft::GatherBlockQuantized over the same packed codes.

    MatMulNBits' [N, K/block, block*bits/8] codes are read as the [N, K*bits/8] table the gather
    expects (a Reshape: a tied lm_head and the embedding share one initializer in the file)."""
    codes, zero_points = _ort_codes(codes, zero_points, bits)
    N, n_blocks, blob = _dims(codes, "codes")
    table = op.Reshape(codes, op.Constant(value_ints=[N, n_blocks * blob]))
    rows = MSFT.GatherBlockQuantized(table, ids, scales, zero_points, gather_axis=0, quantize_axis=1,
                                     block_size=block_size, bits=ort_bits(bits))
    if n_blocks * block_size != K:  # the last block was padded
        rows = op.Slice(rows, op.Constant(value_ints=[0]), op.Constant(value_ints=[K]), op.Constant(value_ints=[-1]))
    return rows


def vq_linear(x, codes, codebooks, scales):
    """llmc::vq_linear -> dequantize (one Gather of codewords, ReduceSum over codebooks, Mul scales), MatMul.

    The portable lowering (standard ONNX only: vq_lowering="dequantize"); `vq_linear_kernel` is the
    one that keeps the codes in the session.

    codes [N, J, M] become int64 rows code + m*2^B of the [M*2^B, g] codeword table; the gathered
    [N, J, M, g] sum over the codebooks to W [N, J*g]. Every input of the dequantization is an
    initializer: the codes stay uint8 (int16 above 8 bits) in the file, and ONNX Runtime folds W
    into a float initializer when it loads the session, so decoding runs one MatMul per layer, at
    the speed (and the session memory) of a float32 layer. Caveat: torch.onnx's optimizer folds
    constant subgraphs whose inputs have at most 8192 elements (onnxscript's default), so a layer
    with that few codes reaches the file already dequantized; SmolLM2's smallest has 13824 (1x8).

    Chosen over lookup-table graphs of standard ops by timing them in ORT 1.31 (benchmarks/vq_linear.py --ort;
    1536x576 layer, 2x8 g8, 1 token, medians in us at 1 / 2 threads; "cold": a ring of such
    layers larger than the L3, as in a decode):
        this graph (folded to a MatMul)                          hot  94 /  77   cold 122 / 113
        float32 MatMul, for reference                            hot 105 /  79   cold 131 / 113
        table: MatMul(x groups, codewords), Gather, ReduceSum    hot 632 / 414   cold 690 / 447
        table with GatherElements (index expanded over tokens)   hot 414 / 276   cold 842 / 325
    The table graphs' indices (codes + offsets) are folded too, to int32: 4x the codes' bytes.
    """
    M, C, _, g = _dims(codebooks, "codebooks")
    N, J, _ = _dims(codes, "codes")
    table = op.Reshape(codebooks, op.Constant(value_ints=[M * C, g]))
    code = op.Cast(codes, to=onnx.TensorProto.INT64)
    if codes.dtype == onnx.TensorProto.INT16:  # 16-bit codes are stored wrapped (llmc.ops.vq.store_codes)
        code = op.BitwiseAnd(code, op.Constant(value_int=0xFFFF))
    rows = op.Add(code, op.Constant(value=onnx.numpy_helper.from_array(np.arange(M, dtype=np.int64) * C)))
    w = op.ReduceSum(op.Gather(table, rows, axis=0), op.Constant(value_ints=[2]), keepdims=0)  # [N, J, g]
    w = op.Mul(op.Reshape(w, op.Constant(value_ints=[N, J * g])), op.Reshape(scales, op.Constant(value_ints=[N, 1])))
    return op.MatMul(x, op.Transpose(op.CastLike(w, x), perm=[1, 0]))


def vq_linear_kernel(x, codes, codebooks, scales):
    """llmc::vq_linear -> llmc.VQLinear, the custom op that reads the uint8 codes at run time.

    The codes [N, J, M] go in as [J*M, N] and the codebooks [M, 2^B, 1, g] as [M, g, 2^B] for the
    lookup tables and [M, 2^B, g] for dequantizing (the kernel's layouts); these reshapes and
    transposes have initializer inputs only, so ONNX Runtime folds them when it loads the session,
    and the codes stay uint8 there too. Needs the library of
    `custom_ops.library_path()` registered in the session (OrtModel does it for an export that
    names it). Codes above 8 bits (int16) take the dequantize lowering.
    """
    if codes.dtype != onnx.TensorProto.UINT8:
        return vq_linear(x, codes, codebooks, scales)
    M, C, _, g = _dims(codebooks, "codebooks")
    N, J, _ = _dims(codes, "codes")
    rows = op.Transpose(op.Reshape(codes, op.Constant(value_ints=[N, J * M])), perm=[1, 0])
    words = op.Cast(op.Reshape(codebooks, op.Constant(value_ints=[M, C, g])), to=onnx.TensorProto.FLOAT)
    scales = op.Cast(op.Reshape(scales, op.Constant(value_ints=[N])), to=onnx.TensorProto.FLOAT)
    y = LLMC.VQLinear(op.Cast(x, to=onnx.TensorProto.FLOAT), rows, op.Transpose(words, perm=[0, 2, 1]), scales, words)
    return op.CastLike(y, x)


def _binary_bases_weight(signs, scales):
    """W [N, K] float from packed signs [nb, N, K/8] and scales [nb, N, G] (llmc.ops.binary_bases), standard ops
    on initializers only (ONNX Runtime folds them into a float weight when it loads the session)."""
    nb, N, J = _dims(signs, "signs")
    _, _, G = _dims(scales, "scales")
    K = J * 8
    shifts = op.Constant(value=onnx.numpy_helper.from_array(np.arange(8, dtype=np.uint8)))
    bits = op.BitwiseAnd(op.BitShift(op.Unsqueeze(signs, op.Constant(value_ints=[3])), shifts, direction="RIGHT"),
                         op.Constant(value=onnx.numpy_helper.from_array(np.array(1, dtype=np.uint8))))
    pm = op.Sub(op.Mul(op.Cast(bits, to=onnx.TensorProto.FLOAT), op.Constant(value_float=2.0)),
                op.Constant(value_float=1.0))  # [nb, N, J, 8] of ±1
    pm = op.Reshape(pm, op.Constant(value_ints=[nb, N, G, K // G]))
    w = op.ReduceSum(op.Mul(pm, op.Unsqueeze(op.Cast(scales, to=onnx.TensorProto.FLOAT), op.Constant(value_ints=[3]))),
                     op.Constant(value_ints=[0]), keepdims=0)
    return op.Reshape(w, op.Constant(value_ints=[N, K]))


def binary_bases_linear(x, signs, scales):
    """llmc::binary_bases_linear -> unpack the signs (BitShift, BitwiseAnd), scale, sum the bases, MatMul.

    The portable lowering (standard ONNX only): the signs stay packed in the file, and ONNX Runtime
    folds the unpacking into a float32 weight when it loads the session. `binary_bases_linear_kernel`
    keeps them packed in the session."""
    w = _binary_bases_weight(signs, scales)
    return op.MatMul(x, op.Transpose(op.CastLike(w, x), perm=[1, 0]))


def _sign_patterns() -> np.ndarray:
    """[8, 256] float32: column p is the ±1 vector of the bits of p, low bit first (llmc.ops.binary_bases)."""
    p = np.arange(256)
    return (2 * ((p[None, :] >> np.arange(8)[:, None]) & 1) - 1).astype(np.float32)


def _sign_codebooks():
    """The one codebook of every basis for llmc.VQLinear: its [1, 8, 256] and [1, 256, 8] layouts."""
    pat = _sign_patterns()
    return (op.Constant(value=onnx.numpy_helper.from_array(pat[None])),
            op.Constant(value=onnx.numpy_helper.from_array(np.ascontiguousarray(pat.T)[None])))


def binary_bases_linear_kernel(x, signs, scales):
    """llmc::binary_bases_linear -> llmc.BinaryBasesLinear, which reads the packed signs as the masks of AVX-512
    masked multiply-adds (backends/onnxruntime/binary_bases_ort.c); any scale groups. The session holds the
    uint8 signs as they are in the file, 1 bit per weight and basis."""
    y = LLMC.BinaryBasesLinear(op.Cast(x, to=onnx.TensorProto.FLOAT), signs,
                               op.Cast(scales, to=onnx.TensorProto.FLOAT))
    return op.CastLike(y, x)


def binary_bases_linear_outliers_kernel(x, signs, scales, outlier_index, outlier_values):
    """llmc::binary_bases_linear_outliers -> llmc.BinaryBasesLinear with the outliers' column indices (int32) and
    values (float32) as inputs 3 and 4, added in the op (casts of initializers, folded at load)."""
    y = LLMC.BinaryBasesLinear(op.Cast(x, to=onnx.TensorProto.FLOAT), signs,
                               op.Cast(scales, to=onnx.TensorProto.FLOAT),
                               op.Cast(outlier_index, to=onnx.TensorProto.INT32),
                               op.Cast(outlier_values, to=onnx.TensorProto.FLOAT))
    return op.CastLike(y, x)


def binary_bases_linear_stacked(x, signs, scales):
    """llmc::binary_bases_linear -> one llmc.VQLinear over the bases stacked as rows, then a sum over the bases
    (the kernel lowering before llmc.BinaryBasesLinear, kept for `benchmarks/qbb_quant.py --layer`).

    A basis is an additive code with one fixed codebook, the 256 sign patterns of 8 inputs (g = 8), its
    byte of signs per 8 inputs the code and its row scales the VQLinear scales. All bases share that
    codebook, so basis i of row n is row i·N + n of one VQLinear with nb·N rows: the kernel builds the
    token's tables (the 256 signed sums of every 8 inputs) once for all bases, and y = Σ_i of the
    [..., nb, N] output. The signs' reshape and transpose to the kernel's [K/8, nb·N] have initializer
    inputs only, so ONNX Runtime folds them at load and the session holds uint8 signs, 1 bit per weight
    and basis. Scales per group of inputs are not a VQLinear layout: those layers take the standard
    lowering."""
    nb, N, J = _dims(signs, "signs")
    _, _, G = _dims(scales, "scales")
    if G != 1:
        return binary_bases_linear(x, signs, scales)
    codebooks, codewords = _sign_codebooks()
    codes = op.Transpose(op.Reshape(signs, op.Constant(value_ints=[nb * N, J])), perm=[1, 0])
    s = op.Cast(op.Reshape(scales, op.Constant(value_ints=[nb * N])), to=onnx.TensorProto.FLOAT)
    y = LLMC.VQLinear(op.Cast(x, to=onnx.TensorProto.FLOAT), codes, codebooks, s, codewords)  # [..., nb * N]
    y = op.Reshape(y, op.Concat(op.Shape(x, end=-1), op.Constant(value_ints=[nb, N]), axis=0))
    return op.CastLike(op.ReduceSum(y, op.Constant(value_ints=[-2]), keepdims=0), x)


def binary_bases_linear_per_basis(x, signs, scales):
    """llmc::binary_bases_linear -> one llmc.VQLinear per basis, summed (each call builds its own tables): the
    lowering `binary_bases_linear_kernel` replaced, kept for benchmarks/qbb_quant.py --layer to compare."""
    nb, N, J = _dims(signs, "signs")
    _, _, G = _dims(scales, "scales")
    if G != 1:
        return binary_bases_linear(x, signs, scales)
    codebooks, codewords = _sign_codebooks()
    xf = op.Cast(x, to=onnx.TensorProto.FLOAT)
    y = None
    for i in range(nb):  # a few bases (<= 8): one kernel call each
        codes = op.Transpose(op.Reshape(op.Slice(signs, op.Constant(value_ints=[i]), op.Constant(value_ints=[i + 1]),
                                                 op.Constant(value_ints=[0])), op.Constant(value_ints=[N, J])),
                             perm=[1, 0])
        s = op.Cast(op.Reshape(op.Slice(scales, op.Constant(value_ints=[i]), op.Constant(value_ints=[i + 1]),
                                        op.Constant(value_ints=[0])), op.Constant(value_ints=[N])),
                    to=onnx.TensorProto.FLOAT)
        yi = LLMC.VQLinear(xf, codes, codebooks, s, codewords)
        y = yi if y is None else op.Add(y, yi)
    return op.CastLike(y, x)


register_contrib_schemas()

VQ_LOWERINGS = ("kernel", "dequantize")


def translations(vq_lowering: str = "dequantize") -> dict:
    """The translation table with `llmc::vq_linear` lowered to `VQ_LOWERINGS[i]`: "kernel" (llmc.VQLinear,
    codes read at run time; needs llmc's custom-op library) or "dequantize" (standard ONNX, folded by
    ONNX Runtime into a float weight at load)."""
    if vq_lowering not in VQ_LOWERINGS:
        raise ValueError(f"vq_lowering must be one of {VQ_LOWERINGS}, got {vq_lowering!r}")
    table = dict(TRANSLATIONS)
    if vq_lowering == "kernel":
        table[torch.ops.llmc.vq_linear.default] = vq_linear_kernel
        table[torch.ops.llmc.binary_bases_linear.default] = binary_bases_linear_kernel
        table[torch.ops.llmc.binary_bases_linear_outliers.default] = binary_bases_linear_outliers_kernel
        table[torch.ops.llmc.cq_attention.default] = cq_attention_kernel
        table[torch.ops.llmc.cq_encode.default] = cq_encode_kernel
        table[torch.ops.llmc.cq_cached_attention.default] = cq_cached_attention_kernel
    return table


# op overload -> translation function (the portable table: standard ONNX and ONNX Runtime contrib ops).
TRANSLATIONS: dict = {
    torch.ops.llmc.nbits_linear.default: nbits_linear,
    torch.ops.llmc.nbits_embedding.default: nbits_embedding,
    torch.ops.llmc.cq_encode.default: cq_encode,
    torch.ops.llmc.cq_decode.default: cq_decode,
    torch.ops.llmc.vq_linear.default: vq_linear,
    torch.ops.llmc.binary_bases_linear.default: binary_bases_linear,
    torch.ops.llmc.cached_attention.default: cached_attention,
}
