"""ircan: fast attribution == naive full recompute, IG completeness, selection, reweighting, options, data."""

import json

import pytest
import torch

import llmc
from llmc.api import to_program
from llmc.errors import ConfigError, DataError
from llmc.passes.ircan import IRCAN, Attributor, example_neurons, load_examples, rank_neurons, read_neurons
from llmc.context_tasks import task_file
from llmc.passes_base import parse_pass_spec
from llmc.testing import tiny_tokenizer

WITH = list(range(10, 40))          # a 30-token "prompt with context"
# "Without context": the prompt's tail with two recent tokens changed too, so that the last position
# differs even through mistral's 6-token sliding window.
WITHOUT = list(range(22, 36)) + [60, 61, 38, 39]


def top_token(hf, ids=WITH) -> int:
    """The model's most likely next token after the with-context prompt (a target with a sizeable p)."""
    with torch.no_grad():
        return int(hf(torch.tensor([ids])).logits[0, -1].argmax())


@pytest.fixture(scope="module")
def programs(tiny_models):
    return {arch: to_program(tiny_models[arch], tiny_tokenizer()) for arch in ("llama", "mistral")}


def naive_attribution(hf, with_ids, without_ids, target, steps, method="plain"):
    """The reference: for every layer and every point, the whole with-context prompt recomputed by the
    Hugging Face model with the last position's down_proj input overridden (a forward pre-hook), and
    autograd to that activation."""
    layers = hf.model.layers
    acts = {}

    def run(ids):
        def capture(layer):
            def hook(module, args):
                acts[layer] = args[0][0, -1].detach().clone()
            return hook
        hooks = [layers[i].mlp.down_proj.register_forward_pre_hook(capture(i)) for i in range(len(layers))]
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits
        for h in hooks:
            h.remove()
        return dict(acts), float(torch.softmax(logits[0, -1], -1)[target])

    a_wo, p_wo = run(without_ids)
    a_w, p_w = run(with_ids)
    scores = torch.zeros(len(layers), a_w[0].numel())
    for i in range(len(layers)):
        total = torch.zeros_like(a_w[i])
        for k in range(1, steps + 1):
            a = (a_wo[i] + k / steps * (a_w[i] - a_wo[i])).requires_grad_()

            def override(module, args, a=a):
                x = args[0].clone()
                x[0, -1] = a
                return (x,)
            h = layers[i].mlp.down_proj.register_forward_pre_hook(override)
            p = torch.softmax(hf(torch.tensor([with_ids])).logits[0, -1], -1)[target]
            h.remove()
            (g,) = torch.autograd.grad(p, a)
            total += g * (k / steps if method == "alpha" else 1.0)
        scores[i] = (a_w[i] - a_wo[i]) * total / steps
    return scores, p_w, p_wo


@pytest.mark.parametrize("arch,steps,method", [("llama", 20, "plain"), ("llama", 6, "alpha"), ("mistral", 6, "plain")])
def test_fast_attribution_equals_naive(tiny_models, programs, arch, steps, method, one_thread):
    prog, target = programs[arch], top_token(tiny_models[arch])
    fast = Attributor(prog.gm, prog.empty_cache, steps, method)(WITH, WITHOUT, target)
    ref, p_w, p_wo = naive_attribution(tiny_models[arch], WITH, WITHOUT, target, steps, method)
    assert fast.scores.shape == ref.shape == (2, 128)
    assert ref.abs().max() > 1e-5  # the comparison means something
    torch.testing.assert_close(fast.scores, ref, atol=1e-5, rtol=0)
    assert (fast.scores - ref).abs().max() <= 1e-3 * ref.abs().max()
    assert fast.p_with == pytest.approx(p_w, rel=1e-5) and fast.p_without == pytest.approx(p_wo, rel=1e-5)


