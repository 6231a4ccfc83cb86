"""llmc::binary_bases_linear: packed signs, the reference, the table kernel, gradients and accounting."""

import pytest
import torch

import llmc.ops  # noqa: F401
from llmc.ops import binary_bases as bb

pytestmark = pytest.mark.usefixtures("one_thread")
needs_numba = pytest.mark.skipif(not bb.kernel_available(), reason="numba is not installed")


def _random(nb, N, K, G, seed=0):
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 256, (nb, N, K // 8), dtype=torch.uint8, generator=gen)
    scales = (0.5 ** torch.arange(nb).float())[:, None, None] * (0.02 + 0.03 * torch.rand(nb, N, G, generator=gen))
    return signs, scales


def test_pack_unpack_round_trip_is_exact():
    gen = torch.Generator().manual_seed(0)
    B = torch.rand(3, 5, 64, generator=gen) > 0.5
    packed = bb.pack_signs(B)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 8)
    pm = bb.unpack_signs(packed)
    assert torch.equal(pm, B.float() * 2 - 1)
    assert torch.equal(bb.pack_signs(pm), packed)
    # bit t of byte j is input 8j + t, low bit first
    one = torch.zeros(16, dtype=torch.bool)
    one[9] = True
    assert bb.pack_signs(one).tolist() == [0, 2]
    with pytest.raises(ValueError, match="multiple of 8"):
        bb.pack_signs(torch.ones(12))


def test_dequantize_is_the_sum_of_scaled_bases():
    signs, scales = _random(3, 6, 32, 2)
    B = bb.unpack_signs(signs)  # [3, 6, 32]
    expected = torch.zeros(6, 32)
    for i in range(3):
        for g in range(2):
            expected[:, g * 16:(g + 1) * 16] += scales[i, :, g:g + 1] * B[i, :, g * 16:(g + 1) * 16]
    torch.testing.assert_close(bb.dequantize(signs, scales), expected, rtol=0, atol=1e-7)


@needs_numba
@pytest.mark.parametrize("tokens", [1, 2, 4, 16, 33], ids=lambda t: f"{t}tok")
@pytest.mark.parametrize("nb,N,K,G", [(4, 96, 64, 1), (2, 40, 128, 4), (3, 24, 576, 9)])
def test_table_kernel_matches_reference(tokens, nb, N, K, G):
    signs, scales = _random(nb, N, K, G, seed=tokens)
    x = torch.randn(tokens, K, generator=torch.Generator().manual_seed(1))
    ref = bb.reference_linear(x, signs, scales)
    got = bb.table_linear(x, signs, scales)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 3, 64), (2, 5, 64), (2, 1, 64)])
def test_op_matches_reference_at_decode_and_prompt_shapes(shape):
    signs, scales = _random(4, 48, 64, 2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    y = torch.ops.llmc.binary_bases_linear(x, signs, scales.half())
    assert y.shape == (*shape[:-1], 48)
    ref = x @ bb.dequantize(signs, scales.half()).t()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_gradients_of_input_and_scales_match_autograd_through_the_weight():
    signs, scales = _random(3, 20, 32, 2)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    s = scales.clone().requires_grad_(True)
    up = torch.randn(2, 5, 20, generator=torch.Generator().manual_seed(4))
    (torch.ops.llmc.binary_bases_linear(x, signs, s) * up).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    s2 = scales.clone().requires_grad_(True)
    (torch.nn.functional.linear(x2, bb.dequantize(signs, s2)) * up).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-5, atol=1e-6)


def test_bits_per_weight():
    assert bb.bits_per_weight(4, 576) == 4 + 4 * 16 / 576
    assert bb.bits_per_weight(3, 576, groups=9) == 3 + 3 * 9 * 16 / 576
    assert bb.bits_per_weight(2, 1536, groups=1, scale_bits=32) == 2 + 2 * 32 / 1536


def test_bad_layouts_are_refused():
    signs, scales = _random(2, 8, 64, 1)
    with pytest.raises(TypeError, match="uint8"):
        bb.table_linear(torch.randn(1, 64), signs.int(), scales)
    with pytest.raises(ValueError, match="scales must be"):
        bb.table_linear(torch.randn(1, 64), signs, scales[:, :, :1].expand(2, 8, 3).contiguous())
    with pytest.raises(ValueError, match="whole bytes"):
        bb.table_linear(torch.randn(1, 64), signs, torch.ones(2, 8, 16))
    with pytest.raises(ValueError, match="features"):
        bb.table_linear(torch.randn(1, 32), signs, scales)


def test_op_exports_with_torch_export():
    signs, scales = _random(2, 16, 32, 1)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("signs", signs)
            self.register_buffer("scales", scales)

        def forward(self, x):
            return torch.ops.llmc.binary_bases_linear(x, self.signs, self.scales)

    ep = torch.export.export(Layer(), (torch.randn(2, 3, 32),))
    assert any(n.target is torch.ops.llmc.binary_bases_linear.default for n in ep.graph.nodes)
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(ep.module()(x), Layer()(x))
