"""Real-model checks on SmolLM2-135M (slow: run with `pytest -m slow`)."""

import pytest
import torch

import llmc
from llmc import data
from llmc.eval import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    try:
        src = llmc.load_model("smollm2-135m")
    except llmc.errors.ModelLoadError as e:
        pytest.skip(str(e))
    return src, llmc.compile(src)


def test_ppl_512x5_matches_reference(smollm2):
    src, cm = smollm2
    ids = data.tokenize(src.tokenizer, data.text("wikitext2-test"))
    assert abs(perplexity(cm, ids, "ppl-512x5", progress=False).ppl - 29.65) <= 0.02
    assert abs(perplexity(cm, ids, "ppl-512x5-kv", progress=False).ppl - 29.65) <= 0.02


def test_greedy_generation_matches_hf(smollm2):
    src, cm = smollm2
    prompt = "The capital of France is"
    enc = src.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        ref = src.model.generate(**enc, max_new_tokens=20, do_sample=False)
    expected = src.tokenizer.decode(ref[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert cm.generate(prompt, max_new_tokens=20) == expected
