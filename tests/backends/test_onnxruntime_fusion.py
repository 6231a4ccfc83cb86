"""Fused lowering of the ONNX backend: which rewrites fire on which families, parity, the `fuse` option."""

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

import llmc
from llmc.backends.onnxruntime import OrtModel, lower
from llmc.errors import ConfigError
from llmc.generation import SamplingConfig, generate_tokens, left_pad, position_ids_from_mask
from llmc.testing import FAMILY_ARCHITECTURES, TINY_ARCHITECTURES, tiny_model, tiny_tokenizer

PROMPTS = [[5, 17, 99, 3, 42, 8, 200, 31, 77], [150, 9, 33]]


def _manifest(folder):
    with open(os.path.join(folder, "llmc_onnx.json")) as f:
        return json.load(f)


def _graph(folder):
    import onnx

    return onnx.load(os.path.join(folder, "model.onnx"), load_external_data=False).graph


def _ops(folder):
    return Counter(n.op_type for n in _graph(folder).node)


def _max_logit_difference(folder_a, folder_b) -> float:
    """Largest |logit difference| of two ONNX folders on a left-padded batch of PROMPTS (real positions)."""
    ids, mask = left_pad(PROMPTS, pad_id=0)
    pos = position_ids_from_mask(mask)
    a, b = OrtModel(folder_a), OrtModel(folder_b)
    la, _ = a.step(ids, mask, pos, a.empty_cache(2))
    lb, _ = b.step(ids, mask, pos, b.empty_cache(2))
    return float((la - lb)[mask.bool()].abs().max())


def _fusions(simple, skip, rotary, merges, merged, attention=2, float_merges=0, float_merged=0, in_attention=0,
             packed=0, biased=0):
    """The fusion counts of a model without binary bases (their merges are tested in test_onnxruntime_qbb.py) nor
    RoPE tables left as tensors (a code cache's: test_onnxruntime_cq.py)."""
    return {"GroupQueryAttention": attention, "SimplifiedLayerNormalization": simple,
            "SkipSimplifiedLayerNormalization": skip, "RotaryEmbedding": rotary,
            "MatMulMerge": float_merges, "MatMulMerge.linears": float_merged,
            "MatMulNBitsMerge": merges, "MatMulNBitsMerge.linears": merged,
            "BinaryBasesLinearMerge": 0, "BinaryBasesLinearMerge.linears": 0,
            "RotaryInAttention": in_attention, "PackedQKV": packed, "BiasBeforeSplit": biased,
            "RotaryTables": 0, "RotarySignedSin": 0}


