"""qbb_quant: cascaded init, layer-wise refinement, scale calibration, resume, options, the rewrite."""

import pytest
import torch

import llmc
from llmc.calibration import decode_inputs, kl_to_teacher
from llmc.errors import ConfigError
from llmc.graph import attr_tensor
from llmc.ops.binary_bases import bits_per_weight, dequantize
from llmc.ops.binary_bases import unpack_signs as unpack
from llmc.passes.qbb_quant import calibrate as qbb_calibrate
from llmc.passes.qbb_quant import pass_ as qbb_pass
from llmc.passes.qbb_quant.bases import (RefinePlan, approx, cascaded_init, fit_scales, grid_scales, level_patterns,
                                         levels, refine, refine_joint, relative_error, round_to_levels)
from llmc.passes_base import parse_pass_spec
from llmc.testing import count_ops, random_batches, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

STAGE3 = "scale_steps=12,scale_samples=6,scale_candidates=12,scale_len=24,scale_batch=2"


def _weight(N=96, K=64, seed=0):
    """A weight-like matrix: heavy-tailed entries with row-dependent magnitude."""
    gen = torch.Generator().manual_seed(seed)
    return torch.distributions.StudentT(4.0).sample((N, K)) * (0.5 + torch.rand(N, 1, generator=gen)) * 0.02


def _moments(K, seed=0, tokens=2048):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, K, generator=gen) @ (torch.randn(K, K, generator=gen) / K ** 0.5)
    return X.t() @ X / tokens


def _kl(cm, ref, ids):
    mask, pos = decode_inputs(ids)
    with torch.no_grad():
        return float(kl_to_teacher(cm.step(ids, mask, pos, cm.empty_cache(ids.shape[0]))[0], ref))


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    fp = llmc.compile(model, [], tokenizer=tiny_tokenizer(), progress=False)
    ids = torch.cat(random_batches(2, 40, seed=11))
    mask, pos = decode_inputs(ids)
    with torch.no_grad():
        ref = fp.step(ids, mask, pos, fp.empty_cache(2))[0]
    return model, ids, ref


def _compile(model, spec, tmp_path, calib=True):
    return llmc.compile(model, [f"qbb_quant:{spec},checkpoint_dir={tmp_path}"], tokenizer=tiny_tokenizer(),
                        calibration=random_batches(4, 48) if calib else None, progress=False)


@pytest.mark.parametrize("groups", [1, 4])
def test_cascaded_init_error_decreases_with_every_basis(groups):
    torch.manual_seed(0)
    W = _weight()
    errors = [relative_error(W, approx(*cascaded_init(W, n, groups)[:2])) for n in range(1, 7)]
    assert all(b < 0.9 * a for a, b in zip(errors, errors[1:])), errors
    assert errors[0] < 0.5 and errors[3] < 0.14 and errors[5] < 0.1, errors
    B, S, R = cascaded_init(W, 3, groups)
    assert set(B.unique().tolist()) == {-1.0, 1.0} and (S > 0).all()
    torch.testing.assert_close(R[0], W)  # the first basis is fitted to W itself, the next to what it leaves
    torch.testing.assert_close(R[1], W - approx(B[:1], S[:1]))


def test_fit_scales_is_the_least_squares_optimum():
    torch.manual_seed(0)
    W = _weight()
    B, S, _ = cascaded_init(W, 3, 2)
    best = fit_scales(W, B, 2)
    e = relative_error(W, approx(B, best))
    assert e <= relative_error(W, approx(B, S))
    for _ in range(5):
        assert e < relative_error(W, approx(B, best * (1 + 0.01 * torch.randn_like(best))))
    H = _moments(64)
    bg = fit_scales(W, B, 2, H)  # groups coupled by H: each row one joint least-squares system
    eg = relative_error(W, approx(B, bg), H)
    for _ in range(5):
        assert eg < relative_error(W, approx(B, bg * (1 + 0.01 * torch.randn_like(bg))), H)
    separate = torch.cat([fit_scales(W[:, :32], B[..., :32], 1, H[:32, :32]),  # without coupling: per-group fits
                          fit_scales(W[:, 32:], B[..., 32:], 1, H[32:, 32:])], -1)
    torch.testing.assert_close(fit_scales(W, B, 2, torch.block_diag(H[:32, :32], H[32:, 32:])), separate,
                               rtol=1e-3, atol=1e-6)
    bh = fit_scales(W, B[:, :, :], 1, H)
    eh = relative_error(W, approx(B, bh), H)
    assert eh < relative_error(W, approx(B, fit_scales(W, B, 1)), H)


