"""structured_ffn: exactness, shapes and parameter counts, activation-aware init, recovery, export."""

import os

import pytest
import torch

import llmc
from llmc.errors import ConfigError
from llmc.passes.structured_ffn.pass_ import PREMERGE_MARGIN
from llmc.passes.structured_ffn.factors import (KINDS, cosine_alpha, factorize, merged_weight, plan,
                                                structured_linear)
from llmc.calibration import decode_inputs, kl_to_teacher
from llmc.passes_base import parse_pass_spec
from llmc.testing import count_ops, random_batches, tiny_model, tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


def _calibration(n=6, seq=48, seed=0):
    return random_batches(n, seq, seed)


def _logits(cm, ids):
    mask, pos = decode_inputs(ids)
    return cm.step(ids, mask, pos, cm.empty_cache(ids.shape[0]))[0]


@pytest.mark.parametrize("kind", KINDS)
def test_factorization_is_exact_on_structured_weights(kind):
    # a weight that already has the structure is reproduced by both inits (the budget keeps its rank)
    gen = torch.Generator().manual_seed(0)
    for M, N in [(96, 48), (48, 96)]:
        shape = plan(kind, M, N, 0.5)
        a, b = (torch.randn(s, generator=gen, dtype=torch.float64) for s in shape.factor_shapes())
        w = merged_weight(kind, a, b)
        x = torch.randn(3, 5, N, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(structured_linear(kind, x, a, b), x @ w.t())
        h = (x.flatten(0, 1).t() @ x.flatten(0, 1)) + torch.eye(N, dtype=torch.float64)
        for hh in (None, h):
            f1, f2 = factorize(shape, w, hh, damp=1e-9)
            torch.testing.assert_close(merged_weight(kind, f1, f2), w, atol=1e-5, rtol=1e-5)


def test_exact_equivalence_when_budget_keeps_full_rank():
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # rank-6 FFN weights: rank 21 (and 25 for the fused gate/up) keeps all of it
        for layer in model.model.layers:
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                M, N = lin.weight.shape
                lin.weight.copy_(torch.randn(M, 6, generator=gen) @ torch.randn(6, N, generator=gen) * 0.05)
    ids = torch.randint(3, 256, (2, 9), generator=gen)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    for init in ("svd", "aware"):
        cm = llmc.compile(model, passes=[f"structured_ffn:budget=0.5,init={init},premerge=never,damp=0"],
                          calibration=_calibration())
        st = cm.program.history[0].stats
        assert st["shapes"]["model.layers.1.mlp.gate_up"]["rank"] == 25
        torch.testing.assert_close(_logits(cm, ids), reference, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,matmuls,linears", [("lowrank", 0, 4), ("blockdense", 2, 2), ("blockshuffle", 4, 0)])
def test_shapes_param_counts_and_ops(kind, matmuls, linears, tiny_models, tiny_compiled):
    model = tiny_models["llama"]
    base_ops = count_ops(tiny_compiled.program.gm)
    cm = llmc.compile(model, passes=[f"structured_ffn:kind={kind},budget=0.5,init=svd,premerge=never"])
    st = cm.program.history[0].stats
    assert st["replaced"] == 3 and st["units"] == 2  # layer 1's gate+up (fused) and down; layer 0 stays dense
    gm = cm.program.gm
    total = 0
    for module, (M, N) in (("model.layers.1.mlp.gate_up", (256, 64)), ("model.layers.1.mlp.down_proj", (64, 128))):
        shape = plan(kind, M, N, 0.5)
        assert st["shapes"][module] == shape.to_json()
        got = tuple(tuple(getattr(gm.get_submodule(module), leaf).shape) for leaf in ("factor_in", "factor_out"))
        assert got == shape.factor_shapes()
        assert sum(int(torch.tensor(s).prod()) for s in got) == shape.params <= 0.5 * M * N
        total += shape.params
    assert st["structured_params"] == total and st["dense_params"] == 3 * 64 * 128
    ops = count_ops(gm)
    # 3 dense linears of layer 1 replaced
    assert ops["aten.linear.default"] == base_ops["aten.linear.default"] - 3 + linears
    assert ops["aten.matmul.default"] == matmuls
    assert ops["aten.slice.Tensor"] == base_ops["aten.slice.Tensor"] + 2  # gate and up halves
    assert not hasattr(gm.get_submodule("model.layers.1.mlp.down_proj"), "weight")
    assert hasattr(gm.get_submodule("model.layers.0.mlp.down_proj"), "weight")


def test_phi3_fused_gate_up_and_unfused_option(tiny_models):
    cm = llmc.compile(tiny_models["phi3"], passes=["structured_ffn:budget=0.4,init=svd,premerge=never"])
    assert set(cm.program.history[0].stats["shapes"]) == {"model.layers.1.mlp.gate_up_proj",
                                                         "model.layers.1.mlp.down_proj"}
    cm = llmc.compile(tiny_models["llama"], passes=["structured_ffn:fuse_gate_up=false,skip_first=false,init=svd"])
    assert cm.program.history[0].stats["units"] == 6


def test_aware_init_beats_svd_on_real_activations(tiny_models):
    from llmc.graph import get_attr_tensor, module_fqn
    from llmc.calibration import relative_output_error as output_error
    from llmc.calibration import input_grams

    model, calib = tiny_models["llama"], _calibration()
    program = llmc.compile(model).program
    linears = [n for n in program.gm.graph.nodes if n.target is torch.ops.aten.linear.default
               and ".mlp." in module_fqn(n)]
    grams = input_grams(program.gm, {n: n.name for n in linears}, calib, lambda b: program.empty_cache(b, 0),
                        progress=False)
    for n in linears:
        w, h = get_attr_tensor(program.gm, n.args[1]), grams[n.name]
        for kind in KINDS:
            shape = plan(kind, *w.shape, 0.4)
            plain = output_error(w, merged_weight(kind, *factorize(shape, w)), h)
            aware = output_error(w, merged_weight(kind, *factorize(shape, w, h)), h)
            assert 0 < aware < plain, (kind, module_fqn(n))
    # the pass reports the same measure per rewritten linear
    errs = [llmc.compile(model, passes=[f"structured_ffn:budget=0.4,init={init},premerge=never"],
                         calibration=calib).program.history[0].stats["init_output_error"] for init in ("svd", "aware")]
    assert all(errs[1][m] < errs[0][m] for m in errs[0])


def test_layerwise_init_streams_fine_tunes_and_resumes(tiny_models, tmp_path, monkeypatch):
    from llmc.passes.structured_ffn import local as structured_ffn_local

    model, calib = tiny_models["llama"], _calibration()
    ids = torch.cat(_calibration(n=2, seed=5))
    base = "structured_ffn:kind=blockdense,budget=0.4,premerge=never"
    # with one structured layer (skip_first) and no fine-tuning, the streamed statistics are the FP
    # model's: the same factors as init=aware
    aware = llmc.compile(model, passes=[base + ",init=aware"], calibration=calib)
    plain = llmc.compile(model, passes=[base + ",init=layerwise,local_epochs=0"], calibration=calib)
    torch.testing.assert_close(_logits(plain, ids), _logits(aware, ids))

    # every structured layer: fine-tuning lowers each layer's output error against the FP stream
    spec = base + ",skip_first=false,init=layerwise,local_epochs=6,local_lr=1e-3"
    tuned = llmc.compile(model, passes=[spec], calibration=calib)
    untuned = llmc.compile(model, passes=[base + ",skip_first=false,init=layerwise,local_epochs=0"],
                           calibration=calib)
    after, before = (cm.program.history[0].stats["init_output_error"] for cm in (tuned, untuned))
    assert set(after) == {"layer 0", "layer 1"}
    assert all(after[k] < 0.9 * before[k] for k in after), (before, after)

    # interrupted after layer 0, then run again: continues at layer 1 with the same result
    real = structured_ffn_local._fit_layer
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(structured_ffn_local, "_fit_layer", flaky)
    with pytest.raises(KeyboardInterrupt):
        llmc.compile(model, passes=[f"{spec},checkpoint_dir={tmp_path}"], calibration=calib)
    monkeypatch.setattr(structured_ffn_local, "_fit_layer", real)
    assert any(f.startswith("layerwise-") for f in os.listdir(tmp_path))
    resumed = llmc.compile(model, passes=[f"{spec},checkpoint_dir={tmp_path}"], calibration=calib)
    assert resumed.program.history[0].stats["init_output_error"] == after
    torch.testing.assert_close(_logits(resumed, ids), _logits(tuned, ids))


def test_alpha_schedule_endpoints():
    assert cosine_alpha(0, 10) == 1.0
    assert cosine_alpha(5, 10) == pytest.approx(0.5)
    assert cosine_alpha(10, 10) == 0.0 and cosine_alpha(12, 10) == 0.0
    assert cosine_alpha(0, 0) == 0.0  # no guided phase
    values = [cosine_alpha(t, 10) for t in range(11)]
    assert values == sorted(values, reverse=True)


def test_no_match_is_a_no_op(tiny_models, tiny_compiled):
    base = count_ops(tiny_compiled.program.gm)
    cm = llmc.compile(tiny_models["llama"], passes=["structured_ffn:targets=nothing_matches,init=svd"])
    rec = cm.program.history[0]
    assert rec.stats["replaced"] == 0 and rec.stats["modified"] is False
    assert count_ops(cm.program.gm) == base


@pytest.mark.parametrize("spec,msg", [
    ("structured_ffn:budget=0", "must be in \\(0, 1\\]"), ("structured_ffn:budget=1.5", "must be in \\(0, 1\\]"),
    ("structured_ffn:budget=-0.2", "must be in \\(0, 1\\]"), ("structured_ffn:kind=sparse", "not one of"),
    ("structured_ffn:steps=-1", "steps must be >= 0"), ("structured_ffn:init=pca", "not one of"),
    ("structured_ffn:local_epochs=-1", "local_epochs must be >= 0"), ("structured_ffn:local_lr=0", "local_lr")])
def test_bad_options(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_pass_spec(spec)


def test_impossible_shapes_and_missing_data(tiny_models):
    with pytest.raises(ConfigError, match="cannot be split into 3 input blocks"):
        llmc.compile(tiny_models["llama"], passes=["structured_ffn:kind=blockdense,blocks=3,init=svd"])
    with pytest.raises(ConfigError, match="gets rank 0"):
        llmc.compile(tiny_models["llama"], passes=["structured_ffn:budget=0.001,init=svd"])
    with pytest.raises(ConfigError, match="needs calibration data"):
        llmc.compile(tiny_models["llama"], passes=["structured_ffn:init=aware"])


def test_recovery_lowers_kl_removes_guides_and_resumes(tiny_models, tmp_path):
    model, calib = tiny_models["llama"], _calibration(n=4)
    ids = torch.cat(calib)
    with torch.no_grad():
        target = model(input_ids=ids).logits
    spec = ("structured_ffn:kind=lowrank,budget=0.3,init=aware,premerge=never,lr=1e-3,guided_fraction=0.3,"
            "batch_size=4,checkpoint_every=4")
    init_only = llmc.compile(model, passes=[spec], calibration=calib)
    recovered = llmc.compile(model, passes=[spec + ",steps=12"], calibration=calib)
    kl0 = float(kl_to_teacher(_logits(init_only, ids), target))
    kl1 = float(kl_to_teacher(_logits(recovered, ids), target))
    assert kl1 < 0.9 * kl0
    gm = recovered.program.gm
    ops = count_ops(gm)
    assert "aten.lerp.Tensor" not in ops and ops["aten.linear.default"] == count_ops(init_only.program.gm)[
        "aten.linear.default"]
    assert not any("guide_weight" in n or "alpha" in n for n, _ in gm.named_buffers()) and not any(
        "guide_weight" in n for n, _ in gm.named_parameters())
    stats = recovered.program.history[0].stats["recovery"]
    assert stats["steps"] == 12 and stats["resumed_from"] == 0

    # interrupted after step 6 (checkpoint at step 4), then run again: continues from 4, same result
    calls = {"n": 0}

    def flaky_teacher(input_ids, mask=None):
        calls["n"] += 1
        if calls["n"] > 6:
            raise KeyboardInterrupt
        return model(input_ids=input_ids, attention_mask=mask).logits

    ckpt = f"{spec},steps=12,checkpoint_dir={tmp_path}"
    with pytest.raises(KeyboardInterrupt):
        llmc.compile(model, passes=[ckpt], calibration=calib, teacher=flaky_teacher)
    assert any(f.startswith("recovery-") for f in os.listdir(tmp_path))
    resumed = llmc.compile(model, passes=[ckpt], calibration=calib)
    assert resumed.program.history[0].stats["recovery"]["resumed_from"] == 4
    torch.testing.assert_close(_logits(resumed, ids), _logits(recovered, ids))


def test_premerge_choice_recorded_and_merged_form_exact(tiny_models):
    model = tiny_models["llama"]
    factored = llmc.compile(model, passes=["structured_ffn:kind=blockshuffle,budget=0.4,init=svd,premerge=never"])
    merged = llmc.compile(model, passes=["structured_ffn:kind=blockshuffle,budget=0.4,init=svd,premerge=always"])
    assert count_ops(merged.program.gm)["aten.matmul.default"] == 0
    assert merged.program.history[0].stats["stored_params"] == 3 * 64 * 128
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(merged, ids), _logits(factored, ids), atol=1e-4, rtol=1e-4)
    # auto: each unit keeps the form that was faster on one token, and says so
    st = llmc.compile(model, passes=["structured_ffn:kind=blockshuffle,budget=0.4,init=svd,skip_first=false,"
                                     "premerge_repeats=5"]).program.history[0].stats
    assert len(st["premerge"]) == 4 and set(st["premerge_us"]) == set(st["premerge"])
    for module, choice in st["premerge"].items():
        us = st["premerge_us"][module]
        assert choice == ("merged" if us["merged"] < (1 - PREMERGE_MARGIN) * us["factored"] else "factored")
    assert st["merged"] == sum(c == "merged" for c in st["premerge"].values())
    # the cost depends on shapes only: both layers' units of a kind share one measurement and choice
    by_suffix = {}
    for module, us in st["premerge_us"].items():
        by_suffix.setdefault(module.split(".mlp.")[1], []).append((us, st["premerge"][module]))
    assert len(by_suffix) == 2 and all(len(v) == 2 and v[0] == v[1] for v in by_suffix.values())


def test_lowers_to_onnx_with_parity(tiny_models, tmp_path):
    from llmc.backends.onnxruntime import lower
    from llmc.backends.onnxruntime import OrtModel

    cm = llmc.compile(tiny_models["llama"], passes=["structured_ffn:kind=blockshuffle,budget=0.4,init=svd,"
                                                    "premerge=never"], tokenizer=tiny_tokenizer())
    out = lower(cm.program, tmp_path / "sffn")  # raises ParityError unless logits and greedy tokens agree
    prompts = [[5, 17, 99, 3], [150, 9, 33, 8, 200, 31]]
    assert OrtModel(out).generate(prompts, 12, return_tokens=True) == cm.generate(prompts, 12, return_tokens=True)
