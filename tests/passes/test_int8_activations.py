"""int8_activations: the torch op reproduces MatMulNBits accuracy_level=4; the pass and its export agree."""

import json
import os

import numpy as np
import pytest
import torch

import llmc
from llmc.errors import ConfigError
from llmc.ops.nbits_linear import dequantize, quantize_rtn
from llmc.passes_base import parse_pass_spec
from llmc.testing import count_ops, sqnr, tiny_tokenizer


def _matmulnbits_session(codes, scales, zeros, K, N, bits, block):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=block, accuracy_level=4)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, N])],
        [numpy_helper.from_array(t.numpy(), name) for t, name in ((codes, "B"), (scales, "S"), (zeros, "Z"))])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                                   helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits,block,K,M", [(4, 32, 576, 1), (4, 64, 200, 33), (2, 32, 128, 5), (8, 128, 576, 3),
                                             (4, 16, 128, 2), (2, 16, 128, 2)])
def test_op_matches_onnxruntime_int8_compute(bits, block, K, M):
    from llmc.ops.nbits_linear import int8_act_supported

    gen = torch.Generator().manual_seed(bits * block + M)
    N = 96
    codes, scales, zeros = quantize_rtn(torch.randn(N, K, generator=gen) * 0.05, bits, block)
    x = torch.randn(M, K, generator=gen)
    x[:, 3] *= 30  # an outlier channel: int8 rounding of its block is coarse, so the emulation matters
    ort_y = torch.from_numpy(_matmulnbits_session(codes, scales, zeros, K, N, bits, block).run(None, {"A": x.numpy()})[0])
    y_int8 = torch.ops.llmc.nbits_linear(x, codes, scales, zeros, K, N, bits, block, True)
    y_float = x @ dequantize(codes, scales, zeros, K, bits, block).T
    err_int8 = float((ort_y - y_int8).abs().max())
    err_float = float((ort_y - y_float).abs().max())
    if not int8_act_supported(bits, block):  # ORT computes these in float: the pass must leave them alone
        assert err_float < 1e-4 < err_int8
        return
    assert err_int8 < 2e-5 * float(ort_y.abs().max())
    assert err_float > 50 * err_int8  # ORT really computed in int8, and the plain float op would not match


def test_rounding_ties_round_like_the_kernel():
    # Values met in SmolLM2's first layer: x * (127 / amax) is a half step up to one ulp, so the level
    # depends on computing 127 / amax as one float32 division (as the kernel does), then rounding
    # half to even; `1 / (amax / 127)` or torch's `127 / tensor` (a reciprocal times 127) flip them.
    block = torch.zeros(64)
    block[:4] = torch.tensor([0.21142511, 0.0074914414, -0.024139088, 0.0])
    x = block.repeat(3)[None]  # K = 192, three blocks
    gen = torch.Generator().manual_seed(0)
    codes, scales, zeros = quantize_rtn(torch.randn(32, 192, generator=gen), 8, 64)
    ort_y = _matmulnbits_session(codes, scales, zeros, 192, 32, 8, 64).run(None, {"A": x.numpy()})[0]
    torch.testing.assert_close(torch.ops.llmc.nbits_linear(x, codes, scales, zeros, 192, 32, 8, 64, True),
                               torch.from_numpy(ort_y), atol=1e-5, rtol=1e-5)


def test_pass_marks_every_scalar_linear_and_exports_with_parity(tiny_models, tmp_path):
    import onnx

    from llmc.backends.onnxruntime import lower
    from llmc.backends.onnxruntime import OrtModel

    model = tiny_models["llama"]
    base = llmc.compile(model, passes=["rtn_quant:bits=4,group=16,lm_head=true"], tokenizer=tiny_tokenizer())
    cm = llmc.compile(model, passes=["rtn_quant:bits=4,group=16,lm_head=true", "int8_activations"],
                      tokenizer=tiny_tokenizer())
    nodes = [n for n in cm.program.gm.graph.nodes if n.target is torch.ops.llmc.nbits_linear.default]
    assert len(nodes) == 15 and all(n.args[8] is True for n in nodes)
    assert cm.program.history[-1].stats["linears"] == 15
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    s = sqnr(base(ids)[0], cm(ids)[0])
    assert 20 < s < 60  # activation rounding changes the logits a little, not a lot
    # parity-checked (statistically: int8 rounding is discontinuous); unfused, one MatMulNBits per linear
    out = lower(cm.program, tmp_path / "q", fuse=False)
    with open(os.path.join(out, "llmc_onnx.json")) as f:
        parity = json.load(f)["parity"]
    assert parity["mode"].startswith("statistical") and parity["argmax_agreement"] >= 0.8
    graph = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False).graph
    levels = [next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
              for n in graph.node if n.op_type == "MatMulNBits"]
    assert levels == [4] * 15
    prompts = [[5, 17, 99, 3], [150, 9, 33, 8, 200, 31]]
    assert OrtModel(out).generate(prompts, 16, return_tokens=True) == cm.generate(prompts, 16, return_tokens=True)


def test_targets_no_match_and_bad_regex(tiny_models):
    import logging

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    cm = llmc.compile(tiny_models["llama"], passes=["rtn_quant:bits=8,group=16", r"int8_activations:targets=mlp\."])
    flags = [n.args[8] if len(n.args) > 8 else False
             for n in cm.program.gm.graph.nodes if n.target is torch.ops.llmc.nbits_linear.default]
    assert sum(flags) == 6 and len(flags) == 14  # gate/up/down of 2 layers
    records, logger = Records(), logging.getLogger("llmc.passes.int8_activations")
    logger.addHandler(records)
    try:
        cm = llmc.compile(tiny_models["llama"], passes=["int8_activations"])
    finally:
        logger.removeHandler(records)
    assert count_ops(cm.program.gm)["aten.linear.default"] == 15
    assert any("no llmc::nbits_linear" in m for m in records.messages)
    with pytest.raises(ConfigError, match="regular expression"):
        parse_pass_spec("int8_activations:targets=(")
    assert np.isfinite(cm(torch.tensor([[4, 5]]))[0].numpy()).all()
    cm = llmc.compile(tiny_models["llama"], passes=["rtn_quant:bits=2,group=16", "int8_activations"])
    stats = cm.program.history[-1].stats
    assert stats["linears"] == 0 and len(stats["unsupported"]) == 14  # no int8 kernel: left in float


def test_statistical_parity_still_catches_a_wrong_lowering(tiny_models, tmp_path, monkeypatch):
    from onnxscript import opset18 as op

    from llmc.backends.onnxruntime import lower, translations
    from llmc.errors import ParityError

    def without_zero_points(x, codes, scales, zero_points, K, N, bits, block_size, int8_act=False):
        zeros = op.Expand(op.Constant(value_int=0x88), op.Shape(zero_points))  # 8 in both nibbles: wrong
        return translations.nbits_linear(x, codes, scales, op.Cast(zeros, to=2), K, N, bits, block_size, int8_act)

    monkeypatch.setitem(translations.TRANSLATIONS, torch.ops.llmc.nbits_linear.default, without_zero_points)
    cm = llmc.compile(tiny_models["llama"], passes=["rtn_quant:bits=4,group=16", "int8_activations"],
                      tokenizer=tiny_tokenizer())
    with pytest.raises(ParityError, match="beyond int8-rounding noise"):
        lower(cm.program, tmp_path / "bad")
    assert not os.path.exists(tmp_path / "bad")
