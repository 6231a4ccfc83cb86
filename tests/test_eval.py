"""Perplexity protocols and the data loader."""

import pytest
import torch

from llmc import data
from llmc.errors import ConfigError, DataError
from llmc.eval import Protocol, perplexity


def test_protocol_parsing():
    assert Protocol.parse("ppl-512x40") == Protocol(512, 40, False)
    assert Protocol.parse("ppl-512x5-kv") == Protocol(512, 5, True)
    for bad in ("ppl-512", "512x40", "ppl-0x3", "ppl-128x2-kv"):
        with pytest.raises(ConfigError):
            Protocol.parse(bad)


def test_traced_ppl_equals_hf_ppl_and_kv_chunking_agrees(tiny_models, tiny_compiled):
    ids = torch.randint(3, 256, (300 * 3,), generator=torch.Generator().manual_seed(0))
    hf = perplexity(tiny_models["llama"], ids, "ppl-300x3", progress=False)
    ours = perplexity(tiny_compiled, ids, "ppl-300x3", progress=False)
    kv = perplexity(tiny_compiled, ids, "ppl-300x3-kv", progress=False)
    hf_kv = perplexity(tiny_models["llama"], ids, "ppl-300x3-kv", progress=False)
    assert ours.tokens == kv.tokens == 3 * 299
    assert abs(ours.ppl - hf.ppl) < 1e-3 * hf.ppl
    assert abs(kv.ppl - ours.ppl) < 1e-3 * ours.ppl and abs(hf_kv.ppl - hf.ppl) < 1e-3 * hf.ppl
    # a random model is near-uniform over 256 tokens; a broken scorer would not be
    assert 50 < ours.ppl < 5000


def test_ppl_is_exact_on_a_known_distribution():
    """A 'model' that always predicts uniform logits has ppl == vocabulary size."""

    class Uniform:
        def step(self, ids, mask, pos, past):
            return torch.zeros(*ids.shape, 10), past

        def empty_cache(self, batch):
            return [torch.zeros(batch, 1, 0, 1)]

    r = perplexity(Uniform(), torch.arange(40) % 10, "ppl-8x5", progress=False)
    assert r.tokens == 5 * 7 and abs(r.ppl - 10.0) < 1e-4


def test_too_few_windows_is_an_error(tiny_compiled):
    with pytest.raises(ConfigError, match="needs 40 windows"):
        perplexity(tiny_compiled, torch.arange(1000) % 256, "ppl-512x40", progress=False)


def test_named_data_sets_resolve_or_explain(tmp_path, monkeypatch):
    f = tmp_path / "t.txt"
    f.write_text("hello")
    assert data.text(str(f)) == "hello"
    monkeypatch.setenv("LLMC_DATA_DIR", str(tmp_path))
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "valid.txt").write_text("valid text")
    assert data.text("wikitext2-valid") == "valid text"
    with pytest.raises(DataError, match="no such data set or file"):
        data.resolve("wikitext3")
    with pytest.raises(DataError, match="is not a file"):
        data.resolve(str(tmp_path))


def test_calibration_batches_are_seeded(tmp_path):
    from llmc.testing import tiny_tokenizer

    f = tmp_path / "c.txt"
    f.write_text("some calibration text " * 100)
    a = data.calibration_batches(tiny_tokenizer(), str(f), num_samples=4, seq_len=32, seed=1)
    b = data.calibration_batches(tiny_tokenizer(), str(f), num_samples=4, seq_len=32, seed=1)
    assert len(a) == 4 and a[0].shape == (1, 32) and all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(DataError, match="fewer than one calibration window"):
        data.calibration_batches(tiny_tokenizer(), str(f), seq_len=10_000)


@pytest.mark.skipif(not any((d / "wikitext-2-raw" / "wiki.test.raw").is_file() for d in data.data_dirs()),
                    reason="shared data not present")
def test_shared_test_split_is_found():
    assert data.sha256("wikitext2-test") == "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"


def test_model_perplexity_method_is_the_protocol_on_its_tokenized_data(tiny_compiled, text_file):
    ids = data.tokenize(tiny_compiled.tokenizer, data.text(text_file))
    direct = perplexity(tiny_compiled, ids, "ppl-64x4", progress=False)
    via_model = tiny_compiled.perplexity(text_file, "ppl-64x4", progress=False)
    assert via_model.ppl == direct.ppl and via_model.tokens == 4 * 63
    with pytest.raises(ConfigError):
        tiny_compiled.perplexity(text_file, "ppl-64")
