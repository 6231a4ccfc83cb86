"""llmc.search: chunk-level beam search, best-of-N and sampling through one decoder, on tiny models."""

import pytest
import torch

import llmc
from llmc.errors import ConfigError
from llmc.generation import left_pad, position_ids_from_mask
from llmc.passes.fuse_guidance import fuse_scorer
from llmc.search import GuideScorer, SearchSpec, continuation_logprob, reorder_cache, search
from llmc.testing import tiny_model, tiny_tokenizer
from llmc.tokenizer import ByteTokenizer

PROMPTS = ["The cat", "A long time ago in", "xyz"]


@pytest.fixture(scope="module")
def models(one_thread):
    tok = tiny_tokenizer()
    hf = {name: tiny_model(seed=seed) for name, seed in (("base", 0), ("tuned", 1), ("untuned", 2))}
    compiled = {name: llmc.compile(m, tokenizer=tok) for name, m in hf.items()}
    scorer = llmc.CompiledModel(fuse_scorer(compiled["tuned"], compiled["untuned"]))
    return hf, compiled["base"], scorer


def naive_score(hf, prompt_ids: list[int], response: list[int]) -> float:
    """Σ log π_tuned − log π_untuned over `response` after `prompt_ids`, straight from the HF models."""
    ids = torch.tensor([prompt_ids + response])
    with torch.no_grad():
        lt = hf["tuned"](input_ids=ids).logits.double().log_softmax(-1)
        lu = hf["untuned"](input_ids=ids).logits.double().log_softmax(-1)
    labels = ids[:, 1:, None]
    per_token = (lt[:, :-1].gather(-1, labels) - lu[:, :-1].gather(-1, labels))[0, :, 0]
    return float(per_token[len(prompt_ids) - 1:].sum())


@pytest.fixture(scope="module")
def cq_base(models):
    """The tiny base with cq_kv codes in its cache (2 bits/channel) and float window and sink tensors."""
    hf, _, _ = models
    calib = [torch.randint(3, 256, (1, 64), generator=torch.Generator().manual_seed(100 + i)) for i in range(4)]
    return llmc.compile(hf["base"], passes=["cq_kv:config=4c8b,tokens=512,window=4,sink=2"], calibration=calib,
                        tokenizer=tiny_tokenizer(), progress=False)


@pytest.mark.parametrize("kind", ["float", "cq_kv"])
def test_step_after_cache_reorder_equals_recomputing_the_beam(models, cq_base, kind):
    base = models[1] if kind == "float" else cq_base
    if kind == "cq_kv":
        assert {c.dtype for c in base.cache_layout} == {"uint8", "float32"}
    gen = torch.Generator().manual_seed(0)
    # cq_kv's sink holds a row's first positions, which left padding fills with padding: equal lengths there
    lengths = (7, 5, 9) if kind == "float" else (7, 7, 7)
    seqs = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in lengths]
    ids, mask = left_pad(seqs, 0)
    pos = position_ids_from_mask(mask)
    _, past = base.step(ids, mask, pos, base.empty_cache(3))
    keep = torch.tensor([2, 0, 2, 1])
    past = reorder_cache(past, base.cache_layout, keep)
    nxt = torch.tensor([[11], [12], [13], [14]])
    mask2 = torch.cat([mask[keep], torch.ones(4, 1, dtype=torch.long)], 1)
    logits, _ = base.step(nxt, mask2, pos[keep][:, -1:] + 1, past)
    for row, (k, tok) in enumerate(zip(keep.tolist(), nxt[:, 0].tolist())):
        # the beam from scratch: its prompt alone, then the same token
        _, alone = base(torch.tensor([seqs[k]]))
        fresh, _ = base.step(torch.tensor([[tok]]), torch.ones(1, len(seqs[k]) + 1, dtype=torch.long),
                             torch.tensor([[len(seqs[k])]]), alone)
        torch.testing.assert_close(logits[row, -1], fresh[0, -1], atol=1e-4, rtol=1e-4)