@pytest.mark.parametrize("mode,objective,groups,gain", [("alternate", "weight", 1, 0.85), ("alternate", "weight", 4, 0.85),
                                                         ("gd", "weight", 1, 0.95), ("gd", "input", 1, 0.95)])
def test_refinement_never_increases_the_layer_error(mode, objective, groups, gain):
    torch.manual_seed(0)
    W = _weight()
    H = _moments(64) if objective == "input" else None
    B, S, R = cascaded_init(W, 4, groups)
    plan = RefinePlan(mode=mode, rounds=3 if mode == "alternate" else 1, steps=30, lr=3e-3)
    B2, S2, errors = refine(W, B, S, R, plan, H)
    assert errors[0] == pytest.approx(relative_error(W, approx(B, S), H))
    assert all(b <= a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] == pytest.approx(relative_error(W, approx(B2, S2), H))
    assert errors[-1] < gain * errors[0], errors  # it really refines
    assert set(B2.unique().tolist()) <= {-1.0, 1.0}


def test_a_diagonal_input_weighting_keeps_exact_sign_updates():
    torch.manual_seed(0)
    W = _weight()
    d = _moments(64).diagonal() * (1 + 20 * (torch.arange(64) % 16 == 0))  # a few loud inputs
    B, S, R = cascaded_init(W, 3)
    torch.testing.assert_close(fit_scales(W, B, 1, d), fit_scales(W, B, 1, torch.diag(d)), rtol=1e-4, atol=1e-7)
    assert relative_error(W, approx(B, S), d) == pytest.approx(relative_error(W, approx(B, S), torch.diag(d)))
    B2, S2, errors = refine(W, B, S, R, RefinePlan(mode="alternate", rounds=3), d)
    assert all(b <= a for a, b in zip(errors, errors[1:])) and errors[-1] < 0.85 * errors[0], errors
    Bw, Sw, _ = refine(W, B, S, R, RefinePlan(mode="alternate", rounds=3))
    assert errors[-1] < relative_error(W, approx(Bw, Sw), d)  # it optimises the weighted error, not the plain one


def test_alternate_refuses_the_input_objective():
    W = _weight()
    B, S, R = cascaded_init(W, 2)
    with pytest.raises(ValueError, match="full H"):
        refine(W, B, S, R, RefinePlan(mode="alternate"), _moments(64))


def test_grid_scales_make_a_clipped_uniform_grid():
    torch.manual_seed(0)
    W = _weight()
    S = grid_scales(W, 3, 2)
    lv = levels(S).sort(-1).values  # [N, G, 8]
    delta = lv[..., -1:] / 7
    torch.testing.assert_close(lv, delta * torch.arange(-7, 8, 2, dtype=torch.float32), rtol=1e-5, atol=1e-7)
    top = W.reshape(96, 2, 32).abs().amax(-1)
    assert ((lv[..., -1] <= top * (1 + 1e-6)) & (lv[..., -1] >= 0.4 * top - 1e-9)).all()
    near = approx(round_to_levels(W, S)[0], S)
    full = approx(round_to_levels(W, grid_scales(W, 3, 2, ratios=(1.0,)))[0], grid_scales(W, 3, 2, ratios=(1.0,)))
    assert relative_error(W, near) < relative_error(W, full)  # the chosen clipping never rounds worse


