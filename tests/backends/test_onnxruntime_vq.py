"""ONNX Runtime lowering of llmc::vq_linear: parity with torch, codes kept uint8/int16 in the file."""

import json
import os
import re
from collections import Counter

import onnx
import onnxruntime as ort
import pytest
import torch

import llmc
from llmc.backends.onnxruntime import TRANSLATIONS, custom_ops, lower
from llmc.errors import ArtifactError, ExportError
from llmc.graph import get_attr_tensor, module_fqn, remove_unused_attrs, set_attr_tensor
from llmc.ops.vq import dequantize, store_codes
from llmc.backends.onnxruntime import OrtModel
from llmc.testing import VQLinear, count_ops, tiny_model, tiny_tokenizer

DECODER_LINEARS = r"layers\.\d+\.(self_attn|mlp)\."
needs_kernel = pytest.mark.skipif(not custom_ops.available(), reason="no C compiler to build llmc's custom ops")


def _random_vq(N, K, M, bits, g, gen):
    """AQLM-layout tensors of an N x K layer: random codes, codebooks of weight-like scale, row scales."""
    codes = store_codes(torch.randint(0, 1 << bits, (N, K // g, M), generator=gen), bits)
    codebooks = 0.05 * torch.randn(M, 1 << bits, 1, g, generator=gen)
    scales = 0.5 + torch.rand(N, 1, 1, 1, generator=gen)
    return codes, codebooks, scales


def _to_vq_linear(gm, M=2, bits=8, g=8, seed=0):
    """Replace every decoder `aten.linear` of `gm` by `llmc::vq_linear` with random codes; returns the FQNs."""
    gen = torch.Generator().manual_seed(seed)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default
             and re.search(DECODER_LINEARS, module_fqn(n) + ".")]
    modules = []
    for node in nodes:
        x, w_node = node.args[:2]
        N, K = get_attr_tensor(gm, w_node).shape
        module = w_node.target.rpartition(".")[0]
        attrs = []
        for leaf, t in zip(("codes", "codebooks", "scales"), _random_vq(N, K, M, bits, g, gen)):
            set_attr_tensor(gm, f"{module}.{leaf}", t, parameter=False)
            with gm.graph.inserting_before(node):
                attrs.append(gm.graph.get_attr(f"{module}.{leaf}"))
        with gm.graph.inserting_before(node):
            y = gm.graph.call_function(torch.ops.llmc.vq_linear.default, (x, *attrs))
        y.meta.update({k: node.meta[k] for k in ("nn_module_stack", "val") if k in node.meta})
        node.replace_all_uses_with(y)
        gm.graph.erase_node(node)
        modules.append(module)
    remove_unused_attrs(gm)
    gm.recompile()
    return modules


@pytest.mark.parametrize("M,bits,dtype", [(2, 8, onnx.TensorProto.UINT8), (1, 16, onnx.TensorProto.INT16)],
                         ids=["2x8", "1x16"])
def test_translation_matches_torch_and_keeps_codes_compact(M, bits, dtype, tmp_path):
    N, K, g = 512, 256, 8  # N*K/g*M codes: above the exporter's constant-folding limit of 8192 values
    layer = VQLinear(*_random_vq(N, K, M, bits, g, torch.Generator().manual_seed(0))).eval()
    dyn = torch.export.Dim.DYNAMIC
    program = torch.onnx.export(layer, (torch.randn(2, 3, K),), dynamo=True, dynamic_shapes=({0: dyn, 1: dyn},),
                                custom_translation_table=dict(TRANSLATIONS), verbose=False)
    path = str(tmp_path / "vq.onnx")
    program.save(path)
    codes = {i.name: i for i in onnx.load(path).graph.initializer}["codes"]
    assert codes.data_type == dtype and list(codes.dims) == [N, K // g, M]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    gen = torch.Generator().manual_seed(1)
    for shape in [(1, 1, K), (1, 3, K), (2, 7, K)]:
        x = torch.randn(shape, generator=gen)
        y = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        torch.testing.assert_close(y, layer(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lowering", [pytest.param("kernel", marks=needs_kernel), "dequantize"])
def test_tiny_llama_with_vq_linears_decodes_like_torch(lowering, tmp_path):
    # hidden 384 (k/v 192 x 384, like SmolLM2's 192 x 576): every layer has more than 8192 codes, so
    # the exporter's optimizer leaves the dequantization to ONNX Runtime and the codes reach the file
    cm = llmc.compile(tiny_model("llama", hidden_size=384, intermediate_size=768), tokenizer=tiny_tokenizer())
    modules = _to_vq_linear(cm.program.gm)
    assert len(modules) == 14 and count_ops(cm.program.gm)["llmc.vq_linear.default"] == 14
    vq_model = llmc.CompiledModel(cm.program)  # a runner over the rewritten graph (cm's is a snapshot)
    out = lower(cm.program, tmp_path / "vq", vq_lowering=lowering)
    manifest = json.load(open(os.path.join(out, "llmc_onnx.json")))
    parity = manifest["parity"]
    assert parity["greedy_identical"] and parity["logits_max_abs_diff"] < 1e-4
    assert manifest["vq_lowering"] == lowering
    assert (manifest["custom_ops_library"] is not None) == (lowering == "kernel")
    genai = json.load(open(os.path.join(out, "genai_config.json")))["model"]["decoder"]["session_options"]
    assert genai.get("custom_ops_library") == manifest["custom_ops_library"]  # onnxruntime-genai registers it too
    if lowering == "kernel":  # genai wants a real file inside the folder
        library = os.path.join(out, genai["custom_ops_library"])
        assert os.path.isfile(library) and not os.path.islink(library)
    ops = Counter(n.op_type for n in onnx.load(os.path.join(out, "model.onnx"), load_external_data=False).graph.node)
    assert ops["VQLinear"] == (14 if lowering == "kernel" else 0)

    model = onnx.load(os.path.join(out, "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    float_shapes = {tuple(i.dims) for i in inits.values() if i.data_type == onnx.TensorProto.FLOAT}
    for module in modules:
        N, K = cm.program.linear_shapes[module]
        codes = inits[f"{module}.codes"]
        assert codes.data_type == onnx.TensorProto.UINT8 and list(codes.dims) == [N, K // 8, 2]
        assert (N, K) not in float_shapes and (K, N) not in float_shapes  # no dequantized copy in the file

    ort_model = OrtModel(out)
    prompts = [[5, 17, 99, 3, 42, 8, 200, 31, 77], [150, 9, 33]]
    assert ort_model.generate(prompts, 12, return_tokens=True) == vq_model.generate(prompts, 12, return_tokens=True)
    ids = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ort_model(ids)[0], vq_model(ids)[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(vq_model(ids)[0], cm(ids)[0], atol=1e-2)  # cm still runs the original graph


# ---------------------------------------------------------------- llmc.VQLinear, the custom op

def _vq_linear_session(codes, codebooks, scales, threads=2):
    """An ONNX Runtime session of one llmc.VQLinear node over x [batch, seq, K], inputs laid out as the lowering does."""
    N, J, M = codes.shape
    _, C, _, g = codebooks.shape
    inits = [onnx.numpy_helper.from_array(codes.reshape(N, J * M).T.contiguous().numpy(), "codes"),
             onnx.numpy_helper.from_array(codebooks.reshape(M, C, g).transpose(1, 2).contiguous().numpy(), "books"),
             onnx.numpy_helper.from_array(scales.reshape(-1).numpy(), "scales"),
             onnx.numpy_helper.from_array(codebooks.reshape(M, C, g).numpy(), "words")]
    node = onnx.helper.make_node("VQLinear", ["x", "codes", "books", "scales", "words"], ["y"], domain="llmc")
    graph = onnx.helper.make_graph(
        [node], "vq", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", "s", "k"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], initializer=inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18),
                                                         onnx.helper.make_opsetid("llmc", 1)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.register_custom_ops_library(custom_ops.library_path())
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(params=custom_ops.ISA_LEVELS)
def isa(request):
    """Each instruction-set path of the kernel (on a CPU without one, the next narrower runs)."""
    custom_ops.set_isa_limit(request.param)
    yield request.param
    custom_ops.set_isa_limit(custom_ops.ISA_LEVELS[-1])


@needs_kernel
@pytest.mark.parametrize("N,K,M,bits,g", [(576, 576, 2, 8, 8), (37, 24, 3, 8, 8), (70, 96, 1, 4, 4), (5, 64, 2, 6, 16),
                                          (130, 64, 2, 8, 8)],
                         ids=["2x8g8", "3x8-odd-rows", "1x4g4", "2x6g16", "2x8-130-rows"])
def test_vq_linear_kernel_matches_dequantize_matmul(N, K, M, bits, g, isa):
    # odd N and J*M not a multiple of 4 take the kernel's tails; 2^bits < 64 its generic table path,
    # 2^8 its byte-permute path (AVX-512 VBMI; 130 rows: two full chunks of 64 and a partial one);
    # one token splits the code rows over threads, 2-3 go one per task through the tables, more
    # dequantize blocks of rows (K = 24: a tail of the 16-wide dot products)
    codes, codebooks, scales = _random_vq(N, K, M, bits, g, torch.Generator().manual_seed(0))
    w = dequantize(codes, codebooks, scales)
    session = _vq_linear_session(codes, codebooks, scales)
    reference = custom_ops.vq_linear_reference()
    gen = torch.Generator().manual_seed(1)
    for shape in [(1, 1, K), (1, 3, K), (2, 7, K)]:
        x = torch.randn(shape, generator=gen)
        y = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        assert y.shape == (*shape[:-1], N)
        torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-5)
        # the same kernel called directly, single-threaded: the thread split changes only the summation order
        xs = x.reshape(-1, K).contiguous().numpy()
        out = torch.empty(xs.shape[0], N)
        rows = codes.reshape(N, -1).T.contiguous().numpy()
        books = codebooks.reshape(M, 1 << bits, g).transpose(1, 2).contiguous().numpy()
        s = scales.reshape(N).contiguous().numpy()
        words = codebooks.reshape(M, 1 << bits, g).contiguous().numpy()
        assert reference(xs.ctypes.data, xs.shape[0], K, rows.ctypes.data, books.ctypes.data, s.ctypes.data,
                         words.ctypes.data, out.numpy().ctypes.data, N, M, g, 1 << bits) == 0
        torch.testing.assert_close(out.reshape(y.shape), y, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_vq_linear_kernel_rejects_inconsistent_inputs():
    codes, codebooks, scales = _random_vq(64, 32, 2, 8, 8, torch.Generator().manual_seed(0))
    session = _vq_linear_session(codes, codebooks, scales[:63])  # one scale short
    with pytest.raises(Exception, match="VQLinear: inconsistent sizes"):
        session.run(None, {"x": torch.randn(1, 1, 32).numpy()})
    session = _vq_linear_session(codes, codebooks, scales)
    with pytest.raises(Exception, match="VQLinear: inconsistent sizes"):  # x of the wrong width
        session.run(None, {"x": torch.randn(1, 1, 40).numpy()})


@needs_kernel
def test_kernel_lowering_keeps_codes_uint8_in_the_session(tmp_path):
    """ONNX Runtime's optimized graph (what the session runs) holds the codes as uint8 and no float weight
    of a quantized layer; the dequantize lowering, for contrast, is folded to float weights."""
    cm = llmc.compile(tiny_model("llama", hidden_size=384, intermediate_size=768), tokenizer=tiny_tokenizer())
    modules = _to_vq_linear(cm.program.gm)
    shapes = {cm.program.linear_shapes[m] for m in modules}
    for lowering in ("kernel", "dequantize"):
        out = lower(cm.program, tmp_path / lowering, vq_lowering=lowering, parity=False)
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / f"{lowering}-session.onnx")
        if lowering == "kernel":
            opts.register_custom_ops_library(os.path.join(out, custom_ops.LIBRARY_NAME))
        ort.InferenceSession(os.path.join(out, "model.onnx"), opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath, load_external_data=False).graph
        inits = {i.name: i for i in graph.initializer}
        float_shapes = {tuple(i.dims) for i in inits.values() if i.data_type == onnx.TensorProto.FLOAT}
        dequantized = {s for s in shapes if s in float_shapes or s[::-1] in float_shapes}
        if lowering == "dequantize":
            assert dequantized == shapes
            continue
        assert not dequantized
        vq_nodes = [n for n in graph.node if n.op_type == "VQLinear"]
        assert len(vq_nodes) == len(modules)
        for node in vq_nodes:
            codes = inits[node.input[1]]
            assert codes.data_type == onnx.TensorProto.UINT8 and len(codes.dims) == 2


@needs_kernel
def test_kernel_export_without_its_library_is_a_clear_error(tmp_path):
    cm = llmc.compile(tiny_model("llama"), tokenizer=tiny_tokenizer())
    _to_vq_linear(cm.program.gm, g=4)
    with pytest.raises(ExportError, match="vq_lowering must be"):
        lower(cm.program, tmp_path / "bad", vq_lowering="lut")
    assert not os.path.exists(tmp_path / "bad")
    out = lower(cm.program, tmp_path / "vq", vq_lowering="kernel")
    os.remove(os.path.join(out, custom_ops.LIBRARY_NAME))
    with pytest.raises(ArtifactError, match=f"incomplete: {custom_ops.LIBRARY_NAME} is missing"):
        OrtModel(out)
    os.remove(os.path.join(out, "checksums.json"))  # a folder from before checksums: the library check itself
    with pytest.raises(ArtifactError, match="custom-op library .* is missing"):
        OrtModel(out)


def test_auto_lowering_falls_back_to_dequantize_without_a_compiler(tmp_path, monkeypatch):
    def no_compiler():
        raise ExportError("no C compiler 'cc' to build llmc's ONNX Runtime custom ops")

    monkeypatch.setattr(custom_ops, "library_path", no_compiler)
    cm = llmc.compile(tiny_model("llama"), tokenizer=tiny_tokenizer())
    _to_vq_linear(cm.program.gm, g=4)
    with pytest.raises(ExportError, match="no C compiler"):
        lower(cm.program, tmp_path / "kernel", vq_lowering="kernel")
    assert not os.path.exists(tmp_path / "kernel")
    out = lower(cm.program, tmp_path / "auto")
    manifest = json.load(open(os.path.join(out, "llmc_onnx.json")))
    assert manifest["vq_lowering"] == "dequantize" and manifest["custom_ops_library"] is None
    assert manifest["parity"]["greedy_identical"]