# The tiny models have 2 layers: 5 RMSNorms (the first reads the embeddings, the other 4 follow a
# residual add), 2 rotations (q, k) per layer, and q/k/v + gate/up as two groups of MatMulNBits
# siblings per layer. The rotations then move into the attention, which also reads the merged q/k/v
# projection unsplit, except: Qwen2's q/k/v biases are added after the split; Qwen3's RMSNorm on q and on k
# per layer keeps its rotations on [B, heads, S, D] before the attention. Phi-3's checkpoint already packs
# qkv_proj and gate_up_proj, so nothing is left to merge.
EXPECTED_RTN4 = {"llama": _fusions(1, 4, 0, 4, 10, in_attention=2, packed=2),
                 "mistral": _fusions(1, 4, 0, 4, 10, in_attention=2, packed=2),
                 "qwen2": _fusions(1, 4, 0, 4, 10, in_attention=2, packed=2, biased=2),
                 "qwen3": _fusions(5, 4, 4, 4, 10),
                 "phi3": _fusions(1, 4, 0, 0, 0, in_attention=2, packed=2)}


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_rewrites_fire_on_each_family_and_keep_parity(arch, tiny_models, tmp_path, one_thread):
    cm = llmc.compile(tiny_models[arch], passes=["rtn_quant:bits=4,group=16"], tokenizer=tiny_tokenizer(),
                      progress=False)
    out = lower(cm.program, tmp_path / arch)  # parity-checked (logits, last-position graph, greedy decode)
    manifest = _manifest(out)
    assert manifest["fuse"] is True and manifest["fusions"] == EXPECTED_RTN4[arch]
    parity = manifest["parity"]
    assert parity["greedy_identical"] and parity["logits_max_abs_diff"] < 1e-4
    ops = _ops(out)
    for op in ("Pow", "Sqrt", "Reciprocal", "Neg"):  # no unfused norm or rotation is left
        assert ops[op] == 0, (op, ops)
    assert ops["Cos"] == ops["Sin"] == 1  # the cos/sin caches, from constants (folded when the session loads)
    fusions = manifest["fusions"]
    linears = sum(n.target is torch.ops.llmc.nbits_linear.default for n in cm.program.gm.graph.nodes)
    assert ops["MatMulNBits"] == linears - fusions["MatMulNBitsMerge.linears"] + fusions["MatMulNBitsMerge"]
    assert ops["Split"] >= fusions["MatMulNBitsMerge"] - fusions["PackedQKV"]
    assert ops["RotaryEmbedding"] == fusions["RotaryEmbedding"]  # none is left beside the attention's own
    attention = [n for n in _graph(out).node if n.op_type == "GroupQueryAttention"]
    rotating = [n for n in attention if any(a.name == "do_rotary" and a.i == 1 for a in n.attribute)]
    assert len(rotating) == fusions["RotaryInAttention"] and all(n.input[7] and n.input[8] for n in rotating)
    assert sum(not n.input[1] and not n.input[2] for n in attention) == fusions["PackedQKV"]
    norms = [n for n in _graph(out).node if n.op_type.endswith("SimplifiedLayerNormalization")]
    assert norms and all(not name for n in norms for name in n.output[1:3])  # no statistics nobody reads
    assert OrtModel(out).generate(PROMPTS, 12, return_tokens=True) == cm.generate(PROMPTS, 12, return_tokens=True)


