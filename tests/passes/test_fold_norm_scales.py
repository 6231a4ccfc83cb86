"""fold_norm_scales: structure, exact numerics, tied weights, no-op."""

import pytest
import torch

import llmc
from llmc.testing import TINY_ARCHITECTURES, count_ops, tiny_model


def _mul_count(cm):
    return count_ops(cm.program.gm)["aten.mul.Tensor"]


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_folds_every_norm_and_keeps_logits(arch, tiny_models):
    model = tiny_models[arch]
    base = llmc.compile(model)
    folded = llmc.compile(model, passes=["fold_norm_scales"])
    stats = folded.program.history[0].stats
    assert stats["folded"] == 2 * 2 + 1  # two norms per layer, two layers, the final norm
    assert _mul_count(base) - _mul_count(folded) == 5
    names = dict(folded.program.gm.named_parameters())
    assert not any(k.endswith("input_layernorm.weight") for k in names)
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(folded(ids)[0], base(ids)[0], atol=2e-5, rtol=1e-5)
    # the source model is untouched (passes never write into shared storage)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(ids)[0], atol=1e-5, rtol=1e-5)


def test_tied_lm_head_is_skipped_with_a_reason():
    model = tiny_model("llama", tie_word_embeddings=True)
    cm = llmc.compile(model, passes=["fold_norm_scales"])
    stats = cm.program.history[0].stats
    assert stats["folded"] == 4
    assert "tied" in stats["skipped"]["model.norm"]
    ids = torch.randint(3, 256, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(cm(ids)[0], model(input_ids=ids).logits, atol=2e-5, rtol=1e-5)


def test_no_match_is_a_no_op(tiny_models):
    cm = llmc.compile(tiny_models["llama"], passes=["fold_norm_scales:norms=does_not_exist$"])
    rec = cm.program.history[0]
    assert rec.stats["folded"] == 0 and rec.stats["modified"] is False
