"""rtn_quant: structure, bounded error, lowering to MatMulNBits with codes kept compact."""

import os

import pytest
import torch

import llmc
from llmc.errors import ConfigError
from llmc.passes_base import parse_pass_spec
from llmc.testing import count_ops, sqnr, tiny_tokenizer


@pytest.mark.parametrize("bits,min_sqnr,max_sqnr", [(8, 35.0, 200.0), (4, 12.0, 35.0), (3, 6.0, 25.0)])
def test_quantizes_decoder_linears_with_bounded_error(bits, min_sqnr, max_sqnr, tiny_models):
    model = tiny_models["llama"]
    base = llmc.compile(model)
    cm = llmc.compile(model, passes=[f"rtn_quant:bits={bits},group=16"])
    ops = count_ops(cm.program.gm)
    assert ops["llmc.nbits_linear.default"] == 14 and ops["aten.linear.default"] == 1  # lm_head stays
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    s = sqnr(base(ids)[0], cm(ids)[0])
    assert min_sqnr < s < max_sqnr  # lossy, but far from broken
    rep = cm.program.size_report()
    expected = bits + 32 / 16 + bits / 16  # codes + float scale + zero point per block of 16
    assert abs(rep["decoder_linear_bits_per_param"] - expected) < (0.01 if bits != 3 else 0.2)  # 3: zeros pad to 8


def test_lm_head_option_and_bias(tiny_models):
    cm = llmc.compile(tiny_models["qwen2"], passes=["rtn_quant:bits=8,group=16,lm_head=true"])
    ops = count_ops(cm.program.gm)
    assert ops["llmc.nbits_linear.default"] == 15 and ops["aten.linear.default"] == 0
    assert ops["aten.add.Tensor"] >= 6  # q/k/v biases of qwen2 are added after the op


def test_no_match_and_bad_options(tiny_models):
    cm = llmc.compile(tiny_models["llama"], passes=["rtn_quant:targets=nothing_matches"])
    assert cm.program.history[0].stats["quantized"] == 0
    for spec, msg in [("rtn_quant:bits=5", "bits must be one of"), ("rtn_quant:group=24", "power of two")]:
        with pytest.raises(ConfigError, match=msg):
            parse_pass_spec(spec)


def test_lowers_to_matmulnbits_and_stays_compact(tiny_models, tmp_path):
    import onnx
    import onnxruntime as ort

    from llmc.backends.onnxruntime import lower
    from llmc.backends.onnxruntime import OrtModel

    cm = llmc.compile(tiny_models["llama"], passes=["rtn_quant:bits=4,group=16"], tokenizer=tiny_tokenizer())
    out = lower(cm.program, tmp_path / "q", fuse=False)  # one MatMulNBits per linear (merged: test_onnxruntime_fusion)
    model = onnx.load(os.path.join(out, "model.onnx"))
    assert sum(n.op_type == "MatMulNBits" and n.domain == "com.microsoft" for n in model.graph.node) == 14
    shapes = {tuple(i.dims) for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    for fqn, (n, k) in cm.program.linear_shapes.items():
        if fqn != "lm_head":
            assert (n, k) not in shapes and (k, n) not in shapes  # no dequantized float copy in the file
    uint8 = sum(int(torch.tensor(i.dims).prod()) for i in model.graph.initializer if i.data_type == onnx.TensorProto.UINT8)
    assert uint8 >= 73728 * 4 // 8  # the codes themselves
    weight_bytes = sum(onnx.numpy_helper.to_array(i).nbytes for i in model.graph.initializer)
    float_params = 2 * 256 * 64 + 320 + 16  # embeddings, lm_head, norms, rotary inv_freq: kept float32
    bound = 4 * float_params + 73728 * (4 + 32 / 16 + 4 / 16) / 8  # codes + scales + zero points, block 16
    assert weight_bytes <= bound * 1.01
    assert os.path.getsize(os.path.join(out, "model.onnx.data")) <= bound * 1.01
    # the session keeps the contrib op (ORT does not fold it back to floats at load)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(os.path.join(out, "model.onnx"), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in optimized.graph.node) == 14
    prompts = [[5, 17, 99, 3], [150, 9, 33, 8, 200, 31]]
    assert OrtModel(out).generate(prompts, 16, return_tokens=True) == cm.generate(prompts, 16, return_tokens=True)


def test_embeddings_tied_to_lm_head_share_codes_and_export(tmp_path):
    import onnx

    from llmc.backends.onnxruntime import lower
    from llmc.backends.onnxruntime import OrtModel
    from llmc.testing import tiny_model

    model = tiny_model("llama", tie_word_embeddings=True)
    head_only = llmc.compile(model, passes=["rtn_quant:bits=4,group=16,lm_head=true"])
    assert head_only.program.history[0].stats["untied"] == ["lm_head.weight"]  # the float table stays for lookups
    cm = llmc.compile(model, passes=["rtn_quant:bits=4,group=16,lm_head=true,embeddings=true"],
                      tokenizer=tiny_tokenizer())
    ops = count_ops(cm.program.gm)
    assert ops["llmc.nbits_embedding.default"] == 1 and "aten.embedding.default" not in ops
    stats = cm.program.history[0].stats
    assert stats["embeddings"] == ["model.embed_tokens"] and stats["untied"] == []
    names = {k for k, _ in cm.program.gm.named_buffers()} | {k for k, _ in cm.program.gm.named_parameters()}
    assert not any(k.startswith("model.embed_tokens") for k in names)  # the lookup reads lm_head.codes
    # lookups are the lm_head's dequantized rows: the same quantization as the logits' weight
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    s = sqnr(head_only(ids)[0], cm(ids)[0])
    assert 10 < s < 40
    out = lower(cm.program, tmp_path / "q")  # parity-checked
    graph = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False).graph
    assert [n.op_type for n in graph.node if n.domain == "com.microsoft"].count("GatherBlockQuantized") == 1
    assert not any(i.data_type == onnx.TensorProto.FLOAT and list(i.dims) == [256, 64] for i in graph.initializer)
    assert os.path.getsize(os.path.join(out, "model.onnx.data")) < 4 * (256 * 64 + 73728) * 0.25
    prompts = [[5, 17, 99, 3], [150, 9, 33, 8, 200, 31]]
    assert OrtModel(out).generate(prompts, 16, return_tokens=True) == cm.generate(prompts, 16, return_tokens=True)


