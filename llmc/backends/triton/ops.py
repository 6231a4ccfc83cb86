"""`llmc_triton::*`: llmc's custom ops with Triton kernels, opaque to `torch.compile`.

Each op has the signature and the results of its `llmc::*` counterpart (llmc.ops) and runs the
kernels of `llmc.backends.triton.kernels`: compiled Triton on CUDA tensors, Triton's interpreter on
CPU tensors (which needs TRITON_INTERPRET=1). A Triton folder's graph calls these ops in place of
the reference ones (`rewrite_graph`); `torch.compile` treats each as one call (its fake
implementation gives the output shapes), so Inductor fuses everything around the kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

import llmc.ops  # noqa: F401  (registers llmc::*: the reference ops the rewrite replaces)


def _k():
    from llmc.backends.triton import kernels

    return kernels


@torch.library.custom_op("llmc_triton::nbits_linear", mutates_args=())
def nbits_linear(x: Tensor, codes: Tensor, scales: Tensor, zero_points: Tensor, K: int, N: int, bits: int,
                 block_size: int, int8_act: bool = False) -> Tensor:
    """llmc::nbits_linear through the nbits GEMV / dequantize-GEMM kernels."""
    if int8_act:  # the activation rounding of MatMulNBits accuracy_level=4, then the same kernels
        from llmc.ops.nbits_linear import quantize_activations_int8

        x = quantize_activations_int8(x, K, block_size)
    return _k().nbits_linear(x, codes, scales, zero_points, K, N, bits, block_size)


@nbits_linear.register_fake
def _(x, codes, scales, zero_points, K, N, bits, block_size, int8_act=False):
    return x.new_empty(*x.shape[:-1], N)


@torch.library.custom_op("llmc_triton::nbits_embedding", mutates_args=())
def nbits_embedding(ids: Tensor, codes: Tensor, scales: Tensor, zero_points: Tensor, K: int, bits: int,
                    block_size: int) -> Tensor:
    """llmc::nbits_embedding through the row-dequantize kernel."""
    return _k().nbits_embedding(ids, codes, scales, zero_points, K, bits, block_size)


@nbits_embedding.register_fake
def _(ids, codes, scales, zero_points, K, bits, block_size):
    return scales.new_empty(*ids.shape, K)


@torch.library.custom_op("llmc_triton::vq_linear", mutates_args=())
def vq_linear(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor) -> Tensor:
    """llmc::vq_linear through the codebook-lookup GEMV / GEMM kernels."""
    return _k().vq_linear(x, codes, codebooks, scales)


@vq_linear.register_fake
def _(x, codes, codebooks, scales):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


@torch.library.custom_op("llmc_triton::binary_bases_linear", mutates_args=())
def binary_bases_linear(x: Tensor, signs: Tensor, scales: Tensor) -> Tensor:
    """llmc::binary_bases_linear through the sign-bit GEMV / GEMM kernels."""
    return _k().binary_bases_linear(x, signs, scales)


@binary_bases_linear.register_fake
def _(x, signs, scales):
    return x.new_empty(*x.shape[:-1], signs.shape[1])


@torch.library.custom_op("llmc_triton::cq_encode", mutates_args=())
def cq_encode(x: Tensor, codebooks: Tensor) -> Tensor:
    """llmc::cq_encode through the nearest-centroid kernel (the reference op past 256 centroids)."""
    if codebooks.shape[2] > _k().CQ_MAX_CENTROIDS:
        return torch.ops.llmc.cq_encode(x, codebooks)
    return _k().cq_encode(x, codebooks)


@cq_encode.register_fake
def _(x, codebooks):
    from llmc.ops.cq import code_bits, code_dtype

    H, G, K, c = codebooks.shape
    return x.new_empty(*x.shape[:-1], G, dtype=code_dtype(code_bits(K)))


@torch.library.custom_op("llmc_triton::cq_decode", mutates_args=())
def cq_decode(codes: Tensor, codebooks: Tensor) -> Tensor:
    """llmc::cq_decode through the centroid-gather kernel."""
    return _k().cq_decode(codes, codebooks)


@cq_decode.register_fake
def _(codes, codebooks):
    H, G, K, c = codebooks.shape
    return codebooks.new_empty(*codes.shape[:-1], G * c)


@torch.library.custom_op("llmc_triton::kivi_append", mutates_args=())
def kivi_append(past: Tensor, new: Tensor, bits: int, group: int, value_group: int, residual: int,
                keys: bool) -> Tensor:
    """llmc::kivi_append with the entries leaving the float tail quantized by the kernel."""
    return _k().kivi_append(past, new, bits, group, value_group, residual, keys)


@kivi_append.register_fake
def _(past, new, bits, group, value_group, residual, keys):
    B, H, _, D = past.shape
    return past.new_empty(B, H, past.shape[2] + new.shape[2], D)


# llmc op -> (its Triton op, the kernels it runs)
LOWERING = {
    "nbits_linear": ("nbits_linear", ["nbits_gemv_packed", "nbits_gemv", "nbits_gemm"]),
    "nbits_embedding": ("nbits_embedding", ["nbits_embedding"]),
    "vq_linear": ("vq_linear", ["vq_gemv_grouped", "vq_gemv", "vq_gemm"]),
    "binary_bases_linear": ("binary_bases_linear", ["binary_bases_gemv", "binary_bases_gemm"]),
    "cq_encode": ("cq_encode", ["cq_encode"]),
    "cq_decode": ("cq_decode", ["cq_decode"]),
    "kivi_append": ("kivi_append", ["kivi_fake_quant"]),
}


def llmc_op(node) -> str | None:
    """The llmc op name a graph node calls (`nbits_linear` for torch.ops.llmc.nbits_linear.default), else None."""
    target = getattr(node, "target", None)
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    return target._schema.name.split("::", 1)[1] if target.namespace == "llmc" else None


def unsupported_ops(gm) -> list[str]:
    """llmc ops in the graph that have no Triton kernel (sorted, each once)."""
    return sorted({op for n in gm.graph.nodes if (op := llmc_op(n)) and op not in LOWERING})


def rewrite_graph(gm) -> dict:
    """Point every llmc op node of `gm` at its Triton op (in place); returns {llmc op: count}."""
    counts: dict = {}
    for node in gm.graph.nodes:
        op = llmc_op(node)
        if op in LOWERING:
            node.target = getattr(torch.ops.llmc_triton, LOWERING[op][0]).default
            counts[op] = counts.get(op, 0) + 1
    gm.recompile()
    return counts
