"""Triton kernels of every llmc op against the reference ops, in Triton's CPU interpreter."""

import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its language is built for the interpreter then

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import llmc.ops  # noqa: E402,F401
from llmc.backends.triton import kernels  # noqa: E402
from llmc.ops import cq, kivi, vq  # noqa: E402
from llmc.ops.nbits_linear import dequantize, quantize_rtn  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows", [1, 3, 7])  # GEMV (<= 4 rows) and dequantize-GEMM paths
def test_nbits_linear_matches_the_op(bits, rows):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(48, 200, generator=gen)  # K not a multiple of the block: the last block is padded
    codes, scales, zeros = quantize_rtn(w, bits, 32, symmetric=bits == 8)
    x = torch.randn(rows, 200, generator=gen)
    y = kernels.nbits_linear(x, codes, scales, zeros, 200, 48, bits, 32)
    torch.testing.assert_close(y, x @ dequantize(codes, scales, zeros, 200, bits, 32).T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, torch.ops.llmc.nbits_linear(x, codes, scales, zeros, 200, 48, bits, 32),
                               atol=1e-5, rtol=1e-5)


def test_nbits_linear_leading_dims_and_int8_activations():
    from llmc.backends.triton import ops as triton_ops  # noqa: F401  (registers llmc_triton::*)

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 64, generator=gen)
    codes, scales, zeros = quantize_rtn(w, 4, 16)
    for shape in [(2, 3, 64), (2, 1, 64)]:
        x = torch.randn(*shape, generator=gen)
        for int8 in (False, True):
            got = torch.ops.llmc_triton.nbits_linear(x, codes, scales, zeros, 64, 40, 4, 16, int8)
            want = torch.ops.llmc.nbits_linear(x, codes, scales, zeros, 64, 40, 4, 16, int8)
            assert got.shape == (*shape[:-1], 40)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [3, 4])
def test_nbits_embedding_rows(bits):
    w = torch.randn(40, 72, generator=torch.Generator().manual_seed(1))
    codes, scales, zeros = quantize_rtn(w, bits, 32)  # 72 = 2.25 blocks
    ids = torch.tensor([[39, 0], [7, 7]])
    torch.testing.assert_close(kernels.nbits_embedding(ids, codes, scales, zeros, 72, bits, 32),
                               dequantize(codes, scales, zeros, 72, bits, 32)[ids])