def test_fuse_off_writes_the_plain_graph_and_agrees_with_fused(tiny_models, tmp_path, one_thread):
    """Float32 with fold_norm_scales (norms without a gain: llmc's unit-scale rule), fused and not."""
    from llmc.backend import get_backend

    cm = llmc.compile(tiny_models["llama"], passes=["fold_norm_scales"], tokenizer=tiny_tokenizer(), progress=False)
    backend = get_backend("onnxruntime")
    assert backend.options({"fuse": "false"}).fuse is False and backend.options().fuse is True
    plain = backend.lower(cm.program, str(tmp_path / "plain"), {"fuse": "false"})
    fused = backend.lower(cm.program, str(tmp_path / "fused"))
    assert _manifest(plain)["fuse"] is False and _manifest(plain)["fusions"] == {}
    # float32: q/k/v and gate/up merge as MatMuls, not MatMulNBits
    assert _manifest(fused)["fusions"] == _fusions(1, 4, 0, 0, 0, float_merges=4, float_merged=10, in_attention=2,
                                                   packed=2)
    assert _manifest(fused)["cache_buffers"] == "shared" and _manifest(plain)["cache_buffers"] == "concatenated"
    for folder, shared in ((fused, True), (plain, False)):  # onnxruntime-genai binds one buffer where it may
        with open(os.path.join(folder, "genai_config.json")) as f:
            assert json.load(f)["search"]["past_present_share_buffer"] is shared
    assert _manifest(fused)["parity"]["greedy_identical"]
    plain_ops, fused_ops = _ops(plain), _ops(fused)
    assert not {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding"} & set(plain_ops)
    assert plain_ops["Pow"] == 5 and fused_ops["Pow"] == 0
    # attention is one node per layer, fed by the projections without a head split (no Transpose), and
    # nothing concatenates the cache
    assert fused_ops["GroupQueryAttention"] == 2 and fused_ops["Transpose"] == 0 and fused_ops["Softmax"] == 0
    assert plain_ops["Softmax"] == 2 and fused_ops["MatMul"] == 2 * 4 + 1  # q/k/v, o, gate/up, down; lm_head
    assert fused_ops["RotaryEmbedding"] == 0 and fused_ops["Split"] == 2  # the attention rotates; gate/up split
    assert _max_logit_difference(plain, fused) < 1e-5
    a, b = OrtModel(plain), OrtModel(fused)
    assert a.generate(PROMPTS, 16, return_tokens=True) == b.generate(PROMPTS, 16, return_tokens=True)
    with pytest.raises(ConfigError, match="fused lowering"):  # concatenated caches decode through step only
        next(a.greedy_tokens(PROMPTS, 4))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # the attention rotates (positions unread); a graph's RoPE
def test_greedy_tokens_decode_as_generate_tokens_over_step(arch, tiny_models, tmp_path, one_thread):
    """OrtModel's numpy decode loop (cache allocated once, buffers bound once) gives generate_tokens' tokens:
    left padding, rows stopping at different steps (padded after), all rows stopped before max_new_tokens."""
    cm = llmc.compile(tiny_models[arch], tokenizer=tiny_tokenizer(), progress=False)
    model = OrtModel(lower(cm.program, tmp_path / "m"))
    assert model.shared_buffers and model._positions_at_index == (arch == "llama")

    def reference(prompts, new, stop):
        return generate_tokens(model.step, model.empty_cache, prompts, SamplingConfig(new), 0, stop,
                               prefill_step=model.prefill_step)

    free = reference(PROMPTS, 16, ())
    assert [len(r) for r in free] == [16, 16] and free == cm.generate(PROMPTS, 16, return_tokens=True,
                                                                       ignore_eos=True)
    stop = {free[0][4], free[1][9]}
    want = reference(PROMPTS, 16, stop)
    assert all(len(r) < 16 for r in want) and len({len(r) for r in want}) == 2  # two stops, at different steps
    steps = list(model.greedy_tokens(PROMPTS, 16, pad_id=0, stop_ids=stop))
    assert all(s.dtype == np.int64 and s.shape == (2,) for s in steps)
    assert len(steps) == max(len(r) for r in want)  # it ends when the last row stops
    rows = np.stack(steps, 1).tolist()
    assert [r[:len(w)] for r, w in zip(rows, want)] == want and all(set(r[len(w):]) <= {0} for r, w in zip(rows, want))
    assert model.generate(PROMPTS, 16, return_tokens=True, stop=sorted(stop), ignore_eos=True) == want
    assert [s.tolist() for s in model.greedy_tokens(PROMPTS[1:], 7)] == [[t] for t in reference(PROMPTS[1:], 7, ())[0]]
    assert list(model.greedy_tokens(PROMPTS, 0)) == []
    with pytest.raises(ConfigError, match="max_new_tokens"):
        next(model.greedy_tokens(PROMPTS, -1))


def _chunked_steps(model):
    """Logits of a left-padded batch of 2: the prompts (real positions only), one token, a chunk of 3 tokens
    after the past, two more single tokens; and the cache tensors each step returned."""
    ids, mask = left_pad(PROMPTS, pad_id=0)
    logits, cache = model.step(ids, mask, position_ids_from_mask(mask), model.empty_cache(2))
    out, caches = [logits[mask.bool()]], [cache]
    for new in ([[7], [8]], [[11, 12, 13], [14, 15, 16]], [[1], [2]], [[3], [4]]):
        new = torch.tensor(new)
        mask = torch.cat([mask, torch.ones_like(new)], 1)
        logits, cache = model.step(new, mask, position_ids_from_mask(mask)[:, -new.shape[1]:], cache)
        out.append(logits)
        caches.append(cache)
    return out, caches


def test_group_query_attention_shares_the_cache_and_takes_chunks(tiny_models, tmp_path, one_thread):
    """The fused export reads and writes one buffer per cache tensor (bound as past and present); a chunk of
    several tokens after a past at batch 2, which ONNX Runtime's kernel takes at batch 1 only, runs row by row;
    every step equals the plain graph's (the logits each step returned are its own, though the buffers stay
    bound from step to step). The attention rotates q and k at their index in the buffer: the keys of the
    left-padded row are the plain graph's rotated by the row's padding."""
    cm = llmc.compile(tiny_models["qwen2"], tokenizer=tiny_tokenizer(), progress=False)
    fused = OrtModel(lower(cm.program, tmp_path / "fused"))
    plain = OrtModel(lower(cm.program, tmp_path / "plain", fuse=False))
    assert fused.shared_buffers and not plain.shared_buffers
    a, a_caches = _chunked_steps(fused)
    b, b_caches = _chunked_steps(plain)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    total = len(PROMPTS[0]) + 6
    real = torch.cat([left_pad(PROMPTS, pad_id=0)[1], torch.ones(2, 6, dtype=torch.long)], 1).bool().numpy()
    pad = len(PROMPTS[0]) - len(PROMPTS[1])
    angle = pad * tiny_models["qwen2"].model.rotary_emb.inv_freq.double().numpy()
    cos, sin = np.cos(angle), np.sin(angle)

    def shifted(k):  # keys rotated by `pad` more positions (rotate_half pairs i and i + D/2)
        lo, hi = np.split(k.astype(np.float64), 2, axis=-1)
        return np.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], -1)

    assert pad > 0 and {c.kind for c in fused.cache_layout} == {"key", "value"}
    for c, x, y in zip(fused.cache_layout, a_caches[-1], b_caches[-1]):  # the tokens' keys and values
        assert x.shape()[2] >= total and y.shape()[2] == total
        x, y = x.numpy()[:, :, :total].transpose(0, 2, 1, 3), y.numpy().transpose(0, 2, 1, 3)
        if c.kind == "key":
            y = np.stack([y[0], shifted(y[1])])
        np.testing.assert_allclose(x[real], y[real], atol=1e-5)
    # the last step wrote into the buffers it was given (they had room): the same OrtValues came back
    assert all(x is y for x, y in zip(a_caches[-1], a_caches[-2]))


