"""CompiledModel: generation options, save/load round trip, refusal of bad folders, size report."""

import json
import os

import pytest
import torch

import llmc
from llmc.errors import ArtifactError, ConfigError


def test_save_load_round_trip_is_identical(tiny_compiled, tmp_path):
    out = tiny_compiled.save(tmp_path / "m")
    loaded = llmc.load(out)
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loaded(ids)[0], tiny_compiled(ids)[0], atol=0, rtol=0)
    prompts = ["hello there", "x"]
    assert loaded.generate(prompts, 12) == tiny_compiled.generate(prompts, 12)
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["cache_layout"][0]["dtype"] == "float32"
    assert loaded.program.size_report() == tiny_compiled.program.size_report()


def test_history_survives_save(tiny_models, tmp_path):
    cm = llmc.compile(tiny_models["qwen2"], passes=["fold_norm_scales"])
    loaded = llmc.load(cm.save(tmp_path / "q"))
    assert [h.spec for h in loaded.program.history] == ["fold_norm_scales"]
    assert loaded.program.history[0].stats["folded"] == 5


def test_compiling_a_compiled_model_keeps_history_and_never_retraces(tiny_models, monkeypatch):
    cm = llmc.compile(tiny_models["llama"], passes=["fold_norm_scales"])
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    before = cm(ids)[0].clone()
    monkeypatch.setattr(llmc.api, "trace", lambda *a, **k: pytest.fail("traced again"))
    q = llmc.compile(cm, passes=["rtn_quant:bits=4,group=32"])
    assert [h.spec for h in q.program.history] == ["fold_norm_scales", "rtn_quant:group=32"]  # bits=4: default
    torch.testing.assert_close(cm(ids)[0], before, atol=0, rtol=0)  # the given model is unchanged
    monkeypatch.undo()
    direct = llmc.compile(tiny_models["llama"], passes=["fold_norm_scales", "rtn_quant:bits=4,group=32"])
    torch.testing.assert_close(q(ids)[0], direct(ids)[0], atol=1e-6, rtol=1e-6)  # as if compiled in one go
    assert not torch.allclose(q(ids)[0], before, atol=1e-3)
    from llmc.graph import graph_digest

    assert graph_digest(cm.program.fork().gm) == graph_digest(cm.program.gm)  # what resumable caches key on
    again = llmc.compile(q.program)  # a Program works too
    torch.testing.assert_close(again(ids)[0], q(ids)[0], atol=0, rtol=0)


def test_tied_weights_are_stored_once(tmp_path):
    from llmc.testing import tiny_model

    cm = llmc.compile(tiny_model("llama", tie_word_embeddings=True))
    cm.save(tmp_path / "t")
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = llmc.load(tmp_path / "t")
    ids = torch.randint(3, 256, (1, 5))
    torch.testing.assert_close(loaded(ids)[0], cm(ids)[0], atol=0, rtol=0)
    # the graph file holds no weights
    assert os.path.getsize(tmp_path / "t" / "graph.pt2") < os.path.getsize(tmp_path / "t" / "weights.safetensors")


def test_existing_folder_is_refused(tiny_compiled, tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ArtifactError, match="already exists"):
        tiny_compiled.save(tmp_path / "m")
    tiny_compiled.save(tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "manifest.json").exists()


def test_failed_save_leaves_nothing(tiny_compiled, tmp_path, monkeypatch):
    import llmc.fsutil as fsutil

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(fsutil, "file_sha256", broken)  # fails while the checksums are written, before the rename
    with pytest.raises(OSError):
        tiny_compiled.save(tmp_path / "m")
    assert os.listdir(tmp_path) == []


def _saved(tiny_compiled, tmp_path):
    return tiny_compiled.save(tmp_path / "m")


