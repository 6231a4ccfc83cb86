"""llmc::vq_linear: AQLM-layout numerics, code storage, opcheck, the lookup-table kernel, export."""

import pytest
import torch

from llmc.ops import vq_kernels
from llmc.ops.vq import bits_per_weight, code_dtype, dequantize, load_codes, store_codes
from llmc.testing import VQLinear, count_ops

needs_numba = pytest.mark.skipif(not vq_kernels.available(), reason="numba is not installed")


def _layer(N, K, M, bits, g, seed=0):
    """Random codes (as integers, and stored), codebooks and positive row scales of an N x K layer."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 1 << bits, (N, K // g, M), generator=gen)
    codebooks = torch.randn(M, 1 << bits, 1, g, generator=gen)
    scales = torch.rand(N, 1, 1, 1, generator=gen) + 0.5
    return values, store_codes(values, bits), codebooks, scales


def _naive_weight(values, codebooks, scales):
    """W[n, j*g:(j+1)*g] = scales[n] * Σ_m codebooks[m, code[n, j, m]], one codeword at a time."""
    N, J, M = values.shape
    g = codebooks.shape[-1]
    w = torch.zeros(N, J * g)
    for n in range(N):
        for j in range(J):
            for m in range(M):
                w[n, j * g:(j + 1) * g] += codebooks[m, int(values[n, j, m]), 0]
        w[n] *= scales[n, 0, 0, 0]
    return w


@pytest.mark.parametrize("bits", [3, 8, 12, 16])
@pytest.mark.parametrize("shape", [(1, 24), (2, 3, 24)], ids=["1 token", "6 tokens"])
def test_op_matches_naive_dequantize_matmul(bits, shape):
    values, codes, codebooks, scales = _layer(N=5, K=24, M=2, bits=bits, g=4)
    w = _naive_weight(values, codebooks, scales)
    torch.testing.assert_close(dequantize(codes, codebooks, scales), w)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.ops.llmc.vq_linear(x, codes, codebooks, scales), x @ w.T, rtol=1e-5, atol=1e-5)


def test_code_storage_round_trips():
    assert code_dtype(1) == code_dtype(8) == torch.uint8 and code_dtype(9) == code_dtype(16) == torch.int16
    for bad in (0, 17):
        with pytest.raises(ValueError, match="codebook bits"):
            code_dtype(bad)
    values = torch.tensor([0, 1, 255, 256, 32767, 32768, 65535])
    stored = store_codes(values, 16)
    assert stored.dtype == torch.int16 and int(stored[-1]) == -1  # the high half wraps to negative int16
    assert torch.equal(load_codes(stored), values)
    assert torch.equal(load_codes(store_codes(values[:3], 8)), values[:3])


def test_bits_per_weight_follows_aqlm():
    N, K, M, B, g = 1536, 576, 2, 8, 8
    expected = (N * K / g * M * B + M * 2**B * g * 16 + N * 16) / (N * K)
    assert bits_per_weight(N, K, M, B, g) == pytest.approx(expected)
    assert bits_per_weight(N, K, M, B, g) == pytest.approx(2.10, abs=0.005)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("tokens", [1, 7])
def test_opcheck(bits, tokens):
    _, codes, codebooks, scales = _layer(N=16, K=32, M=2, bits=bits, g=8)
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(0))
    torch.library.opcheck(torch.ops.llmc.vq_linear.default, (x, codes, codebooks, scales))
    torch.library.opcheck(torch.ops.llmc.vq_linear.default, (x.requires_grad_(), codes, codebooks, scales))


@pytest.mark.parametrize("tokens", [1, 9])
def test_gradient_flows_to_the_input(tokens):
    _, codes, codebooks, scales = _layer(N=16, K=32, M=2, bits=8, g=8)
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(tokens)).requires_grad_(True)
    torch.ops.llmc.vq_linear(x, codes, codebooks, scales).pow(2).sum().backward()
    xr = x.detach().requires_grad_(True)
    (xr @ dequantize(codes, codebooks, scales).T).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-3)  # gradients are O(100)


@needs_numba
def test_few_tokens_take_the_lookup_table_kernel(monkeypatch):
    calls = []
    real = vq_kernels.lut_linear

    def spy(x, *args):
        calls.append(tuple(x.shape))
        return real(x, *args)

    monkeypatch.setattr(vq_kernels, "lut_linear", spy)
    _, codes, codebooks, scales = _layer(N=8, K=16, M=1, bits=8, g=8)
    for shape in [(1, 16), (2, 2, 16), (5, 16)]:
        torch.ops.llmc.vq_linear(torch.randn(shape), codes, codebooks, scales)
    _, wide, codebooks16, _ = _layer(N=8, K=16, M=1, bits=12, g=8)
    torch.ops.llmc.vq_linear(torch.randn(1, 16), wide, codebooks16, scales)  # int16 codes: no kernel
    assert calls == [(1, 16), (2, 2, 16)]


@needs_numba
@pytest.mark.parametrize("N,K", [(576, 576), (192, 576), (1536, 576), (576, 1536)])
@pytest.mark.parametrize("M", [1, 2, 3])
def test_lut_kernel_matches_dequantize_on_smollm2_shapes(N, K, M):
    _, codes, codebooks, scales = _layer(N, K, M, bits=8, g=8, seed=N + K + M)
    w = dequantize(codes, codebooks, scales)
    gen = torch.Generator().manual_seed(0)
    for tokens in (1, 3):
        x = torch.randn(tokens, K, generator=gen)
        torch.testing.assert_close(vq_kernels.lut_linear(x, codes, codebooks, scales), x @ w.T,
                                   rtol=1e-4, atol=1e-4 * M)


@needs_numba
def test_lut_kernel_dtypes_shapes_and_refusals():
    _, codes, codebooks, scales = _layer(N=64, K=128, M=2, bits=8, g=8)
    w = dequantize(codes, codebooks, scales)
    x = torch.randn(2, 1, 128, generator=torch.Generator().manual_seed(0))
    y = vq_kernels.lut_linear(x.bfloat16(), codes, codebooks, scales)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 1, 64)
    torch.testing.assert_close(y.float(), x.bfloat16().float() @ w.T, rtol=1e-2, atol=0.2)
    wide = torch.zeros(64, 16, 4, dtype=torch.uint8)
    wide[:, :, ::2] = codes
    strided = wide[:, :, ::2]  # the same codes, not contiguous
    torch.testing.assert_close(vq_kernels.lut_linear(x, strided, codebooks, scales),
                               vq_kernels.lut_linear(x, codes, codebooks, scales))
    assert vq_kernels.lut_linear(torch.randn(0, 128), codes, codebooks, scales).shape == (0, 64)
    with pytest.raises(TypeError, match="uint8"):
        vq_kernels.lut_linear(x, codes.to(torch.int16), codebooks, scales)
    with pytest.raises(ValueError, match="features"):
        vq_kernels.lut_linear(torch.randn(1, 120), codes, codebooks, scales)


@needs_numba
def test_lut_kernel_follows_torch_threads(monkeypatch):
    """One torch thread: the serial kernel; more: the parallel one, with numba's pool at torch's count."""
    import numba

    calls = []

    def recording(name, kernel):
        def call(*args):
            calls.append(name)
            return kernel(*args)
        return call

    for name in ("_gather_sum_rows", "_gather_sum_parallel"):
        monkeypatch.setattr(vq_kernels, name, recording(name, getattr(vq_kernels, name)))
    _, codes, codebooks, scales = _layer(N=32, K=64, M=2, bits=8, g=8)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    expected = x @ dequantize(codes, codebooks, scales).T
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.testing.assert_close(vq_kernels.lut_linear(x, codes, codebooks, scales), expected,
                                       rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)
    assert calls[0] == "_gather_sum_rows"
    if numba.config.NUMBA_NUM_THREADS >= 2:
        assert calls[1] == "_gather_sum_parallel" and numba.get_num_threads() == 2


@needs_numba
def test_kernels_compile_without_a_writable_cache(monkeypatch):
    """Where numba finds no folder to write its cache to (read-only install and home), _jit compiles uncached."""
    import numpy as np
    from numba.core import caching

    if not hasattr(caching.CacheImpl, "_locator_classes"):
        pytest.skip("numba's cache locators moved")
    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])  # every candidate folder refused
    rows = vq_kernels._jit(vq_kernels._gather_sum_rows.py_func)
    parallel = vq_kernels._jit(vq_kernels._gather_sum_parallel.py_func, parallel=True)
    assert type(rows._cache).__name__ == type(parallel._cache).__name__ == "NullCache"
    gen = np.random.default_rng(0)
    lut = gen.standard_normal((2, 6, 16), dtype=np.float32)
    codes = gen.integers(0, 16, (5, 6), dtype=np.uint8)
    scales = gen.random(5, dtype=np.float32)
    expected = np.stack([lut[t, np.arange(6), codes].sum(-1) * scales for t in range(2)])
    for kernel, extra in ((rows, (0, 5)), (parallel, (2,))):
        out = np.zeros((2, 5), np.float32)
        kernel(lut, codes, scales, out, *extra)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_torch_export_keeps_the_op():
    _, codes, codebooks, scales = _layer(N=24, K=32, M=2, bits=8, g=8)
    module = VQLinear(codes, codebooks, scales)
    dyn = torch.export.Dim.DYNAMIC
    ep = torch.export.export(module, (torch.randn(2, 3, 32),), dynamic_shapes=({0: dyn, 1: dyn},))
    assert count_ops(ep.graph_module)["llmc.vq_linear.default"] == 1
    gen = torch.Generator().manual_seed(0)
    for shape in [(1, 1, 32), (3, 5, 32)]:  # decode (lookup table) and prefill (dequantize)
        x = torch.randn(shape, generator=gen)
        torch.testing.assert_close(ep.module()(x), module(x))