def test_untied_embedding_with_padded_blocks(tmp_path):
    from llmc.backends.onnxruntime import lower
    from llmc.testing import tiny_model

    model = tiny_model("qwen2", hidden_size=80, num_attention_heads=4, num_key_value_heads=2)  # 80 = 2.5 blocks of 32
    cm = llmc.compile(model, passes=["rtn_quant:bits=8,group=32,embeddings=true"], tokenizer=tiny_tokenizer())
    assert count_ops(cm.program.gm)["aten.linear.default"] == 1  # lm_head stays float, the table is quantized
    table = model.model.embed_tokens.weight.detach()
    ids = torch.tensor([[3, 77, 255]])
    rows = torch.ops.llmc.nbits_embedding(ids, *(cm.program.gm.get_buffer(f"model.embed_tokens.{k}")
                                                 for k in ("codes", "scales", "zero_points")), 80, 8, 32)
    assert rows.shape == (1, 3, 80)
    assert float((rows[0] - table[ids[0]]).abs().max()) < float(table.abs().max()) / 100  # 8-bit rounding
    lower(cm.program, tmp_path / "q")  # parity-checked, with the Slice of the padded last block


def test_three_bit_codes_stay_three_bit_in_the_file_and_run_as_four_bit(tmp_path):
    import onnx

    from llmc.backends.onnxruntime import lower
    from llmc.backends.onnxruntime import OrtModel
    from llmc.testing import tiny_model

    # wide MLPs: the exporter folds constant subgraphs of <= 8192 elements, so the small attention
    # projections reach the file already widened to 4 bits; the MLP codes must not
    model = tiny_model("llama", intermediate_size=1024)
    cm = llmc.compile(model, passes=["rtn_quant:bits=3,group=16"], tokenizer=tiny_tokenizer())
    out = lower(cm.program, tmp_path / "q3", fuse=False)  # parity-checked; unfused, one MatMulNBits per linear
    onnx_model = onnx.load(os.path.join(out, "model.onnx"))
    nbits = [n for n in onnx_model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 14 and all(a.i == 4 for n in nbits for a in n.attribute if a.name == "bits")
    codes = [tuple(i.dims) for i in onnx_model.graph.initializer if i.data_type == onnx.TensorProto.UINT8]
    assert sorted(d for d in codes if d[1:] in ((4, 6), (64, 6))) == [(64, 64, 6)] * 2 + [(1024, 4, 6)] * 4
    prompts = [[5, 17, 99, 3], [150, 9, 33, 8, 200, 31]]
    assert OrtModel(out).generate(prompts, 16, return_tokens=True) == cm.generate(prompts, 16, return_tokens=True)