def test_corrupt_weights_are_refused(tiny_compiled, tmp_path):
    out = _saved(tiny_compiled, tmp_path)
    path = os.path.join(out, "weights.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-10] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(ArtifactError, match="corrupt: weights.safetensors"):
        llmc.load(out)


def test_missing_file_and_bad_manifest_are_refused(tiny_compiled, tmp_path):
    out = _saved(tiny_compiled, tmp_path)
    os.remove(os.path.join(out, "graph.pt2"))
    with pytest.raises(ArtifactError, match="graph.pt2 is missing"):
        llmc.load(out)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ArtifactError, match="manifest.json is corrupt"):
        llmc.load(out)
    with pytest.raises(ArtifactError, match="no such folder"):
        llmc.load(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match="not a compiled llmc model"):
        llmc.load(tmp_path)


def test_incompatible_versions_are_refused(tiny_compiled, tmp_path):
    out = _saved(tiny_compiled, tmp_path)
    mpath = os.path.join(out, "manifest.json")
    manifest = json.load(open(mpath))
    json.dump(dict(manifest, format_version=99), open(mpath, "w"))
    with pytest.raises(ArtifactError, match="format version 99"):
        llmc.load(out)
    json.dump(dict(manifest, versions=dict(manifest["versions"], torch="1.0.0")), open(mpath, "w"))
    with pytest.raises(ArtifactError, match="saved with torch 1.0.0"):
        llmc.load(out)


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_compiled):
    kw = dict(do_sample=True, temperature=0.9, top_p=0.9, seed=7)
    a = tiny_compiled.generate(["abc", "hello"], 16, return_tokens=True, **kw)
    b = tiny_compiled.generate(["abc", "hello"], 16, return_tokens=True, **kw)
    c = tiny_compiled.generate(["abc", "hello"], 16, return_tokens=True, **dict(kw, seed=8))
    assert a == b and a != c
    greedy = tiny_compiled.generate("abc", 16, return_tokens=True)
    assert tiny_compiled.generate("abc", 16, return_tokens=True, do_sample=True, top_k=1, seed=1) == greedy


def test_top_p_filter_keeps_the_nucleus():
    from llmc.generation import SamplingConfig, _filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_filter_logits(logits, SamplingConfig(top_p=0.7)))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(_filter_logits(logits, SamplingConfig(top_k=3)))
    assert kept.tolist() == [[True, True, True, False]]


def test_greedy_picks_as_torch_argmax():
    """llmc.generation.greedy (numpy's argmax on CPU) returns torch's argmax: the first of equal maxima, a NaN as
    the maximum, any float dtype."""
    from llmc.generation import greedy

    x = torch.tensor([[1.0, float("nan"), 3.0, float("nan")], [2.0, 5.0, 5.0, 1.0], [-1.0, -3.0, -1.0, -2.0]])
    for t in (x, x.double(), x.half(), x.bfloat16(), x[:, None].expand(3, 2, 4)[:, -1], torch.randn(2, 3, 49152)):
        got = greedy(t)
        assert got.dtype == torch.long and torch.equal(got, t.argmax(-1)), t.dtype


def test_stop_tokens_end_generation(tiny_compiled):
    full = tiny_compiled.generate("abc", 16, return_tokens=True)
    stop_at = full[3]
    cut = tiny_compiled.generate("abc", 16, return_tokens=True, stop=[stop_at])
    assert cut == full[: full.index(stop_at) + 1]


@pytest.mark.parametrize("kw,message", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
])
def test_bad_generation_options(tiny_compiled, kw, message):
    with pytest.raises(ConfigError, match=message):
        tiny_compiled.generate("abc", **kw)


def test_size_report_counts_components(tiny_compiled):
    rep = tiny_compiled.program.size_report()
    comps = rep["components"]
    assert comps["linear weights"]["numel"] == rep["decoder_linear_params"] == 2 * (3 * 64 * 128 + 64 * 64 * 2 + 2 * 64 * 32)
    assert rep["decoder_linear_bits_per_param"] == 32.0
    assert comps["embeddings"]["numel"] == comps["lm_head"]["numel"] == 256 * 64
    assert rep["total_bytes"] == sum(c["bytes"] for c in comps.values())
