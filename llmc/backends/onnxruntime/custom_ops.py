"""llmc's ONNX Runtime custom-op library (domain `llmc`): built from C source on first use, cached.

    from llmc.backends.onnxruntime.custom_ops import library_path
    opts = onnxruntime.SessionOptions(); opts.register_custom_ops_library(library_path())

The library holds, each documented in its source:
- `llmc.VQLinear`, the run-time lookup-table kernel of `llmc::vq_linear` (`vq_linear_ort.c`, which
  also holds the ONNX Runtime binding of every op);
- `llmc.CQAttention`, attention over a cache of CQ codes read as codes, `llmc.CQEncode`, the
  codes of new keys and values (`cq_ort.c`), and `llmc.CQCachedAttention`, both in one op that
  writes the step's codes into the cache it is given;
- `llmc.BinaryBasesLinear`, a linear layer of binary bases read from its packed signs
  (`binary_bases_ort.c`).
It talks to ONNX Runtime through its stable C ABI and needs no ONNX Runtime headers, only a C
compiler (`$CC`, else `cc`): it is compiled once per source, compiler and flags into
`$LLMC_CACHE/ort_ops/<digest>/` (default `~/.cache/llmc`). The
build is portable x86-64 (or the host's architecture elsewhere); the AVX-512 paths are chosen at
run time, so an export folder can carry the library to another machine of the same architecture.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess

from llmc.errors import ExportError
from llmc.fsutil import atomic_file

_HERE = os.path.dirname(__file__)
SOURCES = [os.path.join(_HERE, name) for name in ("vq_linear_ort.c", "cq_ort.c", "binary_bases_ort.c")]
HEADERS = [os.path.join(_HERE, "llmc_ort_ops.h")]
LIBRARY_NAME = "libllmc_ort_ops.so"
FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-fno-strict-aliasing"]


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


def _cache_dir() -> str:
    from llmc.models import cache_dir

    return os.path.join(cache_dir(), "ort_ops")


@functools.lru_cache(maxsize=None)
def library_path() -> str:
    """Path of the compiled library, building it if needed. Raises ExportError (with the compiler's
    message) when there is no working C compiler or the platform is not Linux/macOS."""
    if platform.system() not in ("Linux", "Darwin"):
        raise ExportError(f"llmc's ONNX Runtime custom ops are built on Linux or macOS, not {platform.system()}; "
                          "export with vq_lowering='dequantize'")
    cc = _compiler()
    if shutil.which(cc[0]) is None:
        raise ExportError(f"no C compiler '{cc[0]}' to build llmc's ONNX Runtime custom ops; install one (e.g. "
                          "`apt install gcc`), set $CC, or export with vq_lowering='dequantize'")
    source = b""
    for name in SOURCES + HEADERS:
        with open(name, "rb") as f:
            source += f.read()
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    digest = hashlib.sha256(source + repr((cc, FLAGS, version, platform.machine())).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), digest, LIBRARY_NAME)
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_file(path) as tmp:
        done = subprocess.run([*cc, *FLAGS, "-o", tmp, *SOURCES], capture_output=True, text=True)
        if done.returncode != 0:
            raise ExportError(f"building llmc's ONNX Runtime custom ops with {' '.join(cc)} failed:\n"
                              f"{done.stderr.strip()[-2000:]}")
    return path


def available() -> bool:
    """Whether the library can be built (or is built) here."""
    try:
        library_path()
    except ExportError:
        return False
    return True


ISA_LEVELS = ("portable", "avx512", "avx512-vbmi")


def set_isa_limit(level: str) -> None:
    """Limit the kernel, in this process, to an instruction set of ISA_LEVELS (for tests: every path
    on one machine); it still uses only what the CPU has."""
    ctypes.c_int.in_dll(ctypes.CDLL(library_path()), "llmc_vq_isa_limit").value = ISA_LEVELS.index(level)


def vq_linear_reference():
    """The kernel as a ctypes function, without ONNX Runtime (single thread; for tests):
    f(x, T, K, codes [J*M, N], codebooks [M, g, C], scales [N], codewords [M, C, g], y, N, M, g, C) -> 0 on
    success (pointers to contiguous float32 / uint8 buffers)."""
    lib = ctypes.CDLL(library_path())
    f = lib.llmc_vq_linear
    P, I = ctypes.c_void_p, ctypes.c_int
    f.argtypes = [P, ctypes.c_int64, I, P, P, P, P, P, I, I, I, I]
    f.restype = I
    return f


class _CQAttentionArgs(ctypes.Structure):
    """llmc_cq_attention_args of llmc_ort_ops.h."""

    _fields_ = ([(n, ctypes.c_void_p) for n in ("q", "key_codes", "key_new", "value_codes", "value_new",
                                                 "key_codebooks", "value_codebooks", "cos", "signed_sin", "bias")]
                + [("scale", ctypes.c_float)]
                + [(n, ctypes.c_int64) for n in ("B", "H", "R", "P", "S", "D", "Gk", "Kk", "ck", "Gv", "Kv", "cv",
                                                 "rot", "table_batch_stride", "bias_cols", "bias_batch_stride")]
                + [("out", ctypes.c_void_p)]
                + [(n, ctypes.c_int64) for n in ("new_batch_stride", "new_head_stride", "new_token_stride",
                                                 "codes_capacity", "heads_last")]  # 0: the default layouts
                + [(n, ctypes.c_void_p) for n in ("q_cos", "q_signed_sin")]  # NULL: q rotated already
                + [(n, ctypes.c_int64) for n in ("q_table_batch_stride", "q_token_stride", "rope_halves")])


def cq_attention_reference():
    """llmc.CQAttention's kernel as a Python function of torch tensors, without ONNX Runtime (single thread; for
    tests): f(q, key_codes, key_new, key_codebooks, value_codes, value_new, value_codebooks, cos, signed_sin, bias,
    scale, rope_halves=False) -> out, the arguments of llmc::cq_attention in its layouts (cq_ort.c); rope_halves:
    the kernel may read half of each table row (llmc_cq_attention_args)."""
    import torch

    run = ctypes.CDLL(library_path()).llmc_cq_attention
    run.argtypes = [ctypes.POINTER(_CQAttentionArgs)]
    run.restype = ctypes.c_int

    def f(q, key_codes, key_new, key_codebooks, value_codes, value_new, value_codebooks, cos, signed_sin, bias,
          scale, rope_halves=False):
        q, kc, kn, kb, vc, vn, vb, cos, sin, bias = keep = [
            t.contiguous() for t in (q, key_codes, key_new, key_codebooks, value_codes, value_new, value_codebooks,
                                     cos, signed_sin, bias)]
        B, H, R, D = q.shape
        out = torch.empty_like(q)
        pointers = [t.data_ptr() for t in (q, kc, kn, vc, vn, kb, vb, cos, sin, bias)]
        args = _CQAttentionArgs(*pointers, scale, B, H, R, kc.shape[2], kn.shape[2], D, kb.shape[1], kb.shape[2],
                                kb.shape[3], vb.shape[1], vb.shape[2], vb.shape[3], cos.shape[3],
                                0 if cos.shape[0] == 1 else cos.shape[2] * cos.shape[3], bias.shape[3],
                                0 if bias.shape[0] == 1 else R * bias.shape[3], out.data_ptr())
        args.rope_halves = int(rope_halves)
        status = run(ctypes.byref(args))
        del keep
        if status:
            raise (MemoryError if status == 2 else ValueError)(f"llmc_cq_attention failed ({status})")
        return out

    return f


class _CQEncodeArgs(ctypes.Structure):
    """llmc_cq_encode_args of llmc_ort_ops.h."""

    _fields_ = ([(n, ctypes.c_void_p) for n in ("x", "codebooks_t", "norms")]
                + [(n, ctypes.c_int64) for n in ("B", "H", "S", "G", "K", "c")] + [("codes", ctypes.c_void_p)]
                + [(n, ctypes.c_int64) for n in ("x_batch_stride", "x_head_stride", "x_token_stride", "codes_capacity",
                                                 "codes_offset")]  # 0: the default layouts
                + [("codebooks", ctypes.c_void_p)])  # row-major codebooks instead of codebooks_t (None: not)


def cq_encode_reference():
    """llmc.CQEncode's kernel as a Python function of torch tensors (single thread; for tests):
    f(x [B, H, S, D], codebooks [H, G, K, c], row_major=False) -> uint8 codes [B, H, S, G]; with row_major, the
    search reads the codebooks as they are (CQCachedAttention's) instead of channel-major (CQEncode's)."""
    import torch

    run = ctypes.CDLL(library_path()).llmc_cq_encode
    run.argtypes = [ctypes.POINTER(_CQEncodeArgs)]
    run.restype = None

    def f(x, codebooks, row_major: bool = False):
        x, books, books_t = x.contiguous(), codebooks.contiguous(), codebooks.transpose(2, 3).contiguous()
        norms = codebooks.pow(2).sum(-1).contiguous()
        B, H, S, _ = x.shape
        _, G, K, c = codebooks.shape
        codes = torch.empty(B, H, S, G, dtype=torch.uint8)
        args = _CQEncodeArgs(x.data_ptr(), books_t.data_ptr(), norms.data_ptr(), B, H, S, G, K, c, codes.data_ptr())
        if row_major:
            args.codebooks = books.data_ptr()
        run(ctypes.byref(args))
        return codes

    return f


class _BinaryBasesArgs(ctypes.Structure):
    """llmc_bb_args of llmc_ort_ops.h."""

    _fields_ = ([(n, ctypes.c_void_p) for n in ("x", "signs", "scales", "y")]
                + [(n, ctypes.c_int64) for n in ("T", "K", "N", "nb", "G")]
                + [("outlier_index", ctypes.c_void_p), ("outlier_values", ctypes.c_void_p),
                   ("outliers", ctypes.c_int64)])


def binary_bases_reference():
    """llmc.BinaryBasesLinear's kernel as a Python function of torch tensors (single thread; for tests):
    f(x [T, K], signs uint8 [nb, N, K/8], scales [nb, N, G], outlier_index=None, outlier_values=None) -> y [T, N]."""
    import torch

    run = ctypes.CDLL(library_path()).llmc_binary_bases_linear
    run.argtypes = [ctypes.POINTER(_BinaryBasesArgs)]
    run.restype = ctypes.c_int

    def f(x, signs, scales, outlier_index=None, outlier_values=None):
        x, signs, scales = x.float().contiguous(), signs.contiguous(), scales.float().contiguous()
        nb, N, J = signs.shape
        y = torch.empty(x.shape[0], N)
        k = 0 if outlier_index is None else outlier_index.shape[1]
        index = None if outlier_index is None else outlier_index.to(torch.int32).contiguous()
        values = None if outlier_values is None else outlier_values.float().contiguous()
        status = run(ctypes.byref(_BinaryBasesArgs(x.data_ptr(), signs.data_ptr(), scales.data_ptr(), y.data_ptr(),
                                                   x.shape[0], J * 8, N, nb, scales.shape[2],
                                                   index.data_ptr() if k else None,
                                                   values.data_ptr() if k else None, k)))
        if status:
            raise (MemoryError if status == 2 else ValueError)(f"llmc_binary_bases_linear failed ({status})")
        return y

    return f