def test_joint_rounding_takes_the_best_of_all_sign_combinations():
    torch.manual_seed(0)
    W = _weight(N=24, K=32)
    _, S, _ = cascaded_init(W, 3, 2)
    B, Q = round_to_levels(W, S)
    combos = torch.einsum("ing,ci->ngc", S, level_patterns(3)).repeat_interleave(16, dim=1)  # [N, K, 8]
    best = (W[..., None] - combos).abs().min(-1).values
    torch.testing.assert_close((W - approx(B, S)).abs(), best)
    torch.testing.assert_close(Q, approx(B, S))
    assert set(B.unique().tolist()) == {-1.0, 1.0}
    keep = torch.rand(24, 32) < 0.1
    _, Qk = round_to_levels(W, S, keep=keep)
    assert torch.equal(Qk[keep], W[keep]) and torch.equal(Qk[~keep], Q[~keep])


def test_error_feedback_rounding_lowers_the_output_error():
    torch.manual_seed(0)
    W, H = _weight(), _moments(64)
    S = grid_scales(W, 3, 1, H.diagonal())
    plain = relative_error(W, approx(round_to_levels(W, S)[0], S), H)
    B, Q = round_to_levels(W, S, H)
    fed = relative_error(W, approx(B, S), H)
    assert fed < 0.6 * plain, (fed, plain)
    torch.testing.assert_close(Q, approx(B, S))
    B_id, _ = round_to_levels(W, S, 3.0 * torch.eye(64))  # no correlation: nothing to carry, plain rounding
    assert torch.equal(B_id, round_to_levels(W, S)[0])


@pytest.mark.parametrize("objective", ["weight", "input"])
def test_joint_refinement_improves_on_alternate_and_never_rises(objective):
    torch.manual_seed(0)
    W = _weight()
    H = _moments(64) if objective == "input" else None
    B, S, R = cascaded_init(W, 4)
    e1 = relative_error(W, approx(B, S), H)
    Bj, Sj, Qj, errors = refine_joint(W, grid_scales(W, 4, 1, None if H is None else H.diagonal()), 4, H, best=e1)
    assert all(b <= a for a, b in zip(errors, errors[1:])) and errors[-1] < e1
    assert errors[-1] == pytest.approx(relative_error(W, approx(Bj, Sj), H))
    Ba, Sa, _ = refine(W, B, S, R, RefinePlan(mode="alternate", rounds=4), H.diagonal() if H is not None else None)
    ea = relative_error(W, approx(Ba, Sa), H)
    assert errors[-1] < (0.5 if objective == "weight" else 0.3) * ea, (errors, ea)
    assert refine_joint(W, Sj, 2, H, best=0.0) is None  # nothing beats a zero error: the caller keeps its own
    keep = torch.zeros_like(W, dtype=torch.bool).scatter(1, W.abs().topk(2, dim=1).indices, True)
    Bk, Sk, Qk, ek = refine_joint(W, Sj, 2, H, keep)
    What = torch.where(keep, Qk, approx(Bk, Sk))
    assert ek[-1] == pytest.approx(relative_error(W, What, H)) and ek[-1] < errors[-1]


def test_pass_rewrites_every_decoder_linear_with_packed_signs(setup, tmp_path):
    model, ids, ref = setup
    cm = _compile(model, "bases=3", tmp_path)
    ops = count_ops(cm.program.gm)
    assert ops.get("llmc.binary_bases_linear.default", 0) == 14 and ops.get("aten.linear.default", 0) == 1  # lm_head stays
    signs = attr_tensor(cm.program.gm, "model.layers.0.mlp.down_proj.signs")
    scales = attr_tensor(cm.program.gm, "model.layers.0.mlp.down_proj.scales")
    assert signs.dtype == torch.uint8 and signs.shape == (3, 64, 16)
    assert scales.dtype == torch.float16 and scales.shape == (3, 64, 1)
    stats = cm.program.history[-1].stats
    shapes = [s for m, s in cm.program.linear_shapes.items() if m != "lm_head"]
    expected = sum(N * K * bits_per_weight(3, K) for N, K in shapes) / sum(N * K for N, K in shapes)
    assert stats["bits_per_weight"] == pytest.approx(expected, abs=1e-4)
    assert cm.program.size_report()["decoder_linear_bits_per_param"] == pytest.approx(expected, abs=1e-4)
    assert stats["mean_relative_error"] < stats["mean_relative_error_stage1"]


