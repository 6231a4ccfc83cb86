"""llmc.CQAttention: the kernel against torch, the graph rewrite, and the export against the standard-op lowering."""

import collections
import ctypes
import json
import os

import onnx
import pytest
import torch

import llmc
from llmc.backends.onnxruntime import OrtModel, custom_ops, lower
from llmc.backends.onnxruntime.cq_attention import fuse_cq_attention
from llmc.generation import left_pad, position_ids_from_mask
from llmc.graph import attr_tensor
from llmc.ops.cq import attention, decode, encode
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
    (1, 2, 3, 1000, 1, 64, 4, 8, 64),  # a long decode step at batch 1
    (2, 1, 2, 300, 1, 128, 4, 8, 128), # a decode step whose row 1 has 100 positions of left padding (below)
])
def test_kernel_equals_torch(isa, B, H, groups, P, S, D, c, bits, rot):
    case = list(_case(B, H, groups * S, P, S, D, c, bits, rot))
    if B == 2 and P == 300:
        case[9][1, :, :, :100] = torch.finfo(torch.float32).min  # left padding longer than a split
    kernel = custom_ops.cq_attention_reference()
    torch.testing.assert_close(kernel(*case), attention(*case), atol=2e-5, rtol=1e-4)
    # RoPE's tables (_case's) repeat their halves: reading half of each row gives the same
    torch.testing.assert_close(kernel(*case, rope_halves=True), attention(*case), atol=2e-5, rtol=1e-4)


@needs_kernel
@pytest.mark.skipif(not custom_ops.available() or not ctypes.CDLL(custom_ops.library_path()).llmc_has_avx512(),
                    reason="the portable path reads whole rows (no AVX-512 here)")
def test_kernel_reads_half_tables_under_rope_halves():
    """On the AVX-512 path, rope_halves reads the past keys' cos from the first half of each row and signed_sin from
    the second (negated for the first): tables whose halves differ give the attention of tables rebuilt from those
    halves, not of their own."""
    custom_ops.set_isa_limit("avx512")
    try:
        case = list(_case(1, 2, 3, 40, 1, 64, 4, 8, 64))
        g = torch.Generator().manual_seed(7)
        cos, sin = (t + 0.3 * torch.randn(t.shape, generator=g) for t in case[7:9])  # halves no longer related
        half = cos.shape[-1] // 2
        rebuilt = list(case)
        rebuilt[7] = torch.cat([cos[..., :half], cos[..., :half]], -1)
        rebuilt[8] = torch.cat([-sin[..., half:], sin[..., half:]], -1)
        rebuilt[7][..., 40:, :], rebuilt[8][..., 40:, :] = cos[..., 40:, :], sin[..., 40:, :]  # the new key: full rows
        case[7], case[8] = cos, sin
        out = custom_ops.cq_attention_reference()(*case, rope_halves=True)
        torch.testing.assert_close(out, attention(*rebuilt), atol=2e-5, rtol=1e-4)
        assert (out - attention(*case)).abs().max() > 1e-2
    finally:
        custom_ops.set_isa_limit(custom_ops.ISA_LEVELS[-1])