def test_sampling_equals_plain_generation(models):
    _, base, _ = models
    res = search(base, PROMPTS, "sampling", max_new_tokens=12, seed=5, batch_prompts=len(PROMPTS))
    ref = base.generate(PROMPTS, 12, do_sample=True, temperature=0.7, top_k=50, seed=5, return_tokens=True)
    assert res.tokens == ref
    assert res.base_tokens == [len(r) for r in ref]
    # cbs with W = K = 1 is the same decoder: a scorer changes nothing
    res1 = search(base, PROMPTS, "cbs:w=1,k=1,l=3", max_new_tokens=12, seed=5, batch_prompts=len(PROMPTS))
    assert res1.tokens == ref


def test_bon_is_cbs_with_one_beam_and_infinite_chunk(models):
    hf, base, scorer = models
    n = 6
    for p, prompt in enumerate(PROMPTS):
        res = search(base, prompt, f"cbs:w=1,k={n},l=inf", scorer, max_new_tokens=10, seed=p, keep_candidates=True)
        same = search(base, prompt, f"bon:n={n}", scorer, max_new_tokens=10, seed=p)
        assert same.tokens == res.tokens and same.spec.name == f"bon-{n}"
        # best-of-N by hand: N plain samples with the same seed, scored naively, the best one
        samples = base.generate([prompt] * n, 10, do_sample=True, temperature=0.7, top_k=50, seed=p,
                                return_tokens=True)
        scores = [naive_score(hf, base.tokenizer.encode(prompt), s) for s in samples]
        best = max(range(n), key=scores.__getitem__)
        assert res.tokens[0] == samples[best]
        assert res.scores[0] == pytest.approx(scores[best], abs=1e-3)
        assert res.base_tokens[0] == sum(map(len, samples))
        # every sample comes back as a candidate, in order (best-of-M over the first M is read off them)
        assert [c[0] for c in res.candidates[0]] == samples
        assert [c[1] for c in res.candidates[0]] == pytest.approx(scores, abs=1e-3)


@pytest.mark.parametrize("cache", [True, False])
def test_cbs_scores_its_choice_and_steers(models, cache):
    hf, base, scorer = models
    res = search(base, PROMPTS, "cbs:w=2,k=3,l=3", scorer, max_new_tokens=11, seed=1, batch_prompts=2,
                 scorer_cache=cache)
    for prompt, toks, score in zip(PROMPTS, res.tokens, res.scores):
        # the score carried through beam reorders is the chosen continuation's own score
        assert score == pytest.approx(naive_score(hf, base.tokenizer.encode(prompt), toks), abs=1e-3)
    assert res.scorer_calls == 2 * 4 + (2 if cache else 0)  # 2 batches x 4 chunks (+ the cached scorer's prefill)
    # base log-probs of the chosen rows follow them through the reorders too
    ref = continuation_logprob(base, PROMPTS, res.tokens)
    assert res.base_logprob == pytest.approx(ref, abs=1e-3)
    # steering: the chosen continuations score higher than plain samples of the same prompts
    plain = search(base, PROMPTS * 4, "sampling", max_new_tokens=11, seed=1)
    plain_scores = [naive_score(hf, base.tokenizer.encode(p), t) for p, t in zip(PROMPTS * 4, plain.tokens)]
    assert sum(res.scores) / len(res.scores) > sum(plain_scores) / len(plain_scores) + 1.0


def test_cached_and_uncached_scorers_choose_the_same(models):
    _, base, scorer = models
    a = search(base, PROMPTS, "cbs:w=2,k=2,l=2", scorer, max_new_tokens=9, seed=3, scorer_cache=True)
    b = search(base, PROMPTS, "cbs:w=2,k=2,l=2", scorer, max_new_tokens=9, seed=3, scorer_cache=False)
    assert a.tokens == b.tokens
    assert a.scores == pytest.approx(b.scores, abs=1e-4)


class ShiftedBytes(ByteTokenizer):
    """Another vocabulary over the same bytes: id = (byte + 7) mod 256."""

    def encode(self, text, add_special_tokens=True):
        return [(b + 7) % 256 for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens=False):
        return bytes((int(i) - 7) % 256 for i in ids).decode("utf-8", errors="replace")