def test_integrated_gradients_completeness(tiny_models, programs, one_thread):
    """Per layer, the plain scores sum to p(with context) - p(the layer's activation at the no-context
    baseline), up to the Riemann error, which shrinks as m grows."""
    prog, target = programs["llama"], top_token(tiny_models["llama"])
    errors = []
    for steps in (2, 8, 32):
        att = Attributor(prog.gm, prog.empty_cache, steps)
        result = att(WITH, WITHOUT, target)
        a_wo = att.last_activations(WITHOUT)
        rec = att._last_step(WITH, 1)
        err = []
        for layer in range(att.num_layers):
            p_base = float(att.probability(layer, a_wo[layer][None], rec, target)[0])
            diff = result.p_with - p_base
            assert abs(diff) > 1e-5
            err.append(abs(float(result.scores[layer].sum()) - diff) / abs(diff))
        errors.append(max(err))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.05


def test_selection_per_example_threshold_and_top():
    scores = torch.zeros(3, 10)
    scores[0, 1], scores[2, 4], scores[1, 7], scores[1, 2] = 1.0, 0.5, 0.1, 0.099
    scores[0, 0] = -2.0
    assert example_neurons(scores) == [(0, 1, 1.0), (2, 4, 0.5), (1, 7, pytest.approx(0.1))]
    assert example_neurons(scores, ratio=0.4) == [(0, 1, 1.0), (2, 4, 0.5)]
    assert example_neurons(scores, top=1) == [(0, 1, 1.0)]
    big = torch.arange(100, dtype=torch.float32).reshape(4, 25) + 100  # all >= 0.1 x max
    kept = example_neurons(big)
    assert len(kept) == 20 and kept[0] == (3, 24, 199.0) and kept[-1][2] == 180.0
    assert example_neurons(-torch.ones(2, 3)) == []  # nothing pushes towards the context answer


def test_ranking_counts_examples_and_takes_most_frequent():
    per_example = [[(0, 1, 1.0), (1, 2, 0.5)], [(1, 2, 0.2), (0, 3, 0.9)], [(1, 2, 0.1), (0, 1, 0.3), (2, 0, 5.0)]]
    ranking = rank_neurons(per_example)
    assert [(r["layer"], r["neuron"], r["count"]) for r in ranking] == [(1, 2, 3), (0, 1, 2), (2, 0, 1), (0, 3, 1)]
    assert ranking[1]["score_sum"] == pytest.approx(1.3)


def _neurons_file(path, selected, h=None, beta=None):
    doc = {"format": "llmc-ircan-neurons/1", "ranking": [{"layer": l, "neuron": n, "count": 1} for l, n in selected]}
    if h is not None:
        doc.update(h=h, beta=beta)
    path.write_text(json.dumps(doc))
    return str(path)


def test_reweighting_equals_scaling_the_activation(tiny_models, tmp_path):
    hf = tiny_models["llama"]
    selected = [(0, 5), (1, 17), (1, 100)]
    beta = 3.0
    neurons = _neurons_file(tmp_path / "n.json", selected)
    cm = llmc.compile(hf, passes=[IRCAN(neurons=neurons, h=3, beta=beta)], tokenizer=tiny_tokenizer(), progress=False)
    rec = cm.program.history[-1]
    assert rec.stats["modified"] and rec.stats["selected"] == [list(s) for s in selected]
    gm = cm.program.gm
    for layer in (0, 1):
        w0 = hf.model.layers[layer].mlp.down_proj.weight
        w1 = getattr(gm.model.layers, str(layer)).mlp.down_proj.weight
        cols = [n for l, n in selected if l == layer]
        torch.testing.assert_close(w1[:, cols], beta * w0[:, cols])
        others = [c for c in range(w0.shape[1]) if c not in cols]
        assert torch.equal(w1[:, others], w0[:, others])
    # The same as scaling those channels of the activation in the source model.
    hooks = []
    for layer in (0, 1):
        scale = torch.ones(128)
        scale[[n for l, n in selected if l == layer]] = beta
        hooks.append(hf.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
            lambda m, args, s=scale: (args[0] * s,)))
    ids = torch.tensor([WITH])
    try:
        with torch.no_grad():
            ref = hf(ids).logits
    finally:
        for h in hooks:
            h.remove()
    S = ids.shape[1]
    out, _ = gm(ids, torch.ones(1, S, dtype=torch.long), torch.arange(S)[None], cm.program.empty_cache(1))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # The source model itself is untouched (weights replaced, never mutated in place).
    assert not torch.equal(getattr(gm.model.layers, "0").mlp.down_proj.weight, hf.model.layers[0].mlp.down_proj.weight)


