"""fuse_guidance: the fused scorer equals log-probs summed naively from both models, incrementally
with its own caches too; EFT fusion; the pass through llmc.compile; ONNX lowering; bad options."""

import pytest
import torch

import llmc
from llmc.errors import ConfigError
from llmc.generation import left_pad, position_ids_from_mask
from llmc.passes.fuse_guidance import FuseGuidance, fuse_eft, fuse_scorer
from llmc.testing import count_ops, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def guides(one_thread):
    tuned, untuned = tiny_model(seed=1), tiny_model(seed=2)
    tok = tiny_tokenizer()
    return tuned, untuned, llmc.compile(tuned, tokenizer=tok), llmc.compile(untuned, tokenizer=tok)


def naive_ratio(tuned, untuned, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Σ_{j >= start} log π_tuned(x_j | x_<j) − log π_untuned(x_j | x_<j), straight from the HF models."""
    with torch.no_grad():
        lt = tuned(input_ids=ids).logits.log_softmax(-1)
        lu = untuned(input_ids=ids).logits.log_softmax(-1)
    labels = ids[:, 1:, None]
    per_token = (lt[:, :-1].gather(-1, labels) - lu[:, :-1].gather(-1, labels))[..., 0]
    return per_token[:, start - 1:].sum(1)


def test_structure_and_cache_layout(guides):
    _, _, t, u = guides
    program = fuse_scorer(t, u)
    ops = count_ops(program.gm)
    assert ops["aten.linear.default"] == 2 * count_ops(t.program.gm)["aten.linear.default"]
    assert [c.layer for c in program.cache_layout] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len({c.input_name for c in program.cache_layout}) == 8
    assert program.cache_layout[2].meaning.startswith("tuned") and program.cache_layout[4].meaning.startswith("untuned")


def test_fused_score_equals_naive_log_probs_incrementally(guides):
    tuned, untuned, t, u = guides
    scorer = llmc.CompiledModel(fuse_scorer(t, u))
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (14, 9)]
    # whole sequences, left-padded: the running sum's last column is Σ over every token after the first
    ids, mask = left_pad(seqs, 0)
    running, _ = scorer.step(ids, mask, position_ids_from_mask(mask), scorer.empty_cache(2))
    assert running.shape == (2, 14, 1)
    for i, s in enumerate(seqs):
        ref = naive_ratio(tuned, untuned, torch.tensor([s]), 1)
        torch.testing.assert_close(running[i, -1, 0], ref[0], atol=1e-4, rtol=1e-5)
    # incrementally: prefix 0..9 in the cache, then tokens 9..14 (token 9 is fed again: its context is the prefix)
    s = torch.tensor([seqs[0]])
    _, past = scorer.step(s[:, :9], torch.ones(1, 9, dtype=torch.long), torch.arange(9)[None], scorer.empty_cache(1))
    past = [p[:, :, :-1] for p in past]  # drop token 8: it is the next call's first token
    r1, _ = scorer.step(s[:, 8:], torch.ones(1, 14, dtype=torch.long), torch.arange(8, 14)[None], past)
    torch.testing.assert_close(r1[0, -1, 0], naive_ratio(tuned, untuned, s, 9)[0], atol=1e-4, rtol=1e-5)
    # the score is not trivially zero: the two guides disagree
    assert abs(float(r1[0, -1, 0])) > 0.5


def test_eft_fusion_equals_logit_arithmetic(guides):
    tuned, untuned, t, u = guides
    base_hf = tiny_model(seed=0)
    base = llmc.compile(base_hf, tokenizer=tiny_tokenizer())
    eft = llmc.CompiledModel(fuse_eft(base, t, u, beta=0.5))
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    logits, present = eft(ids)
    with torch.no_grad():
        lb, lt, lu = (m(input_ids=ids).logits.log_softmax(-1) for m in (base_hf, tuned, untuned))
    torch.testing.assert_close(logits, lb + 0.5 * (lt - lu), atol=1e-4, rtol=1e-5)
    assert len(present) == 12
    assert eft.generate("ab", max_new_tokens=4, do_sample=True, seed=0) is not None


def test_pass_through_compile_matches_the_function(guides, tmp_path):
    tuned, _, t, u = guides
    folder = u.save(str(tmp_path / "untuned"))
    cm = llmc.compile(tuned, tokenizer=tiny_tokenizer(), passes=[f"fuse_guidance:untuned={folder}"])
    assert cm.program.history[-1].name == "fuse_guidance"
    ref = llmc.CompiledModel(fuse_scorer(t, u))
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(cm(ids)[0], ref(ids)[0])
    # a saved scorer loads back and scores the same
    again = llmc.load(cm.save(str(tmp_path / "scorer")))
    torch.testing.assert_close(again(ids)[0], ref(ids)[0])


def test_scorer_lowers_to_onnx_with_parity(guides, tmp_path):
    _, _, t, u = guides
    program = fuse_scorer(t, u)
    ort = llmc.get_backend("onnxruntime")
    model = ort.load(ort.lower(program, str(tmp_path / "scorer-onnx")))
    assert model.manifest["parity"]["mode"] == "exact"
    ids = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 8, dtype=torch.long)
    pos = torch.arange(8).expand(2, 8)
    ref, _ = llmc.CompiledModel(program).step(ids, mask, pos, program.empty_cache(2))
    got, present = model.step(ids, mask, pos, model.empty_cache(2))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
    assert len(present) == 8


def test_bad_options_and_mismatched_vocabularies(guides):
    with pytest.raises(ConfigError, match="untuned=MODEL"):
        FuseGuidance()
    with pytest.raises(ConfigError, match="tuned=MODEL"):
        FuseGuidance(untuned="x", mode="eft")
    with pytest.raises(ConfigError, match="drop tuned"):
        FuseGuidance(untuned="x", tuned="y")
    with pytest.raises(ConfigError, match="not one of"):
        llmc.parse_pass_spec("fuse_guidance:untuned=x,mode=tokens")
    _, _, t, _ = guides
    other = llmc.compile(tiny_model(seed=3, vocab_size=300), tokenizer=tiny_tokenizer())
    with pytest.raises(ConfigError, match="different tokenizers"):
        fuse_scorer(t, other)
    with pytest.raises(ConfigError, match="one vocabulary"):
        fuse_eft(other, t, t)