def test_more_bases_and_stage_2_bring_the_model_closer(setup, tmp_path):
    model, ids, ref = setup
    kl = {spec: _kl(_compile(model, spec, tmp_path / str(i)), ref, ids)
          for i, spec in enumerate(("bases=2,stages=1", "bases=2", "bases=4,stages=1", "bases=4"))}
    assert kl["bases=4"] < kl["bases=4,stages=1"] < kl["bases=2"] < kl["bases=2,stages=1"], kl
    assert kl["bases=4"] < 0.06, kl


def test_grouped_scales_start_from_gptq_and_input_objective(setup, tmp_path):
    model, ids, ref = setup
    grouped = _compile(model, "bases=3,group=32", tmp_path / "g")
    scales = attr_tensor(grouped.program.gm, "model.layers.0.mlp.down_proj.scales")
    assert scales.shape == (3, 64, 4)
    plain = _compile(model, "bases=3", tmp_path / "p")
    assert (grouped.program.history[-1].stats["mean_relative_error"]
            < plain.program.history[-1].stats["mean_relative_error"])
    g = _compile(model, "bases=3,start=gptq,start_bits=4,start_group=32", tmp_path / "q")
    st = g.program.history[-1].stats
    assert all("error_to_fp" in m for m in st["matrices"].values())
    assert _kl(g, ref, ids) < 3 * _kl(plain, ref, ids)
    inp = _compile(model, "bases=3,refine=gd,objective=input,rounds=1,gd_steps=20", tmp_path / "i")
    assert inp.program.history[-1].stats["error_metric"] == "input"
    assert _kl(inp, ref, ids) < 0.2


def test_joint_rounding_with_error_feedback_in_the_pass(setup, tmp_path):
    model, ids, ref = setup
    kl = {spec: _kl(_compile(model, spec, tmp_path / str(i)), ref, ids) for i, spec in enumerate((
        "bases=2,refine=alternate", "bases=2", "bases=2,refine=gptq,objective=input"))}
    # a random tiny model has no outlier weights or correlated inputs for these to exploit (the unit tests above
    # show the gains); here the pass must run them and stay as close to the teacher
    assert max(kl.values()) < 1.15 * min(kl.values()) and kl["bases=2,refine=alternate"] < 0.2, kl
    cm = _compile(model, "bases=2,refine=gptq,objective=input,outliers=2,rounds=2", tmp_path / "o")
    st = cm.program.history[-1].stats
    m = st["matrices"]["model.layers.0.mlp.down_proj.weight"]
    assert len(m["errors"]) == 3 and m["errors"][-1] < m["error_stage1"]
    assert m["errors"][-1] == pytest.approx(m["error"], rel=1e-3)  # the stored model is the last round's
    assert _kl(cm, ref, ids) < kl["bases=2,refine=gptq,objective=input"]
    assert attr_tensor(cm.program.gm, "model.layers.0.mlp.down_proj.outlier_index").shape == (64, 2)


