"""Micro-benchmark of `llmc::vq_linear` at decode sizes, on SmolLM2-135M's linear shapes (random codes).

    python -m benchmarks.vq_linear [--rounds 200] [--threads 1 2] [--tokens 1] [--cold-mib 64] [--ort]   # repo root

Per shape (N x K: 576x576, 192x576, 1536x576, 576x1536), configuration (M codebooks x B bits, groups
of g: 1x8, 2x8, 3x8, g=8), thread count and token count, medians in microseconds over interleaved
rounds (each round calls every method once, in a shuffled order, so that drifts in machine load
hit them alike; 10th percentiles beside them) of:
  dense      `F.linear` with a float32 weight [N, K]: the unquantized layer
  lut        `llmc.ops.vq_kernels.lut_linear`: the op's path at <= 4 tokens on CPU
  op         `torch.ops.llmc.vq_linear`: the same plus the custom-op dispatch
  reference  `F.linear(x, dequantize(...))`: the op's path for more tokens
"hot": one layer called again and again, its weight stays in the CPU caches (the L3 for the small
layers; the other methods of a round evict a 1536x576 float32 weight at least partly). "cold": a ring of
distinct layers holding --cold-mib MiB per method (more than the L3), so that each call reads its
weight from DRAM, as in a real decode, where the whole model passes between two uses of a layer.
With --ort, the ONNX formulations of one 1536x576 2x8 g8 layer in ONNX Runtime, at 1 token: the
dequantize lowering (ORT folds it into a float MatMul at session load), two lookup-table graphs of
standard ops, and the kernel lowering (llmc's custom op `llmc.VQLinear`, where a C compiler can
build it), with a float32 MatMul for reference.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import peak_rss_mb, write_result
from llmc.ops import vq_kernels
from llmc.ops.vq import bits_per_weight, dequantize

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down (N out, K in)
CONFIGS = [(1, 8, 8), (2, 8, 8), (3, 8, 8)]  # (M codebooks, B bits, g)


class Ring:
    """`count` distinct random layers of one shape in contiguous buffers; `next()` cycles through them."""

    def __init__(self, N, K, M, B, g, count, gen):
        J, C = K // g, 1 << B
        self.codes = torch.randint(0, C, (count, N, J, M), generator=gen, dtype=torch.uint8)
        self.codebooks = torch.randn(count, M, C, 1, g, generator=gen) / M ** 0.5
        self.scales = 0.02 + 0.01 * torch.rand(count, N, 1, 1, 1, generator=gen)
        self.count, self.i = count, -1

    def layer(self, i):
        return self.codes[i], self.codebooks[i], self.scales[i]

    def next(self):
        self.i = (self.i + 1) % self.count
        return self.layer(self.i)


def ring_size(layer_bytes: int, cold_bytes: int) -> int:
    return max(2, -(-cold_bytes // layer_bytes))


def time_rounds(methods: dict, rounds: int) -> tuple[dict, dict]:
    """Microseconds per call of each method over `rounds` rounds that each call every method once, in
    a shuffled order (what a call leaves in the caches and the allocator then favours no method):
    medians, and 10th percentiles (close to the cost on an idle machine when other jobs share the CPU)."""
    times = {k: [] for k in methods}
    for fn in methods.values():  # warm-up (compiles the kernel, faults the buffers in)
        fn()
    order, rng = list(methods), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - t0)
    median = {k: round(statistics.median(v) * 1e6, 1) for k, v in times.items()}
    p10 = {k: round(statistics.quantiles(v, n=10)[0] * 1e6, 1) for k, v in times.items()}
    return median, p10


def torch_rows(args) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    cold = args.cold_mib << 20
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for tokens in args.tokens:
            for N, K in SHAPES:
                x = torch.randn(tokens, K, generator=gen)
                dense = torch.randn(ring_size(N * K * 4, cold), N, K, generator=gen) * 0.02
                dense_i = [0]

                def dense_cold():
                    dense_i[0] = (dense_i[0] + 1) % len(dense)
                    F.linear(x, dense[dense_i[0]])

                for M, B, g in CONFIGS:
                    layer_bytes = N * K // g * M + M * (1 << B) * g * 4 + N * 4
                    ring = Ring(N, K, M, B, g, ring_size(layer_bytes, cold), gen)
                    hot = ring.layer(0)
                    torch.testing.assert_close(vq_kernels.lut_linear(x, *hot), F.linear(x, dequantize(*hot)),
                                               rtol=1e-4, atol=1e-4)
                    us, us_p10 = time_rounds({
                        "dense_hot": lambda: F.linear(x, dense[0]),
                        "dense_cold": dense_cold,
                        "lut_hot": lambda: vq_kernels.lut_linear(x, *hot),
                        "lut_cold": lambda: vq_kernels.lut_linear(x, *ring.next()),
                        "op_cold": lambda: torch.ops.llmc.vq_linear(x, *ring.next()),
                        "reference_cold": lambda: F.linear(x, dequantize(*ring.next())),
                    }, args.rounds)
                    row = {"method": f"vq_linear {M}x{B} g{g}, {N}x{K}, {tokens} token(s), {threads} thread(s)",
                           "shape": [N, K], "config": f"{M}x{B} g{g}", "tokens": tokens, "threads": threads,
                           "bits_per_weight": round(bits_per_weight(N, K, M, B, g), 3), "us": us, "us_p10": us_p10,
                           "lut_speedup_vs_dense": {"cold": round(us["dense_cold"] / us["lut_cold"], 2),
                                                    "hot": round(us["dense_hot"] / us["lut_hot"], 2)},
                           "ring_layers": {"dense": len(dense), "vq": ring.count}, "rounds": args.rounds}
                    rows.append(row)
                    print(row["method"], us, "p10", us_p10, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# ONNX Runtime: the lowering's formulation against lookup-table ones


def _lut_gather(x, codes, codebooks, scales):
    """Lookup table, any number of tokens: MatMul of x's groups with the codewords -> table [T, J*M*2^B],
    Gather of rows code + (j*M + m)*2^B (int32), ReduceSum over (j, m), Mul scales."""
    import numpy as np
    import onnx
    from onnxscript import opset18 as op

    from llmc.backends.onnxruntime.translations import _dims

    M, C, _, g = _dims(codebooks, "codebooks")
    N, J, _ = _dims(codes, "codes")
    words = op.Transpose(op.Reshape(codebooks, op.Constant(value_ints=[M * C, g])), perm=[1, 0])
    table = op.MatMul(op.Reshape(x, op.Constant(value_ints=[-1, J, g])), words)  # [T, J, M*C]
    table = op.Reshape(table, op.Constant(value_ints=[-1, J * M * C]))
    offsets = (np.arange(J * M, dtype=np.int32) * C).reshape(J, M)
    rows = op.Add(op.Cast(codes, to=onnx.TensorProto.INT32), op.Constant(value=onnx.numpy_helper.from_array(offsets)))
    y = op.ReduceSum(op.Gather(table, rows, axis=1), op.Constant(value_ints=[2, 3]), keepdims=0)  # [T, N]
    y = op.Mul(y, op.Reshape(scales, op.Constant(value_ints=[N])))
    lead = op.Slice(op.Shape(x), op.Constant(value_ints=[0]), op.Constant(value_ints=[-1]))
    return op.Reshape(y, op.Concat(lead, op.Constant(value_ints=[N]), axis=0))


def _lut_gather_elements(x, codes, codebooks, scales):
    """Lookup table with GatherElements over a [T, J*M, 2^B] table and codes laid out [J*M, N]
    (expanded over the T tokens: meant for decode)."""
    import onnx
    from onnxscript import opset18 as op

    from llmc.backends.onnxruntime.translations import _dims

    M, C, _, g = _dims(codebooks, "codebooks")
    N, J, _ = _dims(codes, "codes")
    words = op.Transpose(op.Reshape(codebooks, op.Constant(value_ints=[M * C, g])), perm=[1, 0])
    table = op.MatMul(op.Reshape(x, op.Constant(value_ints=[-1, J, g])), words)  # [T, J, M*C]
    table = op.Reshape(table, op.Constant(value_ints=[-1, J * M, C]))
    index = op.Reshape(op.Transpose(op.Cast(codes, to=onnx.TensorProto.INT32), perm=[1, 2, 0]),
                       op.Constant(value_ints=[1, J * M, N]))
    tokens = op.Slice(op.Shape(table), op.Constant(value_ints=[0]), op.Constant(value_ints=[1]))
    index = op.Expand(index, op.Concat(tokens, op.Constant(value_ints=[J * M, N]), axis=0))
    y = op.ReduceSum(op.GatherElements(table, index, axis=2), op.Constant(value_ints=[1]), keepdims=0)
    y = op.Mul(y, op.Reshape(scales, op.Constant(value_ints=[N])))
    lead = op.Slice(op.Shape(x), op.Constant(value_ints=[0]), op.Constant(value_ints=[-1]))
    return op.Reshape(y, op.Concat(lead, op.Constant(value_ints=[N]), axis=0))


class _Linear(torch.nn.Module):
    def __init__(self, *tensors, vq=True):
        super().__init__()
        self.vq = vq
        for name, t in zip(("codes", "codebooks", "scales") if vq else ("weight",), tensors):
            self.register_buffer(name, t)

    def forward(self, x):
        if self.vq:
            return torch.ops.llmc.vq_linear(x, self.codes, self.codebooks, self.scales)
        return F.linear(x, self.weight)


def _export(module, K: int, translation=None) -> bytes:
    from llmc.backends.onnxruntime import TRANSLATIONS

    table = dict(TRANSLATIONS)
    if translation is not None:
        table[torch.ops.llmc.vq_linear.default] = translation
    dyn = torch.export.Dim.DYNAMIC
    program = torch.onnx.export(module.eval(), (torch.randn(2, 3, K),), dynamo=True, dynamic_shapes=({0: dyn, 1: dyn},),
                                custom_translation_table=table, verbose=False)
    return program.model_proto.SerializeToString()


def _with_initializer(model_bytes: bytes, name: str, value) -> bytes:
    """The model with initializer `name` replaced (a distinct layer of the same graph)."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(value.numpy(), name))
    return model.SerializeToString()