MEMOTRAP = [
    {"prompt": 'Write a quote that ends in the word "kings": No man can serve two', "classes": "[' masters.', ' kings.']",
     "answer_index": 1},
    {"prompt": 'Write a quote that ends in the word "wise": Penny wise, pound', "classes": "[' foolish.', ' wise.']",
     "answer_index": 1},
    {"prompt": 'Write a quote about "x": On one issue: they agree', "classes": [" a.", " b."], "answer_index": 0},
]


def _memotrap_file(tmp_path, records=MEMOTRAP):
    path = tmp_path / "memo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_pass_mines_caches_and_writes_neurons(tiny_models, tmp_path, monkeypatch):
    data = _memotrap_file(tmp_path)
    dump = tmp_path / "dump"
    p = IRCAN(data=data, samples=2, h=4, beta=2.0, steps=4)
    cm = llmc.compile(tiny_models["llama"], passes=[p], tokenizer=tiny_tokenizer(), progress=False, dump_dir=str(dump))
    stats = cm.program.history[-1].stats
    assert stats["modified"] and stats["examples"] == 2 and len(stats["selected"]) == 4
    doc = read_neurons(stats["neurons_file"])
    assert stats["neurons_file"] == str(dump / "ircan_neurons.json")
    assert doc["h"] == 4 and doc["beta"] == 2.0 and len(doc["examples"]) == 2
    assert [[r["layer"], r["neuron"]] for r in doc["ranking"][:4]] == stats["selected"]
    assert doc["examples"][0]["answer"] == " kings" and doc["examples"][0]["where"].endswith("memo.jsonl:1")
    assert all(len(e["neurons"]) <= 20 for e in doc["examples"])
    assert len(list((dump / "ircan").glob("ircan-*.pt"))) == 2
    # A rerun reads every example's attribution back instead of recomputing it.
    monkeypatch.setattr(Attributor, "__call__", lambda *a: pytest.fail("attribution recomputed"))
    cm2 = llmc.compile(tiny_models["llama"], passes=[p], tokenizer=tiny_tokenizer(), progress=False,
                       dump_dir=str(dump))
    assert cm2.program.history[-1].stats["selected"] == stats["selected"]
    # neurons=FILE reuses the selection (h and beta from the file unless given) without attribution.
    cm3 = llmc.compile(tiny_models["llama"], passes=[f"ircan:neurons={stats['neurons_file']}"],
                       tokenizer=tiny_tokenizer(), progress=False)
    assert cm3.program.history[-1].stats["selected"] == stats["selected"]
    for name, w in cm.program.gm.state_dict().items():
        assert torch.equal(w, cm3.program.gm.state_dict()[name]), name


def test_random_neuron_control(tiny_models, tmp_path):
    from llmc.passes.ircan import random_neurons

    hf = tiny_models["llama"]
    draws = [random_neurons(2, 128, 6, seed) for seed in (0, 0, 1)]
    assert draws[0] == draws[1] != draws[2] and len(set(draws[0])) == 6
    assert all(0 <= l < 2 and 0 <= n < 128 for l, n in draws[0])
    neurons = _neurons_file(tmp_path / "n.json", [(0, 1), (1, 2)])
    cm = llmc.compile(hf, passes=[f"ircan:neurons={neurons},h=6,beta=2,random=1"], tokenizer=tiny_tokenizer(),
                      progress=False)
    stats = cm.program.history[-1].stats
    assert stats["random"] == 1 and stats["selected"] == [list(s) for s in draws[2]]
    for layer, neuron in draws[2]:
        w1 = getattr(cm.program.gm.model.layers, str(layer)).mlp.down_proj.weight
        torch.testing.assert_close(w1[:, neuron], 2 * hf.model.layers[layer].mlp.down_proj.weight[:, neuron])


