"""CPU lookup-table kernel of `llmc::vq_linear` at decode sizes (a few tokens), compiled with numba.

With M codebooks of 2^B codewords over groups of g inputs,
    y[t, n] = scales[n] * Σ_j Σ_m  x[t, j*g:(j+1)*g] · codebooks[m, codes[n, j, m], 0, :].
The dot products do not depend on the output row n: one matmul computes them all, a table
lut[t, j, m, c] of K/g * M * 2^B floats per token (144 KiB for K=576 at 2x8 g8: it stays in L2),
and each output is then a sum of K/g * M table entries picked by its codes. A row reads 1 byte per
codebook per group of g weights (2x8 g8: 0.25 B/weight) where a float32 matvec reads 4 B/weight.

The kernel wins wherever the weight is not already cached (a decode, where the whole model passes
between two uses of a layer), except on small layers where its fixed cost (the table and the call)
dominates; its cost grows with the tokens while a matvec's barely does, so `vq_linear` takes the
dequantize path past `vq.LUT_MAX_TOKENS`. benchmarks/vq_linear.py measures it per layer shape
(docs/backends/onnxruntime.md has the numbers).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import numba
    import numpy as np
except ImportError:  # numba is optional: available() says whether the kernel can run
    numba = None


def available() -> bool:
    """Whether numba imports (the kernel is compiled on first use)."""
    return numba is not None


def _jit(fn, **options):
    """numba.njit with fastmath, cached on disk when numba finds a writable folder (it raises where not)."""
    options.update(fastmath=True, nogil=True)
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available": read-only install and home
        return numba.njit(**options)(fn)


def _gather_sum_rows(lut, codes, scales, out, start, stop):
    """out[t, n] = scales[n] * Σ_i lut[t, i, codes[n, i]] for rows start <= n < stop.

    lut [T, J*M, 2^B] float32, codes [N, J*M] uint8, scales [N] float32, out [T, N] float32.
    """
    T, JM, _ = lut.shape
    for n in range(start, stop):
        row = codes[n]
        for t in range(T):
            table = lut[t]
            acc = np.float32(0.0)
            for i in range(JM):
                acc += table[i, row[i]]
            out[t, n] = acc * scales[n]


def _gather_sum_parallel(lut, codes, scales, out, blocks):
    """`_gather_sum_rows` over all rows in `blocks` contiguous blocks, in parallel (one per thread).

    The rows loop stays a function of its own: compiled alone, its inner loop is vectorized (AVX-512
    gathers); written as the body of the prange it was not, and each thread ran 2x slower.
    """
    N = codes.shape[0]
    for b in numba.prange(blocks):
        _gather_sum_rows(lut, codes, scales, out, b * N // blocks, (b + 1) * N // blocks)


if numba is not None:  # compiled on first call
    _gather_sum_rows = _jit(_gather_sum_rows)
    _gather_sum_parallel = _jit(_gather_sum_parallel, parallel=True)


def _threads() -> int:
    """Threads for the kernel: torch's count, capped by numba's pool.

    One under numba's `workqueue` layer (no OpenMP or TBB found): its workers sleep between calls
    and lose the core to torch's spinning OpenMP threads (12 ms per call measured at 2 threads,
    against 30 us with numba's OpenMP layer).
    """
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    try:
        if numba.threading_layer() == "workqueue":
            return 1
    except ValueError:  # no parallel region has run yet: the layer is not chosen
        pass
    return threads


def lut_linear(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor) -> Tensor:
    """x @ dequantize(codes, codebooks, scales)ᵀ through per-token lookup tables. x [..., K] -> [..., N].

    For a few tokens on CPU: the cost is linear in the number of tokens. codes must be uint8
    (B <= 8); computes in float32 and returns x's dtype.
    """
    if codes.dtype != torch.uint8:
        raise TypeError(f"lut_linear takes uint8 codes (at most 8-bit codebooks), got {codes.dtype}")
    N, J, M = codes.shape
    _, C, _, g = codebooks.shape
    if x.shape[-1] != J * g:
        raise ValueError(f"x has {x.shape[-1]} features, the codes cover {J} groups of {g}")
    xg = x.detach().reshape(-1, g).to(torch.float32)  # [T*J, g]
    T = xg.shape[0] // J
    words = codebooks.detach().reshape(M * C, g).to(torch.float32)
    lut = (xg @ words.t()).reshape(T, J * M, C)  # lut[t, j*M + m, c] = x_tj · codebooks[m, c]
    rows = codes.detach().reshape(N, J * M).contiguous()
    row_scales = scales.detach().reshape(N).to(torch.float32).contiguous()
    out = torch.empty(T, N, dtype=torch.float32)
    threads = _threads()
    arrays = lut.numpy(), rows.numpy(), row_scales.numpy(), out.numpy()
    if threads > 1:
        numba.set_num_threads(threads)
        _gather_sum_parallel(*arrays, threads)
    else:
        # No parallel region: even one of a single thread goes through numba's OpenMP pool, whose
        # wake-ups took a scheduler time slice (8-12 ms) when other processes held the cores.
        _gather_sum_rows(*arrays, 0, N)
    return out.reshape(*x.shape[:-1], N).to(x.dtype)