@pytest.mark.parametrize("M,B,g", [(2, 8, 8), (1, 10, 4), (2, 6, 3)])  # AQLM 2x8; int16 codes; groups of 3
@pytest.mark.parametrize("rows", [1, 2, 9])
def test_vq_linear_matches_the_op(M, B, g, rows):
    gen = torch.Generator().manual_seed(rows)
    N, K = 40, 96
    codes = vq.store_codes(torch.randint(0, 1 << B, (N, K // g, M), generator=gen), B)
    codebooks = torch.randn(M, 1 << B, 1, g, generator=gen)
    scales = torch.rand(N, 1, 1, 1, generator=gen) + 0.5
    x = torch.randn(rows, K, generator=gen)
    y = kernels.vq_linear(x, codes, codebooks, scales)
    torch.testing.assert_close(y, x @ vq.dequantize(codes, codebooks, scales).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bases,groups,rows", [(2, 1, 1), (3, 4, 3), (1, 2, 9)])
def test_binary_bases_linear_matches_the_op(bases, groups, rows):
    from llmc.ops import binary_bases

    gen = torch.Generator().manual_seed(bases * 10 + groups)
    signs = torch.randint(0, 256, (bases, 40, 16), generator=gen, dtype=torch.uint8)  # K = 128
    scales = (torch.rand(bases, 40, groups, generator=gen) + 0.1).half()  # float16, as qbb_quant stores them
    x = torch.randn(rows, 128, generator=gen)
    torch.testing.assert_close(kernels.binary_bases_linear(x, signs, scales),
                               x @ binary_bases.dequantize(signs, scales).T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("H,G,C,c", [(3, 4, 256, 4), (2, 8, 16, 2), (2, 5, 4, 3)])
def test_cq_encode_and_decode_are_exact(H, G, C, c):
    gen = torch.Generator().manual_seed(C)
    codebooks = torch.randn(H, G, C, c, generator=gen)
    x = torch.randn(2, H, 7, G * c, generator=gen)
    codes = kernels.cq_encode(x, codebooks)
    assert codes.dtype == torch.uint8 and torch.equal(codes, cq.encode(x, codebooks))
    assert torch.equal(kernels.cq_decode(codes, codebooks), cq.decode(codes, codebooks))


@pytest.mark.parametrize("splits", [1, 3])
def test_cq_attention_reads_codes_like_dequantized_attention(splits):
    gen = torch.Generator().manual_seed(splits)
    B, HQ, HKV, T, D = 2, 4, 2, 37, 16
    kcb = torch.randn(HKV, 4, 256, 4, generator=gen)  # keys 4c8b, values 2c4b
    vcb = torch.randn(HKV, 8, 16, 2, generator=gen)
    kc = torch.randint(0, 256, (B, HKV, T, 4), generator=gen).to(torch.uint8)
    vc = torch.randint(0, 16, (B, HKV, T, 8), generator=gen).to(torch.uint8)
    q = torch.randn(B, HQ, D, generator=gen)
    valid = torch.ones(B, T, dtype=torch.int8)
    valid[1, :5] = 0  # left padding of the second row
    k = cq.decode(kc, kcb).repeat_interleave(HQ // HKV, 1)
    v = cq.decode(vc, vcb).repeat_interleave(HQ // HKV, 1)
    s = torch.einsum("bhd,bhtd->bht", q, k) / math.sqrt(D)
    want = torch.einsum("bht,bhtd->bhd", s.masked_fill(valid[:, None] == 0, -math.inf).softmax(-1), v)
    got = kernels.cq_attention(q, kc, vc, kcb, vcb, valid, splits=splits)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keys", [True, False])
def test_kivi_append_quantizes_like_the_op(keys):
    gen = torch.Generator().manual_seed(int(keys))
    ref = got = torch.zeros(1, 2, 0, 8)
    news = []
    for _ in range(6):  # 5 tokens per append: groups complete at different appends
        news.append(torch.randn(1, 2, 5, 8, generator=gen))
        ref = kivi.append(ref, news[-1], 2, 4, 4, 3, keys)
        got = kernels.kivi_append(got, news[-1], 2, 4, 4, 3, keys)
    assert torch.equal(got, ref)
    exact = torch.cat(news, 2)
    assert torch.equal(got[:, :, 24:], exact[:, :, 24:]) and not torch.equal(got[:, :, :24], exact[:, :, :24])


def test_opcheck_of_the_triton_ops():
    from llmc.backends.triton import ops as triton_ops  # noqa: F401

    w = torch.randn(32, 64)
    codes, scales, zeros = quantize_rtn(w, 4, 16)
    torch.library.opcheck(torch.ops.llmc_triton.nbits_linear.default,
                          (torch.randn(2, 64), codes, scales, zeros, 64, 32, 4, 16))
    vcodes = torch.randint(0, 256, (16, 8, 2), dtype=torch.uint8)
    torch.library.opcheck(torch.ops.llmc_triton.vq_linear.default,
                          (torch.randn(3, 64), vcodes, torch.randn(2, 256, 1, 8), torch.rand(16, 1, 1, 1)))
    cb = torch.randn(2, 4, 16, 2)
    torch.library.opcheck(torch.ops.llmc_triton.cq_encode.default, (torch.randn(1, 2, 3, 8), cb))


def test_cpu_kernels_without_the_interpreter_say_what_is_needed(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    codes, scales, zeros = quantize_rtn(torch.randn(16, 32), 4, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.nbits_linear(torch.randn(1, 32), codes, scales, zeros, 32, 16, 4, 16)