def ort_rows(args) -> list[dict]:
    import onnxruntime as ort

    from llmc.backends.onnxruntime import custom_ops
    from llmc.backends.onnxruntime.translations import vq_linear_kernel

    N, K, (M, B, g) = 1536, 576, CONFIGS[1]
    gen = torch.Generator().manual_seed(1)
    codes, codebooks, scales = Ring(N, K, M, B, g, 1, gen).layer(0)
    weight = dequantize(codes, codebooks, scales)
    graphs = {  # name -> (model, the initializer that differs between layers, bytes a session holds per layer)
        "dense float32 MatMul": (_export(_Linear(weight, vq=False), K), "weight", N * K * 4),
        "dequantize-then-MatMul (the dequantize lowering)": (_export(_Linear(codes, codebooks, scales), K), "codes",
                                                  N * K * 4),
        "LUT: MatMul table, Gather, ReduceSum": (_export(_Linear(codes, codebooks, scales), K, _lut_gather),
                                                 "codes", codes.numel() * 4),
        "LUT: MatMul table, GatherElements, ReduceSum": (
            _export(_Linear(codes, codebooks, scales), K, _lut_gather_elements), "codes", codes.numel() * 4),
    }
    if custom_ops.available():  # the kernel lowering: llmc.VQLinear, uint8 codes read at run time
        graphs["llmc.VQLinear custom op (the kernel lowering)"] = (
            _export(_Linear(codes, codebooks, scales), K, vq_linear_kernel), "codes", codes.numel())
    draw = {"weight": lambda: torch.randn(N, K, generator=gen),
            "codes": lambda: torch.randint(0, 256, codes.shape, generator=gen, dtype=torch.uint8)}
    x = torch.randn(1, 1, K, generator=gen)
    expected = F.linear(x, weight)
    rows = []
    for threads in args.threads:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # ~100 sessions: no spinning pools
        if custom_ops.available():
            opts.register_custom_ops_library(custom_ops.library_path())
        hot, rings = {}, {}
        for name, (model, init, resident) in graphs.items():
            hot[name] = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
            y = hot[name].run(None, {hot[name].get_inputs()[0].name: x.numpy()})[0]
            torch.testing.assert_close(torch.from_numpy(y), expected, rtol=1e-4, atol=1e-4)  # the same layer
            count = ring_size(resident, args.cold_mib << 20)
            rings[name] = [ort.InferenceSession(_with_initializer(model, init, draw[init]()), opts,
                                                providers=["CPUExecutionProvider"]) for _ in range(count)]
        methods = {}
        for name in graphs:
            feed = {hot[name].get_inputs()[0].name: x.numpy()}
            ring, at = rings[name], [0]

            def cold(ring=ring, at=at, feed=feed):
                at[0] = (at[0] + 1) % len(ring)
                ring[at[0]].run(None, feed)

            methods[f"{name}|hot"] = lambda s=hot[name], feed=feed: s.run(None, feed)
            methods[f"{name}|cold"] = cold
        us, us_p10 = time_rounds(methods, args.rounds)
        for name in graphs:
            row = {"method": f"onnxruntime {name}, {N}x{K} 2x8 g8, 1 token, {threads} thread(s)",
                   "shape": [N, K], "config": "2x8 g8", "tokens": 1, "threads": threads,
                   "us": {"hot": us[f"{name}|hot"], "cold": us[f"{name}|cold"]},
                   "us_p10": {"hot": us_p10[f"{name}|hot"], "cold": us_p10[f"{name}|cold"]},
                   "ring_layers": len(rings[name]), "rounds": args.rounds}
            rows.append(row)
            print(row["method"], row["us"], "p10", row["us_p10"], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1])
    ap.add_argument("--cold-mib", type=int, default=64, help="bytes of distinct layers cycled through per method")
    ap.add_argument("--ort", action="store_true", help="also time the ONNX formulations in ONNX Runtime")
    ap.add_argument("--name", default="vq_linear", help="results file name")
    args = ap.parse_args()
    if not vq_kernels.available():
        sys.exit("numba is not installed: the lookup-table kernel cannot run")
    load = os.getloadavg()
    t0 = time.perf_counter()
    rows = torch_rows(args)
    if args.ort:
        rows += ort_rows(args)
    path = write_result(args.name, rows, model="smollm2-135m linear shapes (random codes, no weights loaded)",
                        model_sha256="", data_sha256="",
                        extra={"load_average": {"start": [round(v, 2) for v in load],
                                                "end": [round(v, 2) for v in os.getloadavg()]},
                               "seconds": {"total": round(time.perf_counter() - t0, 1)},
                               "peak_rss_mb": round(peak_rss_mb())})
    print("wrote", path)


if __name__ == "__main__":
    main()