def test_beta_one_is_a_no_op(tiny_models, tmp_path):
    hf = tiny_models["llama"]
    for p in (IRCAN(neurons=_neurons_file(tmp_path / "n.json", [(0, 1), (1, 2)]), h=2, beta=1.0),
              IRCAN(data=_memotrap_file(tmp_path), samples=1, h=3, beta=1, steps=2)):
        cm = llmc.compile(hf, passes=[p], tokenizer=tiny_tokenizer(), progress=False)
        stats = cm.program.history[-1].stats
        assert stats["modified"] is False and stats["weights"] == [] and len(stats["selected"]) >= 1
        for layer in (0, 1):
            assert torch.equal(getattr(cm.program.gm.model.layers, str(layer)).mlp.down_proj.weight,
                               hf.model.layers[layer].mlp.down_proj.weight)


def test_grid_search_scores_each_setting_on_the_reweighted_model(tiny_models, tmp_path, monkeypatch):
    """Without h and beta the pass scores every grid setting on the data and keeps the best; each setting is
    scored on the model that setting gives (checked against compiling it explicitly), and the source
    model is never touched."""
    import llmc.passes.ircan as ircan_pass

    hf = tiny_models["llama"]
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    ids = torch.tensor([WITH])
    S = ids.shape[1]
    inputs = (ids, torch.ones(1, S, dtype=torch.long), torch.arange(S)[None])
    seen, table = [], {(1, 0.0): 0.2, (1, 3.0): 0.4, (2, 0.0): 0.1, (2, 3.0): 0.4}

    def fake_score(model, examples, progress=True):
        seen.append(model.step(*inputs, model.empty_cache(1))[0])
        if len(seen) == 1:  # the unmodified model comes first
            return {"accuracy": 0.3, "stubbornness": 0.6}
        h, beta = [(h, b) for h in (1, 2) for b in (0.0, 3.0)][len(seen) - 2]
        assert len(examples) == 2  # grid_samples
        return {"accuracy": table[(h, beta)], "stubbornness": 0.5 if h == 1 else 0.25}

    monkeypatch.setattr(ircan_pass, "context_following", fake_score)
    dump = tmp_path / "dump"
    p = IRCAN(data=_memotrap_file(tmp_path), samples=2, steps=2, grid_h=(2, 1), grid_beta=(3.0, 0.0), grid_samples=2)
    cm = llmc.compile(hf, passes=[p], tokenizer=tiny_tokenizer(), progress=False, dump_dir=str(dump))
    stats = cm.program.history[-1].stats
    assert stats["h"] == 2 and stats["beta"] == 3.0  # accuracy ties at 0.4: lower stubbornness wins
    doc = read_neurons(stats["neurons_file"])
    assert [(r["h"], r["beta"], r["accuracy"]) for r in doc["grid"]["rows"]] == [
        (h, b, table[(h, b)]) for h in (1, 2) for b in (0.0, 3.0)]
    for k, v in hf.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert doc["grid"]["baseline"] == {"accuracy": 0.3, "stubbornness": 0.6}
    torch.testing.assert_close(seen[0], llmc.compile(hf, tokenizer=tiny_tokenizer(), progress=False)(*inputs)[0])
    for (h, beta), logits in zip([(h, b) for h in (1, 2) for b in (0.0, 3.0)], seen[1:]):
        ref = llmc.compile(hf, passes=[IRCAN(neurons=stats["neurons_file"], h=h, beta=beta)],
                           tokenizer=tiny_tokenizer(), progress=False)
        torch.testing.assert_close(logits, ref(*inputs)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cm(*inputs)[0], seen[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec,message", [
    ("ircan:h=3,beta=2", "needs examples"),
    ("ircan:task=memotrap,data=x.jsonl,h=3,beta=2", "only one of"),
    ("ircan:task=ecare,h=3,beta=2", "one of memotrap, cose"),
    ("ircan:task=memotrap,grid_h=0+2", "ircan.grid_h lists"),
    ("ircan:task=memotrap,grid_beta=2+-1", "ircan.grid_beta lists"),
    ("ircan:task=memotrap,grid_samples=-1", "ircan.grid_samples"),
    ("ircan:task=memotrap,h=0,beta=2", "ircan.h must be an integer >= 1"),
    ("ircan:task=memotrap,h=3,beta=-1", "a number >= 0"),
    ("ircan:task=memotrap,h=3,beta=nan", "a number >= 0"),
    ("ircan:task=memotrap,h=3,beta=2,steps=0", "ircan.steps"),
    ("ircan:task=memotrap,h=3,beta=2,ig=riemann", "'plain'"),
    ("ircan:task=memotrap,h=3,beta=2,ratio=1.5", "in [0, 1]"),
    ("ircan:data=/no/such/file.jsonl,h=3,beta=2", "no such file: /no/such/file.jsonl"),
    ("ircan:task=memotrap,h=3,beta=two", "expected float"),
])
def test_bad_options(spec, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        parse_pass_spec(spec)


@pytest.mark.parametrize("content,line,message", [
    ('{"prompt": "a: b", "classes": "[\' x.\', \' y.\']", "answer_index": 0}\n{"prompt": "a: b",\n', 2, "not valid JSON"),
    ('{"prompt": "a: b", "classes": "[\' x.\', \' y.\']", "answer_index": 0}\n\n{"question": "q"}\n', 3,
     "not a MemoTrap record"),
    ('{"prompt": "a: b", "classes": "[\' x.\', \' y.\']", "answer_index": 2}\n', 1, "'answer_index'"),
    ('{"prompt": "a: b", "classes": "[oops", "answer_index": 0}\n', 1, "'classes' is not a list"),
    ('{"prompt": "no colon here", "classes": "[\' x.\', \' y.\']", "answer_index": 0}\n', 1, "'prompt' must be"),
    ('[\n {"question": "q", "choices": ["a", "b"], "candidate": "A", "answer": "B", "negative_context": "c"},\n'
     ' {"question": "q", "choices": ["a", "b"], "candidate": "C", "answer": "B", "negative_context": "c"}\n]', 3,
     "'candidate' must be one of the option letters A, B"),
    ('[\n {"question": "q", "choices": ["a", "b"], "candidate": "A", "answer": "B", "negative_context": "c"}\n'
     ' {"question": "q"}\n]', 3, "expected ',' or ']'"),
    ('[\n {"question": "q", "choices": ["a", "b"], "candidate": "A", "answer": "B", "negative_context": "c"},\n'
     '\n  7\n]', 4, "expected a JSON object"),
])
def test_malformed_data_names_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        load_examples(path)
    assert f"{path}:{line}:" in str(e.value) and message in str(e.value)


def test_malformed_neurons_file(tiny_models, tmp_path):
    bad = tmp_path / "n.json"
    bad.write_text('{"format": "llmc-ircan-neurons/1",\n "ranking": [}')
    with pytest.raises(DataError, match=f"{bad}:2: not valid JSON"):
        read_neurons(str(bad))
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="not an ircan neurons file"):
        read_neurons(str(bad))
    outside = _neurons_file(tmp_path / "o.json", [(0, 500)], h=1, beta=2.0)
    with pytest.raises(DataError, match="neuron 500, outside this model"):
        llmc.compile(tiny_models["llama"], passes=[IRCAN(neurons=outside)], tokenizer=tiny_tokenizer(), progress=False)