def test_different_tokenizers_work_through_text(models):
    hf, base, scorer = models
    shifted = llmc.CompiledModel(scorer.program)
    shifted.program = type(scorer.program)(**{**scorer.program.__dict__, "tokenizer": ShiftedBytes()})
    shifted._runner.program = shifted.program
    guide = GuideScorer(shifted, base.tokenizer)
    assert not guide.cache
    res = search(base, PROMPTS, "cbs:w=2,k=2,l=4", guide, max_new_tokens=8, seed=2, ignore_eos=True)
    tok = ShiftedBytes()
    for prompt, toks, score in zip(PROMPTS, res.tokens, res.scores):
        text = base.tokenizer.decode(toks, skip_special_tokens=True)
        assert score == pytest.approx(naive_score(hf, tok.encode(prompt), tok.encode(text)), abs=1e-3)
    with pytest.raises(ConfigError, match="through text"):
        GuideScorer(shifted, base.tokenizer, cache=True)


def test_works_with_ort_models(models, tmp_path):
    _, base, scorer = models
    ort = llmc.get_backend("onnxruntime")
    base_onnx = ort.load(ort.lower(base.program, str(tmp_path / "base")))
    scorer_onnx = ort.load(ort.lower(scorer.program, str(tmp_path / "scorer")))
    ref = search(base, PROMPTS, "cbs:w=2,k=2,l=3", scorer, max_new_tokens=9, seed=4, batch_prompts=3)
    got = search(base_onnx, PROMPTS, "cbs:w=2,k=2,l=3", scorer_onnx, max_new_tokens=9, seed=4, batch_prompts=3)
    assert got.tokens == ref.tokens
    assert got.scores == pytest.approx(ref.scores, abs=1e-3)


@pytest.mark.parametrize("spec, message", [
    ("beam:w=2", "unknown search 'beam'"),
    ("cbs:w=4,k=4", "lacks l"),
    ("cbs:w=0,k=4,l=5", "positive integer"),
    ("cbs:w=4,k=4,l=-1", "positive integer or inf"),
    ("cbs:w=4,k=4,l=5,x=1", "no option 'x'"),
    ("bon:n=four", "positive integer"),
    ("cbs:w=4,w=2,k=1,l=1", "given twice"),
    ("eft:beta=high", "number"),
    ("", "empty search spec"),
])
def test_bad_specs_fail_clearly(spec, message):
    with pytest.raises(ConfigError, match=message):
        SearchSpec.parse(spec)


def test_spec_names_and_missing_scorer(models):
    assert SearchSpec.parse("cbs:w=4,k=4,l=5").name == "cbs-4-4-5"
    assert SearchSpec.parse("cbs:w=1,k=8,l=inf").name == "cbs-1-8-inf"
    assert SearchSpec.parse("bon:n=16").rows == 16
    assert SearchSpec.parse("eft").rows == 1
    _, base, _ = models
    with pytest.raises(ConfigError, match="pass scorer="):
        search(base, "x", "bon:n=4")


def test_cli_generate_with_guides(models, tmp_path, capsys):
    from llmc.cli import main

    hf, base, _ = models
    tok = tiny_tokenizer()
    folders = {name: llmc.compile(hf[name], tokenizer=tok).save(str(tmp_path / name)) for name in ("tuned", "untuned")}
    base_dir = base.save(str(tmp_path / "base"))
    argv = ["generate", base_dir, "The cat", "--max-new-tokens", "6", "--guide", folders["tuned"], folders["untuned"]]
    assert main(argv + ["--search", "cbs:w=2,k=2,l=3", "--seed", "4"]) == 0
    out = capsys.readouterr()
    ref = search(base, "The cat", "cbs:w=2,k=2,l=3", llmc.CompiledModel(fuse_scorer(
        llmc.load(folders["tuned"]), llmc.load(folders["untuned"]))), max_new_tokens=6, seed=4)
    assert out.out == "The cat" + ref.texts[0] + "\n"
    assert "guide score" in out.err
    assert main(argv + ["--search", "eft:beta=1", "--seed", "4"]) == 0
    assert main(argv + ["--search", "cbs:w=2,k=2"]) == 2
    assert "lacks l" in capsys.readouterr().err
    assert main(["generate", base_dir, "x", "--search", "bon:n=4"]) == 2
    assert "--guide TUNED UNTUNED" in capsys.readouterr().err
