"""Scoring knowledge-conflict tasks (llmc.context_tasks): accuracy, stubbornness, CAD, and the CLI."""

import json
import re

import pytest
import torch

from llmc.cli import main
from llmc.context_tasks import context_following, load_examples
from llmc.model import Model
from llmc.trace import CacheTensor

WORDS = ["<eos>", " A", " B", " C", " kings", " masters", "."]


class WordTokenizer:
    """Words with their leading space as tokens; unknown words get the next id."""

    eos_token_id = 0

    def __init__(self):
        self.vocab = {w: i for i, w in enumerate(WORDS)}

    def encode(self, text, add_special_tokens=True):
        return [self.vocab.setdefault(w, len(self.vocab)) for w in re.findall(r"\s?[^\s.]+|\.", text)]

    def decode(self, ids, skip_special_tokens=True):
        words = {i: w for w, i in self.vocab.items()}
        return "".join(words[i] for i in ids if not (skip_special_tokens and i == 0))


class Scripted(Model):
    """Next-token logits set by what the sequence holds: a context word (CTXSTRONG, CTXWEAK) or none,
    and the last token. The cache is the token ids so far."""

    def __init__(self, tok):
        self.tokenizer, self.eos_ids = tok, (0,)
        self.cache_layout = [CacheTensor(0, "key", "int64", ("batch", 1, "past_sequence_length", 1), "ids")]

    def _next(self, seq: list[int]) -> torch.Tensor:
        v, logits = self.tokenizer.vocab, torch.zeros(64)
        names = {i: w for w, i in v.items()}
        text = "".join(names[i] for i in seq)
        last = seq[-1]
        if last in (v[" kings"], v[" masters"]):
            logits[v["."]] = 5
        elif last == v["."]:
            logits[0] = 5
        elif "CTXSTRONG" in text:  # follows the context
            logits[[v[" C"], v[" A"], v[" kings"], v[" masters"]]] = torch.tensor([3.0, 1.0, 4.0, 1.0])
        elif "CTXWEAK" in text:  # stubborn, but less so than without context
            logits[[v[" C"], v[" A"]]] = torch.tensor([1.8, 2.0])
        else:  # no context: the memorised answers
            logits[[v[" C"], v[" A"], v[" kings"], v[" masters"]]] = torch.tensor([0.0, 3.0, 0.0, 3.0])
        return logits

    def step(self, input_ids, attention_mask, position_ids, past):
        seq = torch.cat([past[0][:, 0, :, 0], input_ids], dim=1)
        logits = torch.stack([torch.stack([self._next(row[:k + 1].tolist()) for k in range(seq.shape[1])])
                              for row in seq])
        return logits[:, -input_ids.shape[1]:], [seq[:, None, :, None]]


@pytest.fixture
def files(tmp_path):
    kre = [{"question": "Where?", "choices": ["x", "y", "z"], "candidate": "C", "answer": "A",
            "negative_context": context} for context in ("CTXSTRONG", "CTXWEAK")]
    (tmp_path / "kre.json").write_text(json.dumps(kre))
    memo = [{"prompt": 'Write a quote that ends in " CTXSTRONG: No man can serve two', "classes": "[' masters.', ' kings.']",
             "answer_index": 1}]
    (tmp_path / "memo.jsonl").write_text("\n".join(json.dumps(r) for r in memo))
    return tmp_path


def test_accuracy_stubbornness_and_cad(files):
    model = Scripted(WordTokenizer())
    kre = load_examples(files / "kre.json")
    plain = context_following(model, kre, progress=False)
    assert plain == {"examples": 2, "accuracy": 0.5, "stubbornness": 0.5, "cad": 0.0}
    # CAD 0.5 on the weak example: C 1.5*1.8 - 0.5*0 = 2.7 beats A 1.5*2.0 - 0.5*3.0 = 1.5
    assert context_following(model, kre, cad=0.5, progress=False)["accuracy"] == 1.0
    memo = load_examples(files / "memo.jsonl")
    assert memo[0].answer == " kings" and memo[0].memorised == " masters"
    assert context_following(model, memo, progress=False)["accuracy"] == 1.0
    with pytest.raises(Exception, match="cad"):
        context_following(model, kre, cad=-1, progress=False)


@pytest.mark.parametrize("cad", [0.0, 0.5])
def test_batched_scoring_equals_batch_one(tiny_compiled, cad):
    """Left-padded batches give a real model's batch-1 last-position logits and greedy continuations."""
    from llmc.context_tasks import _Batch, continuations

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 17, 9)]
    without = [p[2:] for p in prompts]
    batched = _Batch(tiny_compiled, prompts, 0).logits
    for row, p in zip(batched, prompts):
        torch.testing.assert_close(row, _Batch(tiny_compiled, [p], 0).logits[0], atol=1e-4, rtol=1e-4)
    rows = continuations(tiny_compiled, prompts, without if cad else None, 8, cad)
    assert rows == [continuations(tiny_compiled, [p], [w] if cad else None, 8, cad)[0]
                    for p, w in zip(prompts, without)]



def test_cli_on_a_compiled_model(hf_folder, files, capsys):
    assert main(["eval", "memotrap", hf_folder, "--data", str(files / "memo.jsonl")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("memotrap (1 examples of") and re.fullmatch(r"accuracy [01]\.\d{3}", lines[1])
    assert re.fullmatch(r"stubbornness [01]\.\d{3}", lines[2])
    assert main(["eval", "kre", hf_folder, "--data", str(files / "kre.json"), "--cad", "0.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["examples"] == 2 and out["cad"] == 0.5 and 0 <= out["accuracy"] <= 1


@pytest.mark.parametrize("argv, message", [
    (["eval", "kre", "{hf}", "--data", "{files}/memo.jsonl"], "is not a kre file"),
    (["eval", "memotrap", "{hf}", "--data", "{files}/nope.jsonl"], "nope.jsonl"),
    (["eval", "memotrap", "{hf}", "--data", "{files}/memo.jsonl", "--cad", "-1"], "--cad must be >= 0"),
])
def test_bad_input_is_one_line(argv, message, hf_folder, files, capsys):
    argv = [a.format(hf=hf_folder, files=files) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmc: error:") and message in err[0], err
