"""cq_kv / uniform_kv: the code cache in the graph and in ONNX, its error, bad configurations."""

import os

import pytest
import torch

import llmc
from llmc.errors import ConfigError, PassOrderError
from llmc.generation import position_ids_from_mask
from llmc.passes_base import parse_pass_spec
from llmc.testing import sqnr, tiny_tokenizer

PROMPTS = [[5, 17, 99, 3, 42, 8, 200, 31, 77], [150, 9, 33]]


def _calib(n=8, length=64):
    return [torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(100 + i)) for i in range(n)]


@pytest.fixture(scope="module")
def cq_models(tiny_models):
    """FP, 2c8b (4 bits/channel) and 4c8b (2 bits) of the tiny llama; 4c8b with a float window of 4
    (and a sink of 2), with a sink of 2 alone: all with exact_current=false, so that one forward
    exercises the codes; and 4c8b at the default exact_current=true."""
    m = tiny_models["llama"]
    strict = "tokens=512,exact_current=false"  # every token, new ones too, read back from codes
    specs = {"fp": [], "2c8b": [f"cq_kv:config=2c8b,{strict}"], "4c8b": [f"cq_kv:config=4c8b,{strict}"],
             "4c8b_w4": [f"cq_kv:config=4c8b,{strict},window=4,sink=2"],
             "4c8b_s2": [f"cq_kv:config=4c8b,{strict},sink=2"],
             "4c8b_x": ["cq_kv:config=4c8b,tokens=512"]}
    return {k: llmc.compile(m, passes=v, calibration=_calib(), tokenizer=tiny_tokenizer(), progress=False)
            for k, v in specs.items()}


def _logits(cm, ids):
    mask = torch.ones_like(ids)
    return cm.step(ids, mask, position_ids_from_mask(mask), cm.empty_cache(ids.shape[0]))


def test_cache_is_codes_in_graph_and_layout(cq_models):
    cm = cq_models["4c8b"]
    layout = cm.program.cache_layout
    assert len(layout) == 4 and all(c.dtype == "uint8" and c.shape[1:] == (2, "past_sequence_length", 4)
                                    for c in layout)
    assert "before RoPE" in layout[0].meaning and "CQ 4c8b" in layout[0].meaning
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    _, present = _logits(cm, ids)
    assert [(p.dtype, tuple(p.shape)) for p in present] == [(torch.uint8, (2, 2, 6, 4))] * 4
    ops = {str(n.target) for n in cm.program.gm.graph.nodes if n.op == "call_function"}
    assert {"llmc.cq_encode.default", "llmc.cq_decode.default"} <= ops
    assert cm.program.history[-1].stats["bits_per_channel"] == 2.0
    # 4 codebooks of [H=2, G=4, K=256, c=4]
    assert cm.program.history[-1].stats["codebook_values"] == 4 * 2 * 4 * 256 * 4


def test_error_is_bounded_and_shrinks_with_bits(cq_models):
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = _logits(cq_models["fp"], ids)[0]
    s4, s2 = sqnr(ref, _logits(cq_models["2c8b"], ids)[0]), sqnr(ref, _logits(cq_models["4c8b"], ids)[0])
    assert 15 < s4 < 60 and 8 < s2 < s4  # lossy, far from broken, and 4 bits beats 2 bits
    # the window keeps the last 4 positions in float: closer to FP than without it
    assert sqnr(ref, _logits(cq_models["4c8b_w4"], ids)[0]) > s2


