"""llmc.CQAttention: the kernel against torch, the graph rewrite, and the export against the standard-op lowering."""

import json
import os

import onnx
import pytest
import torch

import llmc
from llmc.backends.onnxruntime import OrtModel, custom_ops, lower
from llmc.backends.onnxruntime.cq_attention import fuse_cq_attention
from llmc.generation import left_pad, position_ids_from_mask
from llmc.ops.cq import attention, encode
from llmc.testing import tiny_model, tiny_tokenizer

needs_kernel = pytest.mark.skipif(not custom_ops.available(), reason="no C compiler to build llmc's custom ops")


def _calib(n=8, length=64):
    return [torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(100 + i)) for i in range(n)]


def _case(B, H, R, P, S, D, c, bits, rot, seed=0):
    """The arguments of llmc::cq_attention: random q, codes of encoded random past keys/values, S new keys/values,
    codebooks, RoPE tables of P + S positions, and a bias that hides the first positions of row 1 (left padding),
    the causal upper triangle of the new tokens (row r is query r % S) and a few random positions."""
    g = torch.Generator().manual_seed(seed)
    G, K = D // c, 2**bits
    kb, vb = torch.randn(H, G, K, c, generator=g), torch.randn(H, G, K, c, generator=g)
    kc = encode(torch.randn(B, H, P, D, generator=g), kb)
    vc = encode(torch.randn(B, H, P, D, generator=g), vb)
    kn, vn = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)
    T = P + S
    angle = torch.arange(T)[:, None] * torch.rand(rot // 2, generator=g)[None]
    cos = torch.cat([angle.cos(), angle.cos()], -1).expand(B, 1, T, rot).contiguous()
    sin = torch.cat([-angle.sin(), angle.sin()], -1).expand(B, 1, T, rot).contiguous()
    hidden = torch.rand(B, 1, R, T, generator=g) < 0.1
    hidden |= torch.arange(T)[None, None, None] > P + torch.arange(R)[None, None, :, None] % S
    if B > 1:
        hidden[1, :, :, : min(3, P)] = True
    bias = torch.zeros(B, 1, R, T).masked_fill(hidden, torch.finfo(torch.float32).min)
    q = torch.randn(B, H, R, D, generator=g)
    return q, kc, kn, kb, vc, vn, vb, cos, sin, bias, D**-0.5


@needs_kernel
@pytest.mark.parametrize("B,H,groups,P,S,D,c,bits,rot", [
    (1, 3, 3, 150, 1, 64, 4, 8, 64),   # a decode step on the AVX-512 path's shape (4-channel groups, whole-head RoPE)
    (2, 2, 2, 40, 3, 128, 4, 8, 128),  # the same at D = 128, batch 2 with left padding, a chunk of 3 tokens
    (1, 3, 3, 9, 1, 64, 4, 8, 64),     # a decode step over a short past
    (2, 2, 1, 300, 2, 32, 4, 8, 32),   # a long past
    (1, 2, 2, 50, 1, 96, 4, 8, 96),    # D = 96: the AVX-512 path's third head size
    (2, 2, 2, 37, 20, 32, 2, 6, 16),   # a chunk after a past: partial rotary, 2-channel groups, 64-code books
    (2, 1, 3, 0, 45, 64, 4, 8, 64),    # a prompt: no past, 135 rows in three blocks, blocks of keys hidden whole
])
def test_kernel_equals_torch(isa, B, H, groups, P, S, D, c, bits, rot):
    case = _case(B, H, groups * S, P, S, D, c, bits, rot)
    torch.testing.assert_close(custom_ops.cq_attention_reference()(*case), attention(*case), atol=2e-5, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("c,bits", [(4, 8), (2, 5), (8, 8), (4, 3)])
def test_encode_kernel_equals_torch(isa, c, bits):
    g = torch.Generator().manual_seed(c + bits)
    codebooks = torch.randn(3, 32 // c, 2**bits, c, generator=g)
    x = torch.randn(2, 3, 70, 32, generator=g)
    assert torch.equal(custom_ops.cq_encode_reference()(x, codebooks), encode(x, codebooks))


@pytest.fixture(scope="module")
def cq_llama():
    return llmc.compile(tiny_model("llama"), passes=["cq_kv:config=4c8b,tokens=512"], calibration=_calib(),
                        tokenizer=tiny_tokenizer(), progress=False)


def _steps(step, empty_cache):
    """Logits of a left-padded batch of 2: the prompts, then one token, then a chunk of 3 tokens."""
    ids, mask = left_pad([[5, 17, 99, 3, 42, 8, 200, 31, 77], [150, 9, 33]], pad_id=0)
    logits, cache = step(ids, mask, position_ids_from_mask(mask), empty_cache(2))
    out = [logits]
    for new in (torch.tensor([[7], [8]]), torch.tensor([[11, 12, 13], [14, 15, 16]])):
        mask = torch.cat([mask, torch.ones_like(new)], 1)
        logits, cache = step(new, mask, position_ids_from_mask(mask)[:, -new.shape[1]:], cache)
        out.append(logits)
    return out


def test_rewrite_takes_every_layer_and_computes_the_same(cq_llama):
    program = cq_llama.program
    fused, n = fuse_cq_attention(program.gm)
    assert n == program.num_layers
    ops = [x.target for x in fused.graph.nodes if x.op == "call_function"]
    assert ops.count(torch.ops.llmc.cq_attention.default) == n and torch.ops.llmc.cq_decode.default not in ops
    assert torch.ops.llmc.cq_decode.default in [x.target for x in program.gm.graph.nodes]  # the program is untouched

    def run(gm):
        return _steps(lambda *a: gm(*a), program.empty_cache)

    for a, b in zip(run(program.gm), run(fused)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["cq_kv:config=4c8b,tokens=512,window=2",
                                  "cq_kv:config=4c8b,tokens=512,exact_current=false"])
def test_rewrite_leaves_other_cq_caches_alone(spec):
    cm = llmc.compile(tiny_model("llama"), passes=[spec], calibration=_calib(4), tokenizer=tiny_tokenizer(),
                      progress=False)
    fused, n = fuse_cq_attention(cm.program.gm)
    assert n == 0 and fused is cm.program.gm


def test_rewrite_takes_partial_rotary():
    cm = llmc.compile(tiny_model("stablelm"), passes=["cq_kv:config=4c8b,tokens=512"], calibration=_calib(4),
                      tokenizer=tiny_tokenizer(), progress=False)
    fused, n = fuse_cq_attention(cm.program.gm)
    assert n == cm.program.num_layers
    for a, b in zip(_steps(cm.program.gm, cm.program.empty_cache), _steps(fused, cm.program.empty_cache)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_export_reads_codes_and_equals_the_standard_lowering(cq_llama, tmp_path):
    kernel = lower(cq_llama.program, str(tmp_path / "kernel"), vq_lowering="kernel")
    standard = lower(cq_llama.program, str(tmp_path / "standard"), vq_lowering="dequantize")
    manifest = json.load(open(os.path.join(kernel, "llmc_onnx.json")))
    layers = cq_llama.program.num_layers
    assert manifest["fusions"]["CQAttention"] == layers and manifest["parity"]["greedy_identical"]
    assert "CQAttention" not in json.load(open(os.path.join(standard, "llmc_onnx.json")))["fusions"]
    graph = onnx.load(os.path.join(kernel, "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "CQAttention" and n.domain == "llmc" for n in graph.node) == layers
    assert sum(n.op_type == "CQEncode" and n.domain == "llmc" for n in graph.node) == 2 * layers
    assert not any(n.op_type == "ArgMin" for n in graph.node)
    a, b = OrtModel(kernel), OrtModel(standard)
    for x, y in zip(_steps(a.step, a.empty_cache), _steps(b.step, b.empty_cache)):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
