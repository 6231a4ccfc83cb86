"""llmc::cq_encode / llmc::cq_decode and the weighted k-means that learns their codebooks."""

import pytest
import torch

from llmc.ops.cq import code_dtype, encode, weighted_kmeans


def _data(seed=0, B=2, H=3, S=7, D=16, K=32, c=4):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, S, D, generator=gen), torch.randn(H, D // c, K, c, generator=gen)


def test_encode_is_nearest_centroid_and_decode_gathers_it():
    x, cb = _data()
    codes = torch.ops.llmc.cq_encode(x, cb)
    assert codes.dtype == torch.uint8 and codes.shape == (2, 3, 7, 4)
    groups = x.reshape(2, 3, 7, 4, 1, 4)
    naive = (groups - cb[None, :, None]).pow(2).sum(-1).argmin(-1)  # [B, H, S, G]
    assert torch.equal(codes.long(), naive)
    xh = torch.ops.llmc.cq_decode(codes, cb)
    expected = cb[torch.arange(3)[None, :, None, None], torch.arange(4), naive]  # [B, H, S, G, c]
    assert torch.equal(xh, expected.reshape(2, 3, 7, 16))
    # centroids are fixed points: encoding a decoded tensor gives back its codes
    assert torch.equal(torch.ops.llmc.cq_encode(xh, cb), codes)


def test_code_dtypes_and_bad_bits():
    assert code_dtype(1) == code_dtype(8) == torch.uint8
    assert code_dtype(9) == code_dtype(15) == torch.int16 and code_dtype(16) == torch.int32
    with pytest.raises(ValueError):
        code_dtype(17)
    x, cb = _data(K=512)
    assert encode(x, cb).dtype == torch.int16 and int(encode(x, cb).max()) < 512


def test_opcheck():
    x, cb = _data()
    torch.library.opcheck(torch.ops.llmc.cq_encode.default, (x, cb))
    torch.library.opcheck(torch.ops.llmc.cq_decode.default, (encode(x, cb), cb))


def test_kmeans_finds_separated_clusters_and_weights_pull_centroids():
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    pts = (centers.repeat_interleave(200, 0) + 0.1 * torch.randn(800, 2, generator=gen))[None]  # 1 row
    cent, st = weighted_kmeans(pts, 4, iters=50, seed=0)
    found = cent[0][torch.cdist(centers, cent[0]).argmin(1)]
    assert torch.allclose(found, centers, atol=0.05) and st["weighted_error"] < st["first_error"] + 1e-3
    # one centroid is the weighted mean of its points
    w = torch.rand(1, 800, generator=gen)
    one, _ = weighted_kmeans(pts, 1, w, iters=5)
    torch.testing.assert_close(one[0, 0], (pts[0] * w[0, :, None]).sum(0) / w.sum(), rtol=1e-4, atol=1e-4)


def test_kmeans_rows_are_independent_and_deterministic():
    gen = torch.Generator().manual_seed(1)
    pts = torch.randn(3, 500, 4, generator=gen)
    a, _ = weighted_kmeans(pts, 16, iters=10, tol=0, seed=7)
    b, _ = weighted_kmeans(pts, 16, iters=10, tol=0, seed=7)
    assert torch.equal(a, b)
    scaled = pts.clone()
    scaled[1] *= 100  # a row's scale does not leak into the others
    c, _ = weighted_kmeans(scaled, 16, iters=10, tol=0, seed=7)
    assert torch.equal(c[0], a[0]) and torch.equal(c[2], a[2])
    torch.testing.assert_close(c[1], 100 * a[1], rtol=1e-3, atol=1e-2)


def test_minibatch_kmeans_matches_lloyd_and_is_deterministic():
    """Mini-batch steps then a few Lloyd iterations: the clusters of separated data are found; on
    overlapping data (32 points per centroid, as cq_kv calibrates) the steps alone cut the seeding's
    error by a quarter, and with 3 Lloyd iterations after them it is within 6% of 30 plain Lloyd ones."""
    gen = torch.Generator().manual_seed(2)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    pts = (centers.repeat_interleave(500, 0) + 0.1 * torch.randn(2000, 2, generator=gen))[None]
    cent, _ = weighted_kmeans(pts, 4, iters=2, minibatch=64, steps=20, seed=0)
    assert torch.allclose(cent[0][torch.cdist(centers, cent[0]).argmin(1)], centers, atol=0.05)
    k, N = 64, 2048
    mix = torch.randn(4 * k, 4, generator=gen) * 3
    pts = mix[torch.randint(0, 4 * k, (2, N), generator=gen)] + torch.randn(2, N, 4, generator=gen)
    w = torch.rand(2, N, generator=gen)
    a, sa = weighted_kmeans(pts, k, w, iters=3, minibatch=256, steps=30, seed=0)
    b, _ = weighted_kmeans(pts, k, w, iters=3, minibatch=256, steps=30, seed=0)
    assert torch.equal(a, b)
    _, seeded = weighted_kmeans(pts, k, w, iters=0, minibatch=256, steps=0, seed=0)
    _, stepped = weighted_kmeans(pts, k, w, iters=0, minibatch=256, steps=30, seed=0)
    _, lloyd = weighted_kmeans(pts, k, w, iters=30, seed=0)
    assert stepped["weighted_error"] < 0.75 * seeded["weighted_error"], (stepped, seeded)
    assert sa["weighted_error"] <= 1.06 * lloyd["weighted_error"], (sa, lloyd)
    # a mini-batch at least as large as the data: plain Lloyd, steps + iters iterations
    c, sc = weighted_kmeans(pts, k, w, iters=3, minibatch=N, steps=5, tol=0, seed=3)
    d, sd = weighted_kmeans(pts, k, w, iters=8, tol=0, seed=3)
    assert torch.equal(c, d) and sc["iterations"] == 8


def test_cached_attention_rotates_q_with_its_tables():
    """With q_cos / q_signed_sin the op takes q before RoPE: the same as given q rotated; without them, q as it is
    (a step of 2 tokens after 5, 2 query heads a KV head, partial rotary of 8 of 16 channels)."""
    from llmc.ops.cq import cached_attention, rotate

    g = torch.Generator().manual_seed(3)
    B, H, Hq, P, S, D, rot = 2, 2, 4, 5, 2, 16, 8
    T = P + S
    books = torch.randn(H, D // 4, 16, 4, generator=g), torch.randn(H, D // 4, 16, 4, generator=g)
    past = [encode(torch.randn(B, H, P, D, generator=g), b) for b in books]
    angle = torch.arange(T)[:, None] * torch.rand(rot // 2, generator=g)[None]
    cos = torch.cat([angle.cos(), angle.cos()], -1).expand(B, 1, T, rot)
    sin = torch.cat([-angle.sin(), angle.sin()], -1).expand(B, 1, T, rot)
    q = torch.randn(B, Hq, S, D, generator=g)
    key, value = torch.randn(B, S, H * D, generator=g), torch.randn(B, S, H * D, generator=g)
    bias = torch.zeros(B, 1, Hq // H * S, T)
    args = (key, value, *past, *books, cos, sin, bias, D**-0.5)
    inside = torch.ops.llmc.cq_cached_attention(q, *args, cos[:, :, P:], sin[:, :, P:])
    outside = torch.ops.llmc.cq_cached_attention(rotate(q, cos[:, :, P:], sin[:, :, P:]), *args)
    for a, b in zip(inside, outside):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(torch.ops.llmc.cq_cached_attention(q, *args)[0], inside[0], atol=1e-3)
    with pytest.raises(ValueError, match="together"):
        cached_attention(q, *args, cos[:, :, P:], None)