@pytest.mark.parametrize("name", ["4c8b", "4c8b_s2", "4c8b_w4"])
def test_chunked_decode_matches_one_step_when_window_allows(cq_models, name):
    cm = cq_models[name]
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    pos = position_ids_from_mask(mask)
    full, _ = cm.step(ids, mask, pos, cm.empty_cache(2))
    if name != "4c8b_w4":  # codes (and the first positions) do not depend on how the sequence was chunked
        a, cache = cm.step(ids[:, :7], mask[:, :7], pos[:, :7], cm.empty_cache(2))
        b, _ = cm.step(ids[:, 7:], mask, pos[:, 7:], cache)
        torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=1e-5)
        if name == "4c8b_s2":  # the first two positions attend to float keys only: exactly FP
            ref, _ = cq_models["fp"].step(ids, mask, pos, cq_models["fp"].empty_cache(2))
            torch.testing.assert_close(full[:, :2], ref[:, :2], atol=1e-5, rtol=1e-5)
            assert cache[4].shape == (2, 2, 2, 16) and cache[4].dtype == torch.float32
            assert not torch.allclose(full[:, 2:], ref[:, 2:], atol=1e-3)
    else:  # token by token, every query sees its last 4 keys in float: the window's decode semantics
        ref, _ = cq_models["fp"].step(ids, mask, pos, cq_models["fp"].empty_cache(2))
        cache, outs = cm.empty_cache(2), []
        for t in range(12):
            out, cache = cm.step(ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], cache)
            outs.append(out)
        assert cache[4].shape == (2, 2, 4, 16) and cache[-1].shape == (2, 2, 2, 16)  # windows, then sinks
        outs = torch.cat(outs, 1)
        # while the whole sequence fits in the window nothing is quantized; after that it is
        torch.testing.assert_close(outs[:, :4], ref[:, :4], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(outs[:, 4:], ref[:, 4:], atol=1e-3)


def test_exact_current_reads_only_earlier_steps_from_codes(cq_models):
    """exact_current: a prefill attends in float (logits = FP) but stores the same codes; the next
    step reads those codes."""
    cm, fp, strict = cq_models["4c8b_x"], cq_models["fp"], cq_models["4c8b"]
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    pos = position_ids_from_mask(mask)
    a, cache = cm.step(ids[:, :8], mask[:, :8], pos[:, :8], cm.empty_cache(2))
    ref, fp_cache = fp.step(ids[:, :8], mask[:, :8], pos[:, :8], fp.empty_cache(2))
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)
    _, strict_cache = strict.step(ids[:, :8], mask[:, :8], pos[:, :8], strict.empty_cache(2))
    assert cache[0].dtype == torch.uint8 and torch.equal(cache[0], strict_cache[0])  # layer 0: same inputs, same codes
    b, _ = cm.step(ids[:, 8:], mask, pos[:, 8:], cache)
    ref_b, _ = fp.step(ids[:, 8:], mask, pos[:, 8:], fp_cache)
    assert 5 < sqnr(ref_b, b) < 60  # the past now comes from 2-bit codes