def test_prompts_of_both_formats(tmp_path):
    memo = load_examples(_memotrap_file(tmp_path))
    assert memo[0].without_context == "No man can serve two" and memo[0].answer == " kings"
    assert memo[0].memorised == " masters" and memo[0].task == "memotrap"
    assert memo[2].without_context == "On one issue: they agree"  # split at the first ": " only
    kre = tmp_path / "kre.json"
    kre.write_text(json.dumps([{"question": "Where?", "choices": ["x", "y", "z"], "candidate": "C", "answer": "A",
                                "negative_context": "Ctx.", " golden_context": "g", "negative_answer": "z"}]))
    (ex,) = load_examples(kre)
    assert ex.with_context == ("Choose the correct option to answer the following question: \nCtx.\nWhere?\n"
                               "A. x\nB. y\nC. z\nAnswer:")
    assert ex.without_context == ex.with_context.replace("Ctx.\n", "")
    assert (ex.answer, ex.memorised, ex.task) == (" C", " A", "kre")


def test_shared_dev_files():
    try:
        memo, cose = task_file("memotrap"), task_file("cose")
    except DataError:
        pytest.skip("the shared IRCAN data is not here")
    assert memo.name == "dev.jsonl" and cose.name == "dev.json"
    assert len(load_examples(memo)) == 468 and len(load_examples(cose)) == 610