def test_rotating_attention_refuses_positions_it_would_ignore(tiny_models, tmp_path, one_thread):
    """The fused export's attention rotates at buffer indices and ignores position_ids: positions that do not
    count each row's tokens from its first raise (at a prompt and at a decode step) instead of being ignored."""
    cm = llmc.compile(tiny_models["llama"], tokenizer=tiny_tokenizer(), progress=False)
    model = OrtModel(lower(cm.program, tmp_path / "fused"))
    assert model.manifest["fusions"]["RotaryInAttention"] == 2
    ids, mask = left_pad(PROMPTS, pad_id=0)
    pos = position_ids_from_mask(mask)
    with pytest.raises(ValueError, match="fuse=false"):
        model.step(ids, mask, pos + 3, model.empty_cache(2))
    shifted = pos.clone()
    shifted[1, -1] += 1  # one real token of the padded row
    with pytest.raises(ValueError, match="fuse=false"):
        model.step(ids, mask, shifted, model.empty_cache(2))
    logits, cache = model.step(ids, mask, pos, model.empty_cache(2))  # padding's own positions are free
    mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    nxt = logits[:, -1:].argmax(-1)
    with pytest.raises(ValueError, match="fuse=false"):
        model.step(nxt, mask, torch.full((2, 1), len(PROMPTS[0])), cache)  # the padded row's is 3
    model.step(nxt, mask, position_ids_from_mask(mask)[:, -1:], cache)
    one = torch.tensor([PROMPTS[1]])  # one row's decode step (checked in scalars)
    logits, cache = model.step(one, torch.ones_like(one), torch.arange(3)[None], model.empty_cache(1))
    with pytest.raises(ValueError, match="fuse=false"):
        model.step(logits[:, -1:].argmax(-1), torch.ones(1, 4, dtype=torch.long), torch.tensor([[4]]), cache)
    model.step(logits[:, -1:].argmax(-1), torch.ones(1, 4, dtype=torch.long), torch.tensor([[3]]), cache)


@pytest.mark.parametrize("arch", FAMILY_ARCHITECTURES)
def test_group_query_attention_on_the_other_families(arch, tmp_path, one_thread):
    """Every further family's attention becomes GroupQueryAttention with a shared cache and keeps parity (padded
    batch, greedy decode), except Gemma 2's soft-capped scores, which are not a scaled dot product."""
    cm = llmc.compile(tiny_model(arch), tokenizer=tiny_tokenizer(), progress=False)
    manifest = _manifest(lower(cm.program, tmp_path / arch))
    capped = arch == "gemma2"
    assert manifest["fusions"].get("GroupQueryAttention", 0) == (0 if capped else cm.program.num_layers)
    # the rotations move into the attention except where they are partial (StableLM, GPT-NeoX) or follow
    # per-head q/k norms (Gemma 3, Qwen3-MoE); it reads q/k/v packed (after their biases, added before the split:
    # StarCoder2) except after norms of the whole projections (OLMo 2)
    rotating = {"gemma", "olmo2", "granite", "starcoder2", "mixtral"}
    assert manifest["fusions"]["RotaryInAttention"] == (cm.program.num_layers if arch in rotating else 0)
    packed = {"gemma", "granite", "starcoder2", "mixtral"}
    assert manifest["fusions"]["PackedQKV"] == (cm.program.num_layers if arch in packed else 0)
    assert manifest["fusions"]["BiasBeforeSplit"] == (cm.program.num_layers if arch == "starcoder2" else 0)
    assert manifest["cache_buffers"] == ("concatenated" if capped else "shared")
    assert manifest["parity"]["greedy_identical"] and manifest["parity"]["logits_max_abs_diff"] < 1e-4