def test_outliers_are_kept_exactly_and_counted(setup, tmp_path):
    model, ids, ref = setup
    plain = _compile(model, "bases=2", tmp_path / "p")
    kept = _compile(model, "bases=2,outliers=2", tmp_path / "o")
    gm = kept.program.gm
    module = "model.layers.0.mlp.down_proj"
    idx = attr_tensor(gm, f"{module}.outlier_index")
    vals = attr_tensor(gm, f"{module}.outlier_values")
    assert idx.dtype == torch.int16 and idx.shape == (64, 2) and vals.dtype == torch.float16
    W = model.model.layers[0].mlp.down_proj.weight.detach()
    assert torch.equal(idx.long(), W.abs().topk(2, dim=1).indices.sort(dim=1).values)
    What = dequantize(attr_tensor(gm, f"{module}.signs"), attr_tensor(gm, f"{module}.scales"))
    What = What.scatter_add(1, idx.long(), vals.float())
    torch.testing.assert_close(What.gather(1, idx.long()), W.gather(1, idx.long()), rtol=2e-3, atol=1e-4)
    st, sp = kept.program.history[-1].stats, plain.program.history[-1].stats
    assert st["mean_relative_error"] < 0.8 * sp["mean_relative_error"]
    shapes = [s for m, s in kept.program.linear_shapes.items() if m != "lm_head"]
    expected = sum(N * K * (bits_per_weight(2, K) + 2 * 32 / K) for N, K in shapes) / sum(N * K for N, K in shapes)
    assert st["bits_per_weight"] == pytest.approx(expected, abs=1e-4)
    assert kept.program.size_report()["decoder_linear_bits_per_param"] == pytest.approx(expected, abs=1e-4)
    assert _kl(kept, ref, ids) < 0.9 * _kl(plain, ref, ids)
    mask, pos = decode_inputs(ids[:1, :1])
    with torch.no_grad():  # the decode path (table kernel) adds the same correction
        one = kept.step(ids[:1, :1], mask, pos, kept.empty_cache(1))[0]
        full = kept.step(ids[:1], *decode_inputs(ids[:1]), kept.empty_cache(1))[0]
    torch.testing.assert_close(one[0, 0], full[0, 0], rtol=1e-4, atol=1e-4)


def _mean(xs):
    return sum(xs) / len(xs)


def test_stage_3_calibrates_the_scales_towards_the_teacher(setup, tmp_path):
    model, ids, ref = setup
    base = _compile(model, "bases=2,refine=alternate", tmp_path)  # the paper's stage 2: more left for stage 3
    mse = _compile(model, f"bases=2,refine=alternate,stages=123,{STAGE3},scale_lr=1e-2", tmp_path)
    sc = mse.program.history[-1].stats["scale_calibration"]
    assert len(sc["losses"]) == 12 and len(sc["kept_scores"]) == 6 and sc["loss"] == "mse"
    assert sc["kept_scores"] == sorted(sc["kept_scores"], reverse=True)
    assert _mean(sc["losses"][-3:]) < 0.8 * _mean(sc["losses"][:3]), sc["losses"]  # KD-MSE on its data goes down
    assert _kl(mse, ref, ids) < 1.02 * _kl(base, ref, ids)  # and off it (random tokens) does not get worse
    kl = _compile(model, f"bases=2,refine=alternate,stages=123,{STAGE3},scale_lr=1e-2,scale_loss=kl", tmp_path)
    assert _kl(kl, ref, ids) < 0.97 * _kl(base, ref, ids)
    t0 = attr_tensor(base.program.gm, "model.layers.1.self_attn.q_proj.signs")
    t1 = attr_tensor(kl.program.gm, "model.layers.1.self_attn.q_proj.signs")
    assert torch.equal(t0, t1)  # stage 3 trains the scales only
    s0 = attr_tensor(base.program.gm, "model.layers.1.self_attn.q_proj.scales")
    s1 = attr_tensor(kl.program.gm, "model.layers.1.self_attn.q_proj.scales")
    assert not torch.equal(s0, s1)


