"""The per-layer split the torch runtime executes: same numbers, small generated functions."""

import torch

from llmc.runner import TorchRunner, split_by_layer


def test_split_is_exact_and_per_layer(tiny_compiled):
    gm = tiny_compiled.program.gm
    split = split_by_layer(gm)
    subs = [name for name, _ in split.named_children() if name.startswith("submod_")]
    assert len(subs) == tiny_compiled.program.num_layers + 1  # embedding/masks, then one per layer
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    pos = torch.arange(6).expand(2, 6)
    past = tiny_compiled.empty_cache(2)
    with torch.inference_mode():
        logits, present = gm(ids, mask, pos, past)
        out = split(ids, mask, pos, *past)
    assert torch.equal(out[0], logits) and all(torch.equal(a, b) for a, b in zip(out[1:], present))
    # every generated function stays far below a frame of thousands of locals
    assert max(len(getattr(split, s).graph.nodes) for s in subs) < len(gm.graph.nodes) / 2


def test_runner_follows_a_replaced_graph(tiny_compiled):
    import copy

    program = copy.copy(tiny_compiled.program)
    runner = TorchRunner(program)
    ids, mask, pos = torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long), torch.tensor([[0, 1]])
    first = runner.step(ids, mask, pos, program.empty_cache(1))[0]
    program.gm = copy.deepcopy(program.gm)
    with torch.no_grad():
        program.gm.lm_head.weight.mul_(2.0)
    second = runner.step(ids, mask, pos, program.empty_cache(1))[0]
    torch.testing.assert_close(second, 2 * first)


def test_last_position_variant_gives_the_last_row(tiny_models):
    import llmc
    from llmc.testing import tiny_tokenizer

    for arch in ("llama", "phi3"):
        cm = llmc.compile(tiny_models[arch], passes=["fold_norm_scales"], tokenizer=tiny_tokenizer())
        runner = TorchRunner(cm.program)
        ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, :3] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        full, present = runner.step(ids, mask, pos, cm.empty_cache(2))
        last, present_last = runner.step_last(ids, mask, pos, cm.empty_cache(2))
        assert last.shape == (2, 1, 256)
        torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(present, present_last))


def test_in_major_weights_keep_values_and_ties():
    import llmc
    from llmc.runner import use_in_major_weights
    from llmc.testing import tiny_model

    model = tiny_model("llama", tie_word_embeddings=True)
    program = llmc.to_program(model)
    ids = torch.randint(3, 256, (1, 5))
    mask, pos = torch.ones(1, 5, dtype=torch.long), torch.arange(5)[None]
    with torch.inference_mode():
        before = program.gm(ids, mask, pos, program.empty_cache(1))[0]
    assert use_in_major_weights(program.gm) == 2 * 7 + 2  # every linear, plus the embedding tied to lm_head
    w = program.gm.get_parameter("model.layers.0.mlp.up_proj.weight")
    assert w.t().is_contiguous() and not w.is_contiguous()
    assert program.gm.lm_head.weight.data_ptr() == program.gm.model.embed_tokens.weight.data_ptr()
    with torch.inference_mode():
        torch.testing.assert_close(program.gm(ids, mask, pos, program.empty_cache(1))[0], before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight, w)  # the source is untouched, same values