def test_group_query_attention_leaves_heads_it_cannot_take(tmp_path, one_thread):
    """ONNX Runtime's GroupQueryAttention needs a head size that is a multiple of 8: heads of 20 keep the standard
    attention and the concatenated cache, and the export keeps parity."""
    model = tiny_model("qwen2", hidden_size=80, num_attention_heads=4, num_key_value_heads=2)
    cm = llmc.compile(model, tokenizer=tiny_tokenizer(), progress=False)
    manifest = _manifest(lower(cm.program, tmp_path / "d20"))
    assert "GroupQueryAttention" not in manifest["fusions"] and manifest["cache_buffers"] == "concatenated"
    assert manifest["parity"]["greedy_identical"]


def test_cached_attention_writes_into_a_longer_buffer():
    """llmc::cached_attention with a past buffer longer than the past (its length comes from the mask): the step
    lands at [P, T), the rest of the buffer is kept, and the output equals attention over the plain past."""
    from llmc.ops.attention import attend

    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, S, P, C, D = 2, 4, 2, 2, 5, 9, 8
    q, key, value = (torch.randn(B, h, S, D, generator=gen) for h in (H, Hkv, Hkv))
    past_k, past_v = torch.randn(B, Hkv, C, D, generator=gen), torch.randn(B, Hkv, C, D, generator=gen)
    bias = torch.zeros(B, S, P + S)
    bias[0, :, :2] = torch.finfo(torch.float32).min  # left padding of row 0
    bias[:, 0, -1] = torch.finfo(torch.float32).min  # causal
    out, pk, pv = torch.ops.llmc.cached_attention(q, key, value, past_k, past_v, bias, 0.3)
    ref, rk, rv = attend(q, key, value, past_k[:, :, :P], past_v[:, :, :P], bias, 0.3)
    assert pk.shape == past_k.shape and rk.shape[2] == P + S
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(pk[:, :, :P + S], rk)
    torch.testing.assert_close(pv[:, :, :P + S], rv)
    torch.testing.assert_close(pk[:, :, P + S:], past_k[:, :, P + S:])
    torch.testing.assert_close(pk[:, :, P:P + S], key)


def test_merged_matmulnbits_with_int8_activations(tiny_models, tmp_path, one_thread):
    """rtn_quant 4-bit + int8 activations: q/k/v and gate/up merge, keep accuracy_level=4, and the file
    holds each code once (the merged tensors replace the originals)."""
    import onnx

    cm = llmc.compile(tiny_models["llama"], passes=["rtn_quant:bits=4,group=16", "int8_activations"],
                      tokenizer=tiny_tokenizer(), progress=False)
    fused = lower(cm.program, tmp_path / "fused")  # statistical parity (int8 rounding)
    plain = lower(cm.program, tmp_path / "plain", fuse=False)
    manifest = _manifest(fused)
    assert manifest["fusions"]["MatMulNBitsMerge"] == 4 and manifest["fusions"]["MatMulNBitsMerge.linears"] == 10
    assert manifest["parity"]["argmax_agreement"] >= 0.8
    graph = onnx.load(os.path.join(fused, "model.onnx"), load_external_data=False).graph
    attrs = [{a.name: a.i for a in n.attribute} for n in graph.node if n.op_type == "MatMulNBits"]
    assert [a["accuracy_level"] for a in attrs] == [4] * 8
    assert sorted(a["N"] for a in attrs) == [64, 64, 64, 64, 128, 128, 256, 256]  # o, down | q+k+v | gate+up

    def nbytes(folder, dtype=None):  # initializers, in the data file or inline
        inits = onnx.load(os.path.join(folder, "model.onnx"), load_external_data=False).graph.initializer
        return sum(int(np.prod(i.dims)) * onnx.helper.tensor_dtype_to_np_dtype(i.data_type).itemsize for i in inits
                   if dtype is None or i.data_type == dtype)

    assert nbytes(fused, onnx.TensorProto.UINT8) == nbytes(plain, onnx.TensorProto.UINT8)  # merged, not copied
    split_sizes = 10 * 8  # int64, one per merged layer; the rotary caches are computed at load
    assert nbytes(fused) <= nbytes(plain) + split_sizes
    # the merged graph computes what the separate layers computed, int8 rounding included
    assert _max_logit_difference(plain, fused) < 1e-3