def test_stage_3_can_train_the_norm_weights(setup, tmp_path, monkeypatch):
    model, ids, ref = setup
    spec = f"bases=2,refine=alternate,stages=123,{STAGE3},scale_lr=1e-2,scale_loss=kl"
    scales_only = _compile(model, spec, tmp_path)
    with_norms = _compile(model, spec + ",scale_norms=true", tmp_path)
    sc = with_norms.program.history[-1].stats["scale_calibration"]
    norms = [n for n, p in with_norms.program.gm.named_parameters() if p.dim() == 1 and "norm" in n]
    assert sc["norms"] == len(norms) == 2 * 2 + 1  # two per layer and the final one
    fp = dict(model.named_parameters())
    for n in norms:
        assert torch.equal(attr_tensor(scales_only.program.gm, n), fp[n])  # the paper's stage 3 leaves them
        assert not torch.equal(attr_tensor(with_norms.program.gm, n), fp[n])
    assert _kl(with_norms, ref, ids) < 0.97 * _kl(scales_only, ref, ids)
    # interrupted and resumed, the norms come back from the checkpoint with the scales
    _interrupted_in_stage_3(monkeypatch, lambda: _compile(model, spec + ",scale_norms=true", tmp_path / "r"))
    resumed = _compile(model, spec + ",scale_norms=true", tmp_path / "r")
    for n in norms + ["model.layers.1.self_attn.q_proj.scales"]:
        assert torch.equal(attr_tensor(resumed.program.gm, n), attr_tensor(with_norms.program.gm, n))


def _interrupted_in_stage_3(monkeypatch, compile_):
    """Run `compile_` with stage 3 interrupted at its 11th step (after the checkpoint of step 10)."""
    grads = qbb_calibrate.Student.factor_grads
    steps = {"n": 0}

    def flaky_grads(self):
        steps["n"] += 1
        if steps["n"] == 11:
            raise KeyboardInterrupt("stop in stage 3")
        return grads(self)

    monkeypatch.setattr(qbb_calibrate.Student, "factor_grads", flaky_grads)
    with pytest.raises(KeyboardInterrupt):
        compile_()
    monkeypatch.setattr(qbb_calibrate.Student, "factor_grads", grads)


def test_stage_3_sign_changes_are_a_bounded_v_step(setup, tmp_path, monkeypatch):
    model, ids, ref = setup
    spec = f"bases=2,outliers=1,stages=123,{STAGE3},scale_lr=1e-2,scale_loss=kl"
    scales_only = _compile(model, spec, tmp_path / "s")
    changed_spec = spec + ",sign_change=0.002,sign_step=0.3"
    moved = _compile(model, changed_spec, tmp_path / "f")
    sc = moved.program.history[-1].stats["scale_calibration"]
    assert len(sc["changed_per_step"]) == 12 and sc["weights_changed"] == sum(sc["changed_per_step"]) > 0
    gm0, gm1 = scales_only.program.gm, moved.program.gm
    changed = weights = 0
    for name in [n for n in dict(gm1.named_buffers()) if n.endswith(".signs")]:
        a, b = unpack(attr_tensor(gm0, name)), unpack(attr_tensor(gm1, name))
        changed += int((a != b).any(0).sum())
        weights += a[0].numel()
        module = name.rpartition(".")[0]
        idx = attr_tensor(gm1, f"{module}.outlier_index").long()
        rows = torch.arange(a.shape[1])[:, None]
        assert torch.equal(a[:, rows, idx], b[:, rows, idx])  # a kept outlier's signs never change
        assert int((a != b).any(0).sum()) <= 12 * int(0.002 * a[0].numel())  # per matrix, per step at most
    assert 0 < changed <= sc["weights_changed"]
    # on this random model it need not beat scales only, but it must not break the model
    assert _kl(moved, ref, ids) < 2 * _kl(scales_only, ref, ids)
    _interrupted_in_stage_3(monkeypatch, lambda: _compile(model, changed_spec, tmp_path / "r"))
    resumed = _compile(model, changed_spec, tmp_path / "r")
    assert resumed.program.history[-1].stats["scale_calibration"]["changed_per_step"] == sc["changed_per_step"]
    for name, t in gm1.named_buffers():
        assert torch.equal(t, attr_tensor(resumed.program.gm, name)), name


def test_stage_3_on_a_data_set(setup, tmp_path, text_file):
    model, ids, ref = setup
    tuned = _compile(model, f"bases=2,stages=123,{STAGE3},scale_lr=1e-2,scale_data={text_file}", tmp_path)
    sc = tuned.program.history[-1].stats["scale_calibration"]
    assert sc["data"] == text_file and "kept_scores" not in sc
    assert _mean(sc["losses"][-3:]) < 0.8 * _mean(sc["losses"][:3]), sc["losses"]