def test_cq_error_below_uniform_at_equal_bits_on_real_kv(tiny_models):
    """On keys/values collected from the model, 2-bit CQ reconstructs better than 2-bit uniform."""
    from llmc.api import to_program
    from llmc.ops.cq import decode, encode
    from llmc.kv_cache import cache_sites, collect_kv
    from llmc.passes.uniform_kv import calibrate_channel_ranges

    program = to_program(tiny_models["llama"])
    sites = cache_sites(program.gm, program.cache_layout)
    data = collect_kv(program.gm, sites, _calib(16), lambda b: program.empty_cache(b, 0), fisher=False,
                      max_tokens=10 ** 6, seed=0, progress=False)
    from llmc.ops.cq import weighted_kmeans

    for kind in ("key", "value"):
        x = data[f"0.{kind}"]["x"]  # [N, H*D], N = 1024
        fit, test = x[:768], x[768:]
        H, D, c = 2, 16, 4
        cent, _ = weighted_kmeans(fit.view(-1, H * D // c, c).transpose(0, 1), 256, iters=20)
        cb = cent.view(H, D // c, 256, c)
        xt = test.view(1, -1, H, D).transpose(1, 2)
        cq = decode(encode(xt, cb), cb).transpose(1, 2).reshape(-1, H * D)
        if kind == "key":  # per channel, ranges calibrated on the fit split
            lo, scale = calibrate_channel_ranges(fit, 2, D)
            lo, scale = lo.reshape(1, -1), scale.reshape(1, -1)
        else:  # per token
            lo = test.view(-1, H, D).amin(-1, keepdim=True)
            scale = ((test.view(-1, H, D).amax(-1, keepdim=True) - lo) / 3).clamp_min(1e-8)
            lo, scale = lo.expand(-1, H, D).reshape(-1, H * D), scale.expand(-1, H, D).reshape(-1, H * D)
        uni = torch.clamp(torch.round((test - lo) / scale), 0, 3) * scale + lo
        err_cq, err_uni = (cq - test).pow(2).mean(), (uni - test).pow(2).mean()
        assert err_cq < 0.8 * err_uni, (kind, float(err_cq), float(err_uni))


def test_onnx_export_carries_codes_and_decodes_like_torch(cq_models, tmp_path):
    import onnx

    from llmc.backends.onnxruntime import lower
    from llmc.backends.onnxruntime import OrtModel

    for name in ("4c8b", "4c8b_w4", "4c8b_x"):
        cm = cq_models[name]
        out = lower(cm.program, tmp_path / name)
        model = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)
        ins = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
        outs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
        assert ins["past_key_values.0.key"] == onnx.TensorProto.UINT8
        assert outs["present.1.value"] == onnx.TensorProto.UINT8
        ort_model = OrtModel(out)
        assert ort_model.generate(PROMPTS, 20, return_tokens=True) == cm.generate(PROMPTS, 20, return_tokens=True)
        if name == "4c8b_w4":
            assert ins["past_key_values.1.value_window"] == ins["past_key_values.1.value_sink"] == onnx.TensorProto.FLOAT
            assert ort_model.empty_cache(2)[-1].shape == (2, 2, 2, 16)


def test_uniform_baseline_simulates_quantized_cache(cq_models, tiny_models):
    cm = llmc.compile(tiny_models["llama"], passes=["uniform_kv:bits=2"], calibration=_calib(), progress=False)
    assert cm.program.cache_layout[0].dtype == "float32" and "uniform 2-bit" in cm.program.cache_layout[0].meaning
    # what a real cache of these codes holds: keys 2 bits, values 2 bits + an fp16 scale and zero per 16 channels
    kv = cm.program.size_report()["kv_cache"]
    assert kv["bits_per_channel"] == (2 + (2 + 32 / 16)) / 2 and kv["stored_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    ids = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    _, present = _logits(cm, ids)
    # values: per token, at most 4 distinct levels among a head's 16 channels
    assert max(len(torch.unique(present[1][0, 0, t])) for t in range(8)) <= 4
    # keys: per channel, at most 4 levels before RoPE -> check through the error instead
    ref = _logits(cq_models["fp"], ids)[0]
    assert 3 < sqnr(ref, _logits(cm, ids)[0]) < 40


def test_kivi_baseline_quantizes_leaving_tokens_once_and_keeps_the_tail_float(cq_models, tiny_models):
    """mode=kivi: needs no calibration; keys per channel over groups of tokens, values per token
    over groups of channels, the newest `residual` tokens (and an unfinished key group) in float."""
    from llmc.ops.kivi import quantized_length

    cm = llmc.compile(tiny_models["llama"], passes=["uniform_kv:mode=kivi,bits=2,group=4,value_group=8,residual=3"],
                      progress=False)
    assert "KIVI 2-bit" in cm.program.cache_layout[0].meaning
    assert cm.program.history[-1].stats["bits_per_channel"] == 2 + 16 / 4 + 16 / 8
    assert cm.program.size_report()["kv_cache"]["bits_per_channel"] == 2 + 16 / 4 + 16 / 8
    ids = torch.randint(3, 256, (1, 14), generator=torch.Generator().manual_seed(5))
    logits, present = _logits(cm, ids)
    _, fp_present = _logits(cq_models["fp"], ids)
    n = quantized_length(14, 4, 3)
    assert n == 8
    for p, f in zip(present[:2], fp_present[:2]):  # layer 0's keys and values depend on their token only
        torch.testing.assert_close(p[:, :, n:], f[:, :, n:])  # the float tail is exact
        assert (p[:, :, :n] - f[:, :, :n]).abs().max() > 1e-3  # the rest is quantized
    keys, values = present[0][0, 0, :n], present[1][0, 0, :n]
    assert max(len(torch.unique(keys[g * 4:(g + 1) * 4, ch])) for g in range(2) for ch in range(16)) <= 4
    assert max(len(torch.unique(values[t, g * 8:(g + 1) * 8])) for t in range(n) for g in range(2)) <= 4
    # the same 14 tokens fed as 6 + 5 + 3 through the cache: each position is quantized once, when
    # it leaves the tail, so layer 0's cache (which depends on the tokens only) is the same
    mask = torch.ones(1, 14, dtype=torch.long)
    cache = cm.empty_cache(1)
    for a, b in ((0, 6), (6, 11), (11, 14)):
        _, cache = cm.step(ids[:, a:b], mask[:, :b], position_ids_from_mask(mask[:, :b])[:, a:b], cache)
    for p, c in zip(present[:2], cache[:2]):
        torch.testing.assert_close(c, p)
    ref = _logits(cq_models["fp"], ids)[0]
    assert 5 < sqnr(ref, logits) < 60
    with pytest.raises(ConfigError, match="must divide head_dim 16"):
        llmc.compile(tiny_models["llama"], passes=["uniform_kv:mode=kivi,value_group=32"], progress=False)
    for spec, msg in [("uniform_kv:mode=dynamic", "'static' or 'kivi'"), ("uniform_kv:mode=kivi,group=0", "group >= 1")]:
        with pytest.raises(ConfigError, match=msg):
            parse_pass_spec(spec)


def test_kivi_exact_current_attends_in_float_and_stores_the_same_cache(cq_models, tiny_models):
    """mode=kivi,exact_current: a step's own tokens attend unquantized (prefill logits = FP), the
    cache written is the one the strict variant writes, and the next step reads it."""
    spec = "uniform_kv:mode=kivi,bits=2,group=4,value_group=8,residual=3"
    strict = llmc.compile(tiny_models["llama"], passes=[spec], progress=False)
    exact = llmc.compile(tiny_models["llama"], passes=[spec + ",exact_current=true"], progress=False)
    fp = cq_models["fp"]
    ids = torch.randint(3, 256, (1, 18), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    pos = position_ids_from_mask(mask)
    a, cache = exact.step(ids[:, :14], mask[:, :14], pos[:, :14], exact.empty_cache(1))
    ref, fp_cache = fp.step(ids[:, :14], mask[:, :14], pos[:, :14], fp.empty_cache(1))
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)
    _, strict_cache = strict.step(ids[:, :14], mask[:, :14], pos[:, :14], strict.empty_cache(1))
    for c, sc in zip(cache[:2], strict_cache[:2]):  # layer 0: same inputs, same quantized cache
        torch.testing.assert_close(c, sc)
    assert (cache[0] - fp_cache[0]).abs().max() > 1e-3  # and it is quantized
    b, _ = exact.step(ids[:, 14:], mask, pos[:, 14:], cache)
    ref_b, _ = fp.step(ids[:, 14:], mask, pos[:, 14:], fp_cache)
    assert 5 < sqnr(ref_b, b) < 60  # the past now comes from 2-bit groups


def test_composes_with_weight_quantization_and_saves(tiny_models, tmp_path):
    cm = llmc.compile(tiny_models["llama"], passes=["rtn_quant:bits=8,group=16", "cq_kv:config=2c8b,tokens=512"],
                      calibration=_calib(), tokenizer=tiny_tokenizer(), progress=False)
    ops = {str(n.target) for n in cm.program.gm.graph.nodes if n.op == "call_function"}
    assert {"llmc.nbits_linear.default", "llmc.cq_encode.default"} <= ops
    cm.save(tmp_path / "m")
    back = llmc.load(str(tmp_path / "m"))
    ids = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(_logits(back, ids)[0], _logits(cm, ids)[0])
    assert back.program.cache_layout == cm.program.cache_layout


def test_bad_configurations_are_refused(tiny_models):
    for spec, msg in [("cq_kv:config=abc", "must look like"), ("cq_kv:config=4c17b", "bits per code"),
                      ("cq_kv:window=-1", "window"), ("cq_kv:sink=-2", "sink"), ("cq_kv:config=1c8b,tokens=100", "at least the codebook")]:
        with pytest.raises(ConfigError, match=msg):
            parse_pass_spec(spec)
    with pytest.raises(ConfigError, match="must divide head_dim 16"):
        llmc.compile(tiny_models["llama"], passes=["cq_kv:config=3c8b"], calibration=_calib(2), progress=False)
    with pytest.raises(PassOrderError, match="calibration"):
        llmc.compile(tiny_models["llama"], passes=["cq_kv"], progress=False)
    with pytest.raises(PassOrderError, match="float_kv_cache"):
        llmc.compile(tiny_models["llama"], passes=["cq_kv", "uniform_kv"], calibration=_calib(2), progress=False)


def test_fisher_gradients_do_not_depend_on_which_tensors_are_probed(tiny_models):
    """dL/dK of layer 0 is the full gradient: probing later layers' K/V must not cut paths through them."""
    from llmc.api import to_program
    from llmc.kv_cache import cache_sites, collect_kv

    program = to_program(tiny_models["llama"])
    sites = cache_sites(program.gm, program.cache_layout)

    def fisher(chosen):
        out = collect_kv(program.gm, chosen, _calib(2), lambda b: program.empty_cache(b, 0), fisher=True,
                         max_tokens=10 ** 6, seed=0, progress=False)
        return out["0.key"]["fisher"]

    alone, together = fisher([sites[0]]), fisher(sites)
    assert alone.abs().sum() > 0
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-12)


def test_fisher_equals_autograd_on_the_source_model_and_leaves_weights_alone(tiny_models):
    """The Fisher weights are the squared gradients of the LM loss to the pre-RoPE keys (k_proj's output) of
    the source model, although collect_kv freezes the weights; it leaves no .grad and restores requires_grad."""
    import torch.nn.functional as F

    from llmc.api import to_program
    from llmc.kv_cache import cache_sites, collect_kv

    hf = tiny_models["llama"]
    program = to_program(hf)
    sites = cache_sites(program.gm, program.cache_layout)
    batches = _calib(1)
    out = collect_kv(program.gm, sites, batches, lambda b: program.empty_cache(b, 0), fisher=True,
                     max_tokens=10 ** 6, seed=0, progress=False)
    assert all(p.grad is None and p.requires_grad for p in program.gm.parameters())
    kept = {}
    hook = hf.model.layers[0].self_attn.k_proj.register_forward_hook(  # its paths run through layer 1
        lambda m, a, y: kept.setdefault("k", y).retain_grad())  # returns None: the output is unchanged
    try:
        x = batches[0]
        logits = hf(x).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
    finally:
        hook.remove()
        hf.zero_grad(set_to_none=True)
    ref = kept["k"].grad.reshape(-1, kept["k"].shape[-1]).pow(2)
    torch.testing.assert_close(out["0.key"]["fisher"], ref, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("fisher", [False, True])
def test_block_by_block_calibration_equals_the_whole_model(tiny_models, monkeypatch, fisher):
    """stream_kv runs the graph one decoder block at a time (with the Fisher pass, recomputing each block
    for its backward and the head on slices of positions); it yields each layer once, in the order its
    data is complete, and that data equals the whole-model passes' (the fallback for other graphs)."""
    import llmc.calibration.blocks as blocks
    import llmc.kv_cache as kv
    from llmc.api import to_program
    from llmc.errors import PassError

    program = to_program(tiny_models["llama"])
    sites = kv.cache_sites(program.gm, program.cache_layout)
    batches = _calib(5, length=20)  # 5 sequences: batches of 4 and 1, 30 sampled tokens each (all 20 of the second)

    def run():
        return list(kv.stream_kv(program.gm, sites, batches, lambda b: program.empty_cache(b, 0), fisher=fisher,
                                 max_tokens=60, seed=3, progress=False, batch_size=4))

    monkeypatch.setattr(kv, "_HEAD_POSITIONS", 7)  # 19 predicting positions: slices of 7, 7 and 5
    streamed = run()
    layers = sorted({s.layer for s in sites})
    assert [layer for layer, _ in streamed] == (layers[::-1] if fisher else layers)

    def refuse(gm):
        raise PassError("not a plain stack of blocks")

    monkeypatch.setattr(blocks, "split_blocks", refuse)
    whole = dict(run())
    for layer, data in streamed:
        assert data.keys() == whole[layer].keys() == {f"{layer}.key", f"{layer}.value"}
        for key, d in data.items():
            assert d["x"].shape == (30 + 20, program.cache_layout[0].shape[1] * program.cache_layout[0].shape[3])
            torch.testing.assert_close(d["x"], whole[layer][key]["x"], rtol=1e-5, atol=1e-6)
            if fisher:
                assert d["fisher"].abs().sum() > 0
                torch.testing.assert_close(d["fisher"], whole[layer][key]["fisher"], rtol=1e-4, atol=1e-12)
    assert all(p.requires_grad and p.grad is None for p in program.gm.parameters())
    assert "_probe" not in program.gm.code


def test_cache_dir_keeps_each_layer_and_resumes(tiny_models, tmp_path, monkeypatch):
    """With cache_dir, each layer's calibration data and codebooks are files as soon as they are made
    (with the umask's permissions); a rerun reuses the codebooks, a lost layer is re-learned from the
    kept data, and another config reuses the data: none of them runs the model again."""
    import llmc.passes.cq_kv.pass_ as cq_pass

    m = tiny_models["llama"]
    spec = f"cq_kv:config=4c8b,tokens=256,cache_dir={tmp_path}"
    first = llmc.compile(m, passes=[spec], calibration=_calib(4), progress=False)
    files = sorted(os.listdir(tmp_path))
    n_layers = m.config.num_hidden_layers
    assert sum(f.startswith("kv-") for f in files) == sum(f.startswith("cq-") for f in files) == n_layers
    umask = os.umask(0)
    os.umask(umask)
    assert all(os.stat(tmp_path / f).st_mode & 0o777 == 0o666 & ~umask for f in files)

    def no_model_runs(*a, **k):
        raise AssertionError("the model ran although every layer's data was kept")

    monkeypatch.setattr(cq_pass, "stream_kv", no_model_runs)
    os.remove(tmp_path / next(f for f in files if f.startswith("cq-") and f.endswith("layer0.safetensors")))
    again = llmc.compile(m, passes=[spec], calibration=_calib(4), progress=False)
    for name, t in first.program.gm.state_dict().items():
        if name.endswith("codebooks"):
            assert torch.equal(t, again.program.gm.state_dict()[name]), name
    other = llmc.compile(m, passes=[spec.replace("4c8b", "2c8b")], calibration=_calib(4), progress=False)
    assert other.program.history[-1].stats["bits_per_channel"] == 4
