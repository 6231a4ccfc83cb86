"""llmc::kivi_append: the cache write of a simulated KIVI cache."""

import torch

from llmc.ops.kivi import quantized_length


def _x(S=50, B=1, H=2, D=16, seed=0):
    return torch.randn(B, H, S, D, generator=torch.Generator().manual_seed(seed))


def test_quantized_length():
    assert [quantized_length(S, 8, 10) for S in (0, 10, 17, 18, 25, 26)] == [0, 0, 0, 8, 8, 16]
    assert quantized_length(35, 32, 0) == 32


def test_chunked_appends_equal_one_append_and_tail_stays_float():
    x, empty = _x(), torch.zeros(1, 2, 0, 16)
    for keys in (True, False):
        once = torch.ops.llmc.kivi_append(empty, x, 2, 8, 8, 10, keys)
        cache = empty
        for a, b in ((0, 13), (13, 14), (14, 31), (31, 50)):
            cache = torch.ops.llmc.kivi_append(cache, x[:, :, a:b], 2, 8, 8, 10, keys)
        assert torch.equal(cache, once)  # each position is quantized once, whatever the chunking
        n = quantized_length(50, 8, 10)
        assert torch.equal(once[:, :, n:], x[:, :, n:])
        q = once[0, 0, :n]
        if keys:  # per channel, over groups of 8 tokens: at most 4 levels, min and max kept
            blocks = q.reshape(n // 8, 8, 16)
            assert max(len(torch.unique(blocks[g, :, ch])) for g in range(n // 8) for ch in range(16)) <= 4
            torch.testing.assert_close(blocks.amax(1), x[0, 0, :n].reshape(n // 8, 8, 16).amax(1))
        else:  # per token, over groups of 8 channels
            assert max(len(torch.unique(q[t, g * 8:(g + 1) * 8])) for t in range(n) for g in range(2)) <= 4
        rel = (once[:, :, :n] - x[:, :, :n]).pow(2).sum() / x[:, :, :n].pow(2).sum()
        assert 0.01 < rel < 0.2  # 2-bit error: present, bounded


def test_opcheck():
    torch.library.opcheck(torch.ops.llmc.kivi_append.default, (_x(20), _x(5, seed=1), 2, 4, 8, 3, True))
    torch.library.opcheck(torch.ops.llmc.kivi_append.default, (_x(0), _x(9, seed=1), 3, 4, 8, 0, False))