def _state(cm):
    return {k: v.clone() for k, v in cm.program.state_tensors().items() if k.endswith(("signs", "scales"))}


def test_deterministic_and_resumable_after_interruption(setup, tmp_path, monkeypatch):
    model, ids, ref = setup
    spec = f"bases=2,stages=123,{STAGE3}"
    full = _state(_compile(model, spec, tmp_path / "a"))
    again = _state(_compile(model, spec, tmp_path / "b"))
    assert all(torch.equal(full[k], again[k]) for k in full)

    real = qbb_pass.quantize_matrix
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt("stop in layer 1")
        return real(*a, **k)

    monkeypatch.setattr(qbb_pass, "quantize_matrix", flaky)
    with pytest.raises(KeyboardInterrupt):
        _compile(model, spec, tmp_path / "c")
    monkeypatch.setattr(qbb_pass, "quantize_matrix", real)

    _interrupted_in_stage_3(monkeypatch, lambda: _compile(model, spec, tmp_path / "c"))
    counted = {"n": 0}

    def counting(*a, **k):
        counted["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(qbb_pass, "quantize_matrix", counting)
    resumed = _state(_compile(model, spec, tmp_path / "c"))
    assert counted["n"] == 0  # every matrix came from the checkpoint
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_save_load_round_trip_is_exact(setup, tmp_path):
    model, ids, ref = setup
    cm = _compile(model, "bases=3,group=16", tmp_path / "ck")
    cm.save(str(tmp_path / "out"))
    back = llmc.load(str(tmp_path / "out"))
    a, b = _state(cm), _state(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    mask, pos = decode_inputs(ids)
    with torch.no_grad():
        torch.testing.assert_close(back.step(ids, mask, pos, back.empty_cache(2))[0],
                                   cm.step(ids, mask, pos, cm.empty_cache(2))[0], rtol=0, atol=0)
    w = dequantize(a["model.layers.0.self_attn.q_proj.signs"], a["model.layers.0.self_attn.q_proj.scales"])
    assert w.shape == (64, 64)


@pytest.mark.parametrize("bad,message", [
    ("bases=0", "bases must be in 1..8"), ("bases=9", "bases must be in 1..8"),
    ("group=12", "multiple of 8"), ("stages=2", "includes 1"), ("stages=14", "digits"),
    ("refine=newton", "refine: 'newton' is not one of alternate, gd"), ("objective=input,refine=alternate", "needs refine=gptq"),
    ("objective=input,refine=gd,group=16", "group=0"),  ("start=awq", "start: 'awq' is not one of fp, gptq"),
    ("start_bits=5", "start_bits"), ("start_group=48", "power of two"), ("scale_loss=l1", "scale_loss"),
    ("scale_samples=8,scale_candidates=4", "scale_candidates"), ("rounds=0", "rounds must be >= 1"),
    ("gd_lr=0", "gd_lr must be > 0"), ("sign_change=1", "fraction of weights"), ("sign_step=0", "sign_step must be > 0"),
    ("sign_change=0.01", "add 3 to stages"), ("targets=(", "regular expression"), ("outliers=-1", "outliers must be >= 0"),
])
def test_bad_options_fail_with_a_clear_message(bad, message):
    with pytest.raises(ConfigError, match=message):
        parse_pass_spec(f"qbb_quant:{bad}")


def test_a_group_that_does_not_divide_and_missing_data_are_reported(setup, tmp_path):
    model, _, _ = setup
    with pytest.raises(ConfigError, match="group=48 does not divide"):
        _compile(model, "group=48", tmp_path)
    with pytest.raises(ConfigError, match="outliers=64 needs layers of more inputs"):
        _compile(model, "outliers=64", tmp_path)
    with pytest.raises(ConfigError, match="calibration"):
        _compile(model, "start=gptq", tmp_path, calib=False)
    cm = _compile(model, "bases=1,targets=nothing", tmp_path, calib=False)
    assert cm.program.history[-1].stats["quantized"] == 0
