import os

import pytest
import torch

os.environ.setdefault("LLMC_QUIET", "1")
torch.set_num_threads(2)


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
