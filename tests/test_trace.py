"""The traced decode step against Hugging Face, on every tiny architecture."""

import pytest
import torch

import llmc
from llmc.errors import UnsupportedArchitectureError
from llmc.generation import left_pad, position_ids_from_mask
from llmc.testing import TINY_ARCHITECTURES, assert_logits_match_hf, count_ops, tiny_tokenizer

PROMPTS = [[5, 17, 99, 3, 42, 8, 200, 31, 77, 64, 12], [150, 9, 33]]  # lengths 11 and 3: left padding


@pytest.fixture(scope="module")
def compiled(tiny_models):
    return {arch: llmc.compile(m, tokenizer=tiny_tokenizer()) for arch, m in tiny_models.items()}


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_greedy_tokens_identical_to_hf_generate(arch, tiny_models, compiled):
    model = tiny_models[arch]
    ids, mask = left_pad(PROMPTS, pad_id=0)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                         pad_token_id=0, eos_token_id=model.generation_config.eos_token_id)
    ref_new = ref[:, ids.shape[1]:].tolist()
    ours = compiled[arch].generate(PROMPTS, max_new_tokens=20, return_tokens=True)
    for r, o in zip(ref_new, ours):
        assert o == r[: len(o)] and all(t == 0 for t in r[len(o):])  # HF pads after EOS
    assert max(len(o) for o in ours) > 1


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_logits_match_hf_prefill_and_decode(arch, tiny_models, compiled):
    assert_logits_match_hf(tiny_models[arch], compiled[arch], PROMPTS)  # prefill, then two cached steps


def test_sliding_window_is_applied(tiny_models, compiled):
    """Mistral's tiny window (6) is shorter than the prompt: logits must differ from full attention."""
    model = tiny_models["mistral"]
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    logits, _ = compiled["mistral"].step(ids, mask, position_ids_from_mask(mask), compiled["mistral"].empty_cache(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        model.config.sliding_window = None
        try:
            full = model(input_ids=ids).logits
        finally:
            model.config.sliding_window = 6
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert (full - ref).abs().max() > 1e-3


def test_dynamic_batch_and_lengths(compiled):
    cm = compiled["llama"]
    for batch, seq in [(1, 1), (3, 7), (5, 2)]:
        ids = torch.randint(3, 256, (batch, seq))
        logits, present = cm(ids)
        assert logits.shape == (batch, seq, 256)
        assert present[0].shape == (batch, 2, seq, 16)


def test_graph_is_functional_with_optimum_cache_io(compiled):
    cm = compiled["llama"]
    layout = cm.program.cache_layout
    assert [c.input_name for c in layout[:2]] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert [c.output_name for c in layout[:2]] == ["present.0.key", "present.0.value"]
    ops = count_ops(cm.program.gm)
    assert ops["aten.linear.default"] == 2 * 7 + 1
    assert ops["aten.cat.default"] >= 4  # the four cache writes
    assert not any(name.endswith("_") and name.startswith("aten.") for name in ops)  # no in-place ops


def test_unsupported_architecture_names_it():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        llmc.compile(model)


def test_missing_module_is_named(tiny_models):
    import copy

    model = copy.deepcopy(tiny_models["llama"])
    del model.model.rotary_emb
    with pytest.raises(UnsupportedArchitectureError, match="model.rotary_emb"):
        llmc.to_program(model)
