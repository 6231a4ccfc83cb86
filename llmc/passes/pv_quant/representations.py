"""The two weight representations `pv_quant` calibrates and tunes: additive vector codes and scalar codes.

Calibration and PV-Tuning only need five things of a representation, so both loops are written once:
  weight()            the dequantized weight, differentiable in the continuous tensors;
  continuous()        those tensors (what block fine-tuning and the P step train);
  group               how many consecutive input weights one code group covers (the V step's unit);
  flat_codes()        a [groups, codes per group] view of the codes, to read and write in place;
  grid_scale()        each group's scale [groups]: the size of its codes' grid in weight units;
  encode / decode     nearest codes for target weight groups, and the weight values of given codes.

`VectorCodes` is AQLM's layout (`llmc.ops.vq`): a group of g inputs of row n is
s_n · Σ_m C_m[b_m]. `ScalarCodes` is uniform groupwise quantization in ONNX Runtime's MatMulNBits
form: W[n, k] = (q[n, k] − z[n, k // G]) · s[n, k // G], with integer zero points held fixed and
the scales continuous; it is initialised by GPTQ and its V-step unit is one weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmc.ops.cq import nearest
from llmc.ops.vq import dequantize


@dataclass
class VectorCodes:
    """codes [N, K/g, M] int64, codebooks [M, 2^B, 1, g], scales [N, 1, 1, 1]."""

    codes: Tensor
    codebooks: Tensor
    scales: Tensor

    @property
    def group(self) -> int:
        return self.codebooks.shape[-1]

    def weight(self) -> Tensor:
        return dequantize(self.codes, self.codebooks, self.scales)

    def continuous(self) -> list[Tensor]:
        return [self.codebooks, self.scales]

    def set_continuous(self, tensors: list[Tensor]) -> None:
        self.codebooks, self.scales = tensors

    def flat_codes(self) -> Tensor:
        N, J, M = self.codes.shape
        return self.codes.view(N * J, M)

    def grid_scale(self) -> Tensor:
        return self.scales.reshape(-1).repeat_interleave(self.codes.shape[1])

    def _rows(self, sel: Tensor) -> Tensor:
        return sel // self.codes.shape[1]

    def decode(self, sel: Tensor, codes: Tensor) -> Tensor:
        """Weight values [S, g] of the groups `sel` (flat group indices) under `codes` [S, M]."""
        C = self.codebooks[:, :, 0, :]
        return self.scales.reshape(-1, 1)[self._rows(sel)] * sum(C[m][codes[:, m]] for m in range(codes.shape[1]))

    def encode(self, sel: Tensor, target: Tensor, start: Tensor, gen: torch.Generator) -> Tensor:
        """Codes [S, M] whose decoded groups are near `target` [S, g]: greedy over the codebooks in a
        seeded random order, starting from `start` (beam search of width 1)."""
        C = self.codebooks[:, :, 0, :]
        t = target / self.scales.reshape(-1, 1)[self._rows(sel)]
        codes = start.clone()
        M = codes.shape[1]
        decoded = sum(C[m][codes[:, m]] for m in range(M))
        for m in torch.randperm(M, generator=gen).tolist():
            others = decoded - C[m][codes[:, m]]
            k, _ = nearest((t - others)[None], C[m][None])
            codes[:, m] = k[0]
            decoded = others + C[m][k[0]]
        return codes


@dataclass
class ScalarCodes:
    """codes [N, K] int64 in [0, 2^bits), scales and zeros [N, K/G] (zeros integer-valued, fixed)."""

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    bits: int

    group = 1

    def _expand(self, t: Tensor) -> Tensor:
        N, K = self.codes.shape
        return t.repeat_interleave(K // t.shape[1], dim=1)

    def weight(self) -> Tensor:
        return (self.codes.to(self.scales.dtype) - self._expand(self.zeros)) * self._expand(self.scales)

    def continuous(self) -> list[Tensor]:
        return [self.scales]

    def set_continuous(self, tensors: list[Tensor]) -> None:
        (self.scales,) = tensors

    def flat_codes(self) -> Tensor:
        return self.codes.view(-1, 1)

    def grid_scale(self) -> Tensor:
        return self._expand(self.scales).reshape(-1)

    def _params(self, sel: Tensor) -> tuple[Tensor, Tensor]:
        N, K = self.codes.shape
        G = K // self.scales.shape[1]
        rows, blocks = sel // K, (sel % K) // G
        return self.scales[rows, blocks], self.zeros[rows, blocks]

    def decode(self, sel: Tensor, codes: Tensor) -> Tensor:
        s, z = self._params(sel)
        return ((codes[:, 0].to(s.dtype) - z) * s)[:, None]

    def encode(self, sel: Tensor, target: Tensor, start: Tensor, gen: torch.Generator) -> Tensor:
        s, z = self._params(sel)
        q = torch.round(target[:, 0] / s + z).clamp(0, (1 << self.bits) - 1)
        return q.to(start.dtype)[:, None]


def scalar_from_packed(codes: Tensor, scales: Tensor, zero_points: Tensor, K: int, bits: int,
                       group: int) -> ScalarCodes:
    """ScalarCodes from MatMulNBits-layout tensors (`llmc.ops.nbits_linear`)."""
    from llmc.ops.nbits_linear import unpack_along_last

    N, G, _ = codes.shape
    q = unpack_along_last(codes, bits, group).reshape(N, G * group)[:, :K]
    z = unpack_along_last(zero_points, bits, G).float()
    return ScalarCodes(q.long().contiguous(), scales.float().contiguous(), z.contiguous(), bits)


def scalar_to_packed(q: ScalarCodes) -> tuple[Tensor, Tensor, Tensor]:
    """MatMulNBits-layout codes, scales and zero points of `q` (K a multiple of the block size)."""
    from llmc.ops.nbits_linear import pack_blocks

    N, K = q.codes.shape
    G = q.scales.shape[1]
    codes, zeros = pack_blocks(q.codes.reshape(N, G, K // G), q.zeros.round(), q.bits)
    return codes, q.scales.float().contiguous(), zeros


REPRESENTATIONS = {"aq": VectorCodes, "scalar": ScalarCodes}


def compact_codes(codes: Tensor) -> Tensor:
    """Codes in the smallest dtype that holds them, for checkpoints (int64 in memory)."""
    return codes.to(torch.uint8) if int(codes.max()) < 256 else codes.to(torch.int32)