@needs_kernel
@pytest.mark.parametrize("row_major", [False, True])
@pytest.mark.parametrize("c,bits", [(4, 8), (2, 5), (8, 8), (4, 3)])
def test_encode_kernel_equals_torch(isa, c, bits, row_major):
    g = torch.Generator().manual_seed(c + bits)
    codebooks = torch.randn(3, 32 // c, 2**bits, c, generator=g)
    x = torch.randn(2, 3, 70, 32, generator=g)
    assert torch.equal(custom_ops.cq_encode_reference()(x, codebooks, row_major), encode(x, codebooks))


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
    fused, n, cached = fuse_cq_attention(program.gm)
    assert n == cached == program.num_layers
    ops = [x.target for x in fused.graph.nodes if x.op == "call_function"]
    assert ops.count(torch.ops.llmc.cq_cached_attention.default) == n
    assert not {torch.ops.llmc.cq_decode.default, torch.ops.llmc.cq_encode.default} & set(ops)  # all in the op
    assert torch.ops.llmc.cq_decode.default in [x.target for x in program.gm.graph.nodes]  # the program is untouched

    def run(gm):
        return _steps(lambda *a: gm(*a), program.empty_cache)

    for a, b in zip(run(program.gm), run(fused)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _table(fn):
    """The output node of fn(x [B, S, 8]) -> [B, 1, S, 16] exported with torch.export (aten ops, as traced graphs)."""
    class Table(torch.nn.Module):
        def forward(self, x):
            return fn(x)

    gm = torch.export.export(Table(), (torch.randn(2, 3, 8),)).graph_module
    return next(n for n in gm.graph.nodes if n.op == "output").args[0][0]


def _signed(s, h=8):
    return torch.cat([-s[..., :h], s[..., h:]], -1)


@pytest.mark.parametrize("fn,expected", [
    (lambda x: torch.cat([x, x], -1).cos().unsqueeze(1), "same"),
    (lambda x: (torch.cat([x, x], -1).cos() * 1.5).to(torch.float32).unsqueeze(1), "same"),
    (lambda x: _signed(torch.cat([x, x], -1).sin() * 2.0).unsqueeze(1), "negated"),
    (lambda x: torch.cat([x, x + 1], -1).cos().unsqueeze(1), None),  # halves of different values
    (lambda x: torch.cat([x, x], 1).cos().unsqueeze(1), None),  # repeated along another dimension
    (lambda x: _signed(torch.cat([x, x], -1).sin(), h=4).unsqueeze(1), None),  # split off the middle
    (lambda x: _signed(torch.cat([x, x * 2], -1).sin()).unsqueeze(1), None),  # of a sin whose halves differ
    (lambda x: torch.cat([x, x], -1).cos().exp().unsqueeze(1), None),  # an op not known to keep the halves
])
def test_rope_halves_are_known_from_the_graph(fn, expected):
    """The proof behind rope_halves: the tables' construction, down to cat([f, f]) on the last dimension."""
    from llmc.backends.onnxruntime.cq_attention import _halves

    table = _table(fn)
    assert _halves(table, 4, 16) == expected
    if expected == "negated":  # only of a known width: the split must be at its half
        assert _halves(table, 4, None) is None


@pytest.mark.parametrize("spec", ["cq_kv:config=4c8b,tokens=512,window=2",
                                  "cq_kv:config=4c8b,tokens=512,exact_current=false"])
def test_rewrite_leaves_other_cq_caches_alone(spec):
    cm = llmc.compile(tiny_model("llama"), passes=[spec], calibration=_calib(4), tokenizer=tiny_tokenizer(),
                      progress=False)
    fused, n, cached = fuse_cq_attention(cm.program.gm)
    assert n == cached == 0 and fused is cm.program.gm


@pytest.fixture(scope="module")
def cq_stablelm():
    return llmc.compile(tiny_model("stablelm"), passes=["cq_kv:config=4c8b,tokens=512"], calibration=_calib(4),
                        tokenizer=tiny_tokenizer(), progress=False)


def test_rewrite_takes_partial_rotary(cq_stablelm):
    """StableLM rotates a quarter of each head, and normalizes each key head before the cache: its new keys are no
    plain projection, so every layer becomes cq_attention beside its encodings (not cq_cached_attention)."""
    cm = cq_stablelm
    fused, n, cached = fuse_cq_attention(cm.program.gm)
    assert n == cm.program.num_layers and cached == 0
    for a, b in zip(_steps(cm.program.gm, cm.program.empty_cache), _steps(fused, cm.program.empty_cache)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_export_of_cq_attention_beside_its_encodings(cq_stablelm, tmp_path):
    kernel = lower(cq_stablelm.program, str(tmp_path / "kernel"), vq_lowering="kernel")
    standard = lower(cq_stablelm.program, str(tmp_path / "standard"), vq_lowering="dequantize")
    manifest = json.load(open(os.path.join(kernel, "llmc_onnx.json")))
    layers = cq_stablelm.program.num_layers
    assert manifest["fusions"]["CQAttention"] == layers and manifest["cache_buffers"] == "concatenated"
    graph = onnx.load(os.path.join(kernel, "model.onnx"), load_external_data=False).graph
    assert collections.Counter(n.op_type for n in graph.node if n.domain == "llmc") == {
        "CQAttention": layers, "CQEncode": 2 * layers}
    a, b = OrtModel(kernel), OrtModel(standard)
    for x, y in zip(_steps(a.step, a.empty_cache), _steps(b.step, b.empty_cache)):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


@needs_kernel
def test_export_reads_codes_and_equals_the_standard_lowering(cq_llama, tmp_path):
    kernel = lower(cq_llama.program, str(tmp_path / "kernel"), vq_lowering="kernel")
    standard = lower(cq_llama.program, str(tmp_path / "standard"), vq_lowering="dequantize")
    manifest = json.load(open(os.path.join(kernel, "llmc_onnx.json")))
    layers = cq_llama.program.num_layers
    assert manifest["fusions"]["CQCachedAttention"] == layers and manifest["parity"]["greedy_identical"]
    assert manifest["cache_buffers"] == "shared"
    assert "CQAttention" not in json.load(open(os.path.join(standard, "llmc_onnx.json")))["fusions"]
    graph = onnx.load(os.path.join(kernel, "model.onnx"), load_external_data=False).graph
    ops = collections.Counter(n.op_type for n in graph.node if n.domain == "llmc")
    assert ops == {"CQCachedAttention": layers}  # encoding and the cache's concatenation are in the op
    # and the query's rotation (the op takes q before RoPE with the tables of its positions, inputs 14 and 15) and
    # the split of the merged q/k/v projection (q is the packed projection, no key and value inputs)
    attention = [n for n in graph.node if n.op_type == "CQCachedAttention"]
    assert [(len(n.input), n.input[1], n.input[2]) for n in attention] == [(15, "", "")] * layers
    # the key tables are RoPE's (cos of cat([f, f]), the signed sin of such a sin): the op reads half of each row
    assert [onnx.helper.get_node_attr_value(n, "rope_halves") for n in attention] == [1] * layers
    assert not any(n.op_type in ("RotaryEmbedding", "Split") and attention[0].input[0] in n.output or
                   n.op_type == "RotaryEmbedding" for n in graph.node)
    assert manifest["fusions"]["PackedQKV"] == layers
    # the RoPE tables of the cached keys and of q (cos and sin each) gathered from constant tables: one Cos and one
    # Sin left, over constants, which the session folds at load
    assert manifest["fusions"]["RotaryTables"] == 4
    assert sum(n.op_type == "Cos" for n in graph.node) == sum(n.op_type == "Sin" for n in graph.node) == 1
    # and the signed sins (rotate_half's) of both gathered from one signed table: the one Neg left is the table's
    assert manifest["fusions"]["RotarySignedSin"] == 2 and sum(n.op_type == "Neg" for n in graph.node) == 1
    assert not any(n.op_type in ("ArgMin", "Concat") for n in graph.node if "present" in "".join(n.output))
    a, b = OrtModel(kernel), OrtModel(standard)
    for x, y in zip(_steps(a.step, a.empty_cache), _steps(b.step, b.empty_cache)):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


@needs_kernel
def test_cached_attention_writes_the_codes_in_place_or_after_a_copy(cq_llama, tmp_path):
    """Bound to one buffer per cache tensor (OrtModel), a step writes its codes into the buffers it is given; run
    without binding, ONNX Runtime allocates the present and the op copies the past into it first. Both give
    torch's codes and logits."""
    import numpy as np

    kernel = OrtModel(lower(cq_llama.program, str(tmp_path / "kernel"), vq_lowering="kernel"))
    ids, mask = left_pad([[5, 17, 99, 3, 42, 8, 200, 31, 77], [150, 9, 33]], pad_id=0)
    pos = position_ids_from_mask(mask)
    _, shared = kernel.step(ids, mask, pos, kernel.empty_cache(2))
    _, plain = cq_llama.step(ids, mask, pos, cq_llama.empty_cache(2))
    names = [c.input_name for c in kernel.cache_layout]
    books = [attr_tensor(cq_llama.program.gm, f"model.layers.{c.layer}.self_attn.cq_{c.kind}.codebooks")
             for c in kernel.cache_layout]

    def same(codes, ref, book):  # the same centroids: this calibration leaves some centroids within 3e-8 of
        # another, where the kernel's and torch's sums may round the tie either way
        return torch.allclose(decode(torch.as_tensor(codes), book), decode(ref, book), rtol=0, atol=1e-6)

    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy(),
             **{n: np.zeros((2, *t.shape[1:2], 0, *t.shape[3:]), np.uint8) for n, t in zip(names, kernel.empty_cache(2))}}
    unbound = kernel.session.run(None, feeds)[1:]  # fresh presents: the (empty) past copied, then the codes
    T = mask.shape[1]
    for buffer, fresh, ref, book in zip(shared, unbound, plain, books):
        assert buffer.shape()[2] > T and fresh.shape[2] == T  # a buffer with room to spare; an exact present
        assert np.array_equal(buffer.numpy()[:, :, :T], fresh) and same(fresh, ref, book)
    new = torch.tensor([[7], [8]])
    mask2 = torch.cat([mask, torch.ones_like(new)], 1)
    pos2 = position_ids_from_mask(mask2)[:, -1:]
    logits, again = kernel.step(new, mask2, pos2, shared)
    assert all(a is b for a, b in zip(again, shared))  # written in place
    ref_logits, ref_cache = cq_llama.step(new, mask2, pos2, plain)
    feeds = {"input_ids": new.numpy(), "attention_mask": mask2.numpy(), "position_ids": pos2.numpy(),
             **dict(zip(names, unbound))}
    out = kernel.session.run(None, feeds)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(out[0]), ref_logits, atol=1e-4, rtol=1e-4)
    for buffer, fresh, ref, book in zip(again, out[1:], ref_cache, books):
        assert np.array_equal(buffer.numpy()[:, :, :T + 1], fresh) and same(fresh, ref, book)
    # a prompt of 140 tokens: 280 query rows a KV head, two blocks of rows gathered from and scattered to [B, S, Hq*D]
    ids = torch.randint(3, 256, (1, 140), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    args = (ids, mask, position_ids_from_mask(mask))
    logits, shared = kernel.step(*args, kernel.empty_cache(1))
    ref_logits, plain = cq_llama.step(*args, cq_llama.empty_cache(1))
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    # then decode steps at batch 1 over that past
    for token in (7, 8):
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
        args = (torch.tensor([[token]]), mask, position_ids_from_mask(mask)[:, -1:])
        logits, shared = kernel.step(*args, shared)
        ref_logits, plain = cq_llama.step(*args, plain)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
