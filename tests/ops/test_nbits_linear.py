"""llmc::nbits_linear: packing, reference numerics, opcheck."""

import pytest
import torch

from llmc.ops.nbits_linear import dequantize, pack_along_last, quantize_rtn, unpack_along_last


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip_low_bits_first(bits):
    q = torch.randint(0, 1 << bits, (3, 5, 32))
    packed = pack_along_last(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 32 * bits // 8)
    assert torch.equal(unpack_along_last(packed, bits, 32), q.to(torch.int32))
    # one little-endian bit stream: value i at bits [i*bits, (i+1)*bits)
    stream = sum(int(b) << (8 * j) for j, b in enumerate(packed[1, 2].tolist()))
    assert [(stream >> (bits * i)) & ((1 << bits) - 1) for i in range(32)] == q[1, 2].tolist()
    if bits == 4:  # MatMulNBits: element 2j in the low nibble of byte j
        assert int(packed[0, 0, 0]) == int(q[0, 0, 0]) | (int(q[0, 0, 1]) << 4)


@pytest.mark.parametrize("bits,max_rel_err", [(2, 0.25), (3, 0.05), (4, 0.012), (8, 5e-5)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_and_op_match_naive_dequantize(bits, max_rel_err, symmetric):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 200, generator=gen)  # K not a multiple of the block: padded blocks
    codes, scales, zeros = quantize_rtn(w, bits, 32, symmetric)
    wd = dequantize(codes, scales, zeros, 200, bits, 32)
    rel = float((wd - w).pow(2).mean() / w.pow(2).mean())
    assert rel < max_rel_err
    x = torch.randn(2, 3, 200, generator=gen)
    y = torch.ops.llmc.nbits_linear(x, codes, scales, zeros, 200, 48, bits, 32)
    torch.testing.assert_close(y, x @ wd.T, atol=1e-5, rtol=1e-5)


def test_opcheck():
    w = torch.randn(32, 64)
    codes, scales, zeros = quantize_rtn(w, 4, 16)
    torch.library.opcheck(torch.ops.llmc.nbits_linear.default, (torch.randn(2, 64), codes, scales, zeros, 64, 32, 4, 16))
    torch.library.opcheck(torch.ops.llmc.nbits_linear.default,
                          (torch.randn(2, 64), codes, scales, zeros, 64, 32, 4, 16, True))
    torch.library.opcheck(torch.ops.llmc.nbits_embedding.default,
                          (torch.tensor([[0, 31, 5]]), codes, scales, zeros, 64, 4, 16))


def test_embedding_rows_are_the_dequantized_table():
    w = torch.randn(40, 72)
    codes, scales, zeros = quantize_rtn(w, 4, 32)  # 72 = 2.25 blocks: the last one is padded
    ids = torch.tensor([[39, 0], [7, 7]])
    rows = torch.ops.llmc.nbits_embedding(ids, codes, scales, zeros, 72, 4, 32)
    torch.testing.assert_close(rows, dequantize(codes, scales, zeros, 72, 4, 32)[ids])


def test_gradient_flows_to_the_input():
    w = torch.randn(32, 64)
    codes, scales, zeros = quantize_rtn(w, 8, 16)
    x = torch.randn(3, 64, requires_grad=True)
    torch.ops.llmc.nbits_linear(x, codes, scales, zeros, 64, 32, 8, 16).pow(2).sum().backward()
    xr = x.detach().requires_grad_(True)
    (xr @ dequantize(codes, scales, zeros, 64, 8, 16).T).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)


def test_three_bit_codes_widen_to_matmulnbits_four_bit_layout():
    from llmc.backends.onnxruntime.translations import _widen_3bit

    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 8, (5, 7, 32), generator=gen)
    widened = _widen_3bit(pack_along_last(q, 3).numpy(), [5, 7], 32)  # onnxscript eager: runs in ORT
    assert torch.equal(torch.from_numpy(widened.value), pack_along_last(q, 4))
    z = torch.randint(0, 8, (5, 16), generator=gen)  # 10 zero points padded to 16 (two 3-byte chunks)
    widened = _widen_3bit(pack_along_last(z, 3).numpy(), [5], 10)
    assert torch.equal(torch.from_numpy(widened.value), pack_along_last(z[:, :10], 4))