def _nbits_node(helper, name, x, n, k, block, level):
    blocks = k // block
    rng = np.random.default_rng(len(name) + n + block + level)
    codes = rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8)
    scales = (rng.random(n * blocks, dtype=np.float32) + 0.5) / 16
    zeros = rng.integers(0, 256, (n, (blocks + 1) // 2), dtype=np.uint8)
    inits = [helper.make_tensor(f"{name}_{s}", dt, a.shape, a.reshape(-1).tolist())
             for s, dt, a in (("codes", 2, codes), ("scales", 1, scales), ("zp", 2, zeros))]
    node = helper.make_node("MatMulNBits", [x, *(i.name for i in inits)], [name], domain="com.microsoft", K=k, N=n,
                            bits=4, block_size=block, accuracy_level=level)
    return node, inits


def test_merge_only_siblings_of_one_layout(tmp_path):
    """MatMulNBits merge only with a shared input, K, bits, block size and accuracy level."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from llmc.backends.onnxruntime.fusion import fuse

    specs = [("a", "x", 8, 16, 0), ("b", "x", 4, 16, 0), ("c", "x", 8, 32, 0),  # a + b merge; c: other block size
             ("d", "y", 8, 16, 0), ("e", "x", 8, 16, 4), ("f", "x", 4, 16, 4)]  # d: other input; e + f merge
    nodes, inits = [], []
    for name, x, n, block, level in specs:
        node, init = _nbits_node(helper, name, x, n, 64, block, level)
        nodes += [node, helper.make_node("Relu", [name], [name + "_out"])]  # a consumer: graph outputs stay
        inits.extend(init)
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(v, TensorProto.FLOAT, [1, 3, 64]) for v in "xy"],
        [helper.make_tensor_value_info(s[0] + "_out", TensorProto.FLOAT, None) for s in specs], inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    path = str(tmp_path / "model.onnx")
    onnx.save(model, path, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    feeds = {v: np.random.default_rng(i).standard_normal((1, 3, 64)).astype(np.float32) for i, v in enumerate("xy")}
    before = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)
    counts = fuse(path, max_positions=16)
    assert counts["MatMulNBitsMerge"] == 2 and counts["MatMulNBitsMerge.linears"] == 4
    merged = onnx.load(path, load_external_data=False).graph
    assert sorted(next(a.i for a in n.attribute if a.name == "N") for n in merged.node
                  if n.op_type == "MatMulNBits") == [8, 8, 12, 12]
    after = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)
    for x, y in zip(before, after):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)


def test_norm_rewrites_do_not_fire_on_layer_norm_families(tmp_path, one_thread):
    """GPT-NeoX: LayerNorm with a bias (no RMSNorm to fuse) and partial rotary (a quarter of each head):
    only the rotation of that quarter is rewritten, and the export keeps parity."""
    cm = llmc.compile(tiny_model("gpt_neox"), tokenizer=tiny_tokenizer(), progress=False)
    out = lower(cm.program, tmp_path / "neox")
    manifest = _manifest(out)
    assert manifest["fusions"] == _fusions(0, 0, 4, 0, 0)  # one packed qkv projection: nothing to merge; the
    # rotations of a quarter of each head stay beside the attention
    assert manifest["parity"]["greedy_identical"] and manifest["parity"]["logits_max_abs_diff"] < 1e-4
    assert _ops(out)["LayerNormalization"] == 5
