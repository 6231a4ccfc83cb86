import os

import pytest
import torch

os.environ.setdefault("LLMC_QUIET", "1")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _pass_checkpoints_in_tmp(tmp_path, monkeypatch):
    """pv_quant and qbb_quant checkpoint their calibration under llmc's cache when given no checkpoint_dir, and resume
    from what they find there. In a test they use a folder of that test: it computes what it checks instead of
    resuming a checkpoint another run left, and the user's cache stays as it was."""
    from llmc.passes.pv_quant import pass_ as pv_quant
    from llmc.passes.qbb_quant import pass_ as qbb_quant

    root = str(tmp_path / "llmc-cache")
    for module in (pv_quant, qbb_quant):
        monkeypatch.setattr(module, "cache_dir", lambda: root)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls run faster on one thread, and much faster when another process holds the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models():
    """One tiny seeded model per architecture, shared by the tests that only read them."""
    from llmc.testing import TINY_ARCHITECTURES, tiny_model

    return {arch: tiny_model(arch) for arch in TINY_ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_compiled(tiny_models):
    """The tiny llama compiled with no passes (with the byte tokenizer)."""
    import llmc
    from llmc.testing import tiny_tokenizer

    return llmc.compile(tiny_models["llama"], tokenizer=tiny_tokenizer())


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face folder with a real (GPT-2 style) byte-level tokenizer."""
    from llmc.testing import tiny_model

    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    _byte_tokenizer().save_pretrained(folder)
    return str(folder)


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sorted(alphabet)[2], pad_token=sorted(alphabet)[0])


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "eval.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return str(f)
