"""ONNX Runtime lowering of llmc::binary_bases_linear: parity with torch, signs kept packed in the file and session."""

import json
import os

import onnx
import onnxruntime as ort
import pytest
import torch

import llmc
from llmc.backends.onnxruntime import TRANSLATIONS, OrtModel, custom_ops, lower
from llmc.backends.onnxruntime.translations import translations
from llmc.calibration import decode_inputs
from llmc.ops import binary_bases as bb
from llmc.testing import tiny_model, tiny_tokenizer

needs_kernel = pytest.mark.skipif(not custom_ops.available(), reason="no C compiler to build llmc's custom ops")
pytestmark = pytest.mark.usefixtures("one_thread")


class Layer(torch.nn.Module):
    def __init__(self, signs, scales):
        super().__init__()
        self.register_buffer("signs", signs)
        self.register_buffer("scales", scales)

    def forward(self, x):
        return torch.ops.llmc.binary_bases_linear(x, self.signs, self.scales)


def _layer(nb, N, K, G, seed=0):
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 256, (nb, N, K // 8), dtype=torch.uint8, generator=gen)
    scales = (0.02 + 0.05 * torch.rand(nb, N, G, generator=gen)).half()
    return Layer(signs, scales).eval()


def _session(layer, K, table, path, kernel):
    dyn = torch.export.Dim.DYNAMIC
    program = torch.onnx.export(layer, (torch.randn(2, 3, K),), dynamo=True, dynamic_shapes=({0: dyn, 1: dyn},),
                                custom_translation_table=table, verbose=False)
    program.save(path)
    opts = ort.SessionOptions()
    if kernel:
        opts.register_custom_ops_library(custom_ops.library_path())
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("lowering", [pytest.param("kernel", marks=needs_kernel), "dequantize"])
@pytest.mark.parametrize("nb,G", [(4, 1), (3, 4)], ids=["rows", "groups"])
def test_translation_matches_torch_and_keeps_signs_packed(lowering, nb, G, tmp_path):
    N, K = 512, 256  # nb*N*K/8 signs: above the exporter's constant-folding limit of 8192 values
    layer = _layer(nb, N, K, G)
    path = str(tmp_path / "bb.onnx")
    session = _session(layer, K, translations(lowering), path, lowering == "kernel")
    model = onnx.load(path)
    signs = {i.name: i for i in model.graph.initializer}["signs"]
    assert signs.data_type == onnx.TensorProto.UINT8 and list(signs.dims) == [nb, N, K // 8]
    ops = {n.op_type for n in model.graph.node}
    assert ("BinaryBasesLinear" in ops) == (lowering == "kernel")  # grouped scales too
    name = session.get_inputs()[0].name
    gen = torch.Generator().manual_seed(1)
    for shape in [(1, 1, K), (1, 3, K), (2, 7, K), (1, 40, K)]:
        x = torch.randn(shape, generator=gen)
        y = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        ref = x @ bb.dequantize(layer.signs, layer.scales).t()
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@needs_kernel
@pytest.mark.parametrize("nb,N,K,G", [(4, 40, 576, 1), (4, 33, 576, 3), (2, 16, 64, 2), (3, 10, 48, 2), (1, 7, 24, 1)])
@pytest.mark.parametrize("tokens", [1, 3, 4, 5, 40])
def test_kernel_equals_torch(isa, nb, N, K, G, tokens):
    """Decode sizes (<= 4 tokens: masked multiply-adds) and more (dequantized blocks), groups of 16k inputs
    (the AVX-512 path) and of 24 or 8 (portable)."""
    layer = _layer(nb, N, K, G, seed=tokens)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, K, generator=gen)
    ref = x @ bb.dequantize(layer.signs, layer.scales).t()
    y = custom_ops.binary_bases_reference()(x, layer.signs, layer.scales)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=2e-5 * float(ref.abs().max()))
    index = torch.randint(0, K, (N, 3), generator=gen, dtype=torch.int16)  # and with 3 kept outliers per row
    values = torch.randn(N, 3, generator=gen).half()
    ref = ref + bb.outlier_sum(x, index, values)
    y = custom_ops.binary_bases_reference()(x, layer.signs, layer.scales, index, values)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=2e-5 * float(ref.abs().max()))


def test_portable_table_has_the_op():
    assert torch.ops.llmc.binary_bases_linear.default in TRANSLATIONS


@pytest.mark.parametrize("outliers", [0, 2])
@pytest.mark.parametrize("lowering", [pytest.param("kernel", marks=needs_kernel), "dequantize"])
def test_qbb_model_exports_with_parity(lowering, outliers, tmp_path):
    model = tiny_model()
    cm = llmc.compile(model, [f"qbb_quant:bases=3,outliers={outliers},checkpoint_dir={tmp_path / 'ck'}"],
                      tokenizer=tiny_tokenizer(), progress=False)
    out = str(tmp_path / "onnx")
    lower(cm.program, out, vq_lowering=lowering)  # raises ParityError if ORT disagrees with torch
    with open(os.path.join(out, "llmc_onnx.json")) as f:
        manifest = json.load(f)
    assert manifest["vq_lowering"] == lowering and manifest["parity"]
    assert (manifest["custom_ops_library"] is not None) == (lowering == "kernel")
    onnx_model = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)
    if lowering == "kernel":  # one BinaryBasesLinear a layer on its packed signs: 1 bit per weight and basis
        inits = {i.name: i for i in onnx_model.graph.initializer}
        ops = [n for n in onnx_model.graph.node if n.op_type == "BinaryBasesLinear"]
        assert len(ops) == 8  # per layer: q/k/v merged, gate/up merged, o, down
        fusions = manifest["fusions"]
        assert fusions["BinaryBasesLinearMerge"] == 4 and fusions["BinaryBasesLinearMerge.linears"] == 10
        assert fusions.get("BinaryBasesLinear.outliers", 0) == (14 if outliers else 0)
        read = {i for n in onnx_model.graph.node for i in n.input}
        assert set(inits) <= read  # the merged layers' own tensors are gone from the file
        assert all(len([i for i in n.input if i]) == (5 if outliers else 3) for n in ops)  # outliers in the op
        signs = [inits[n.input[1]] for n in ops]
        assert all(c.data_type == onnx.TensorProto.UINT8 for c in signs)
        shapes = [s for name, s in cm.program.linear_shapes.items() if name != "lm_head"]
        assert sum(c.dims[0] * c.dims[1] * c.dims[2] for c in signs) == 3 * sum(N * K for N, K in shapes) // 8
    m = OrtModel(out, threads=1)
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    mask, pos = decode_inputs(ids)
    with torch.no_grad():
        ref = cm.step(ids, mask, pos, cm.empty_cache(1))[0]
    got = m.step(ids, mask, pos, m.empty_cache(1))[0]
    torch.testing.assert_close(torch.as_tensor(got), ref, rtol=1e-3, atol=1e-3)
    assert m.generate("ab", max_new_tokens=6) == cm.generate("ab", max_new_tokens=6)
