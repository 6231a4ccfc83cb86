"""Text a model writes itself (PV-Tuning's `tune_data=self`): prompt slices and sampled windows."""

import pytest
import torch

import llmc
from llmc.data import prompt_slices
from llmc.errors import ConfigError, DataError
from llmc.generation import sample_windows
from llmc.calibration import decode_inputs
from llmc.testing import random_batches, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def peaked():
    """The tiny llama with a sharpened lm_head, so its next-token distributions are far from uniform."""
    model = tiny_model("llama", seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    return llmc.compile(model, tokenizer=tiny_tokenizer(), progress=False)


def _nll_and_entropy(cm, rows, start):
    mask, pos = decode_inputs(rows)
    with torch.no_grad():
        logp = cm.step(rows, mask, pos, cm.empty_cache(rows.shape[0]))[0].float().log_softmax(-1)
    logp = logp[:, start - 1: -1]
    nll = -logp.gather(-1, rows[:, start:, None]).mean()
    entropy = -(logp.exp() * logp).sum(-1).mean()
    return float(nll), float(entropy)


def test_prompt_slices_are_seeded_windows_of_the_batches():
    batches = random_batches(3, 20, seed=1)
    a = prompt_slices(batches, 50, 6, seed=4)
    assert a.shape == (50, 6) and torch.equal(a, prompt_slices(batches, 50, 6, seed=4))
    assert not torch.equal(a, prompt_slices(batches, 50, 6, seed=5))
    text = [b[0].tolist() for b in batches]
    for row in a.tolist():  # each slice is contiguous in one batch
        assert any(any(t[s: s + 6] == row for s in range(15)) for t in text)
    with pytest.raises(DataError, match="longer"):
        prompt_slices(batches, 2, 20)


def test_sampled_windows_follow_the_model_distribution(peaked):
    prompts = prompt_slices(random_batches(4, 32, seed=2), 24, 4, seed=0)
    rows = sample_windows(peaked.step, peaked.empty_cache, prompts, 40, seed=7, batch_size=8, progress=False)
    assert rows.shape == (24, 40) and torch.equal(rows[:, :4], prompts)
    # plain sampling: the mean NLL of the sampled tokens estimates the model's mean entropy; greedy
    # text would sit far below it, and text that ignored the model (uniform tokens) far above
    nll, entropy = _nll_and_entropy(peaked, rows, 4)
    assert entropy < 4.0  # the sharpened model is far from uniform (log 256 = 5.55)
    assert abs(nll - entropy) < 0.1 * entropy
    uniform = torch.cat([prompts, torch.randint(3, 256, (24, 36), generator=torch.Generator().manual_seed(0))], 1)
    assert _nll_and_entropy(peaked, uniform, 4)[0] > 1.3 * entropy


def test_sampling_is_seeded_and_resumes_from_its_file(peaked, tmp_path):
    prompts = prompt_slices(random_batches(2, 16, seed=0), 10, 3, seed=0)
    args = (peaked.step, peaked.empty_cache, prompts, 12)
    path = str(tmp_path / "rows.pt")
    full = sample_windows(*args, seed=1, batch_size=4, path=path, fingerprint="a", progress=False)
    assert torch.equal(full, sample_windows(*args, seed=1, batch_size=4, progress=False))
    assert not torch.equal(full, sample_windows(*args, seed=2, batch_size=4, progress=False))
    # an interrupted run left one batch: it is kept as saved (marked here to tell) and the rest is
    # sampled again, to the same rows
    first = full[:4].clone()
    first[:, -1] = 0
    torch.save({"fingerprint": "a", "rows": first.int()}, path)
    resumed = sample_windows(*args, seed=1, batch_size=4, path=path, fingerprint="a", progress=False)
    assert torch.equal(resumed[:4], first) and torch.equal(resumed[4:], full[4:])
    # rows saved under another fingerprint (other model or prompts) are not reused
    torch.save({"fingerprint": "b", "rows": torch.zeros(10, 12, dtype=torch.int32)}, path)
    assert torch.equal(full, sample_windows(*args, seed=1, batch_size=4, path=path, fingerprint="a",
                                            progress=False))
    with open(path, "wb") as f:  # a corrupt file is sampled again
        f.write(b"not a checkpoint")
    assert torch.equal(full, sample_windows(*args, seed=1, batch_size=4, path=path, fingerprint="a",
                                            progress=False))
    with pytest.raises(ConfigError, match="cannot start"):
        sample_windows(peaked.step, peaked.empty_cache, prompts, 3, seed=0)
