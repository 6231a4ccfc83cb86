"""Fixtures of the backend tests."""

import pytest

from llmc.backends.onnxruntime import custom_ops


@pytest.fixture(params=custom_ops.ISA_LEVELS[:2])
def isa(request):
    """Each path of llmc's custom ops, portable C and AVX-512 (on a CPU without AVX-512, both portable)."""
    custom_ops.set_isa_limit(request.param)
    yield request.param
    custom_ops.set_isa_limit(custom_ops.ISA_LEVELS[-1])
