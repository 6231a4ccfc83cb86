"""ONNX Runtime lowering of llmc::vq_linear: parity with torch, codes kept uint8/int16 in the file."""

import json
import os
import re

import onnx
import onnxruntime as ort
import pytest
import torch

import llmc
from llmc.backends.onnxruntime import TRANSLATIONS, lower
from llmc.graph import get_attr_tensor, module_fqn, remove_unused_attrs, set_attr_tensor
from llmc.ops.vq import store_codes
from llmc.runtime import OrtModel
from llmc.testing import VQLinear, count_ops, tiny_model, tiny_tokenizer

DECODER_LINEARS = r"layers\.\d+\.(self_attn|mlp)\."


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
    for shape in [(1, 1, K), (2, 7, K)]:
        x = torch.randn(shape, generator=gen)
        y = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        torch.testing.assert_close(y, layer(x), rtol=1e-4, atol=1e-4)


def test_tiny_llama_with_vq_linears_decodes_like_torch(tmp_path):
    # hidden 384 (k/v 192 x 384, like SmolLM2's 192 x 576): every layer has more than 8192 codes, so
    # the exporter's optimizer leaves the dequantization to ONNX Runtime and the codes reach the file
    cm = llmc.compile(tiny_model("llama", hidden_size=384, intermediate_size=768), tokenizer=tiny_tokenizer())
    modules = _to_vq_linear(cm.program.gm)
    assert len(modules) == 14 and count_ops(cm.program.gm)["llmc.vq_linear.default"] == 14
    vq_model = llmc.CompiledModel(cm.program)  # a runner over the rewritten graph (cm's is a snapshot)
    out = lower(cm.program, tmp_path / "vq")
    parity = json.load(open(os.path.join(out, "llmc_onnx.json")))["parity"]
    assert parity["greedy_identical"] and parity["logits_max_abs_diff"] < 1e-4

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
