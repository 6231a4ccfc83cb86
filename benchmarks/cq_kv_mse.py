"""Reconstruction error of SmolLM2-135M's real keys (before RoPE) and values: CQ vs uniform at equal bits.

    python -m benchmarks.cq_kv_mse [--layers 0,7,15,23,29] [--threads 1]     # from the repository root

Keys and values are collected by running the FP model over calibration text (wikitext2-valid,
8 x 512 tokens) to fit codebooks / key ranges, and over held-out text (wikitext2-test, 4 x 512
tokens) to measure. Per layer and bits per channel: relative MSE ||x̂ - x||² / ||x||² on the
held-out tokens for CQ (plain k-means, c channels per 8-bit code) and for the uniform baseline of
`uniform_kv` (keys per channel with calibrated clipping, values per token).
"""

from __future__ import annotations

import argparse

import torch

import llmc
from benchmarks.common import write_result
from llmc import data
from llmc.kv_cache import cache_sites, collect_kv
from llmc.ops.cq import decode, encode, weighted_kmeans
from llmc.passes.uniform_kv import calibrate_channel_ranges


def uniform(x: torch.Tensor, fit: torch.Tensor, kind: str, bits: int, head_dim: int) -> torch.Tensor:
    qmax = 2 ** bits - 1
    if kind == "key":
        lo, scale = (t.reshape(1, -1) for t in calibrate_channel_ranges(fit, bits, head_dim))
    else:
        g = x.view(x.shape[0], -1, head_dim)
        lo = g.amin(-1, keepdim=True)
        scale = ((g.amax(-1, keepdim=True) - lo) / qmax).clamp_min(1e-8)
        lo, scale = lo.expand_as(g).reshape(x.shape), scale.expand_as(g).reshape(x.shape)
    return torch.clamp(torch.round((x - lo) / scale), 0, qmax) * scale + lo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0,7,15,23,29")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src = llmc.load_model("smollm2-135m")
    program = llmc.to_program(src)
    layers = [int(v) for v in args.layers.split(",")]
    sites = [s for s in cache_sites(program.gm, program.cache_layout) if s.layer in layers]
    head_dim = program.cache_layout[0].shape[3]

    def kv(source, n, seed):
        batches = data.calibration_batches(src.tokenizer, source, num_samples=n, seed=seed)
        return collect_kv(program.gm, sites, batches, lambda b: program.empty_cache(b, 0), fisher=False,
                          max_tokens=10 ** 9, seed=seed, progress=True)

    fit, test = kv("wikitext2-valid", 8, 0), kv("wikitext2-test", 4, 1)
    rows = []
    for s in sites:
        key = f"{s.layer}.{s.kind}"
        xf, xt = fit[key]["x"], test[key]["x"]
        H = xf.shape[1] // head_dim
        for c, bits in ((2, 4), (4, 2), (8, 1)):
            G = head_dim // c
            cent, _ = weighted_kmeans(xf.view(-1, H * G, c).transpose(0, 1), 256, iters=20)
            cb = cent.view(H, G, 256, c)
            xt4 = xt.view(1, -1, H, head_dim).transpose(1, 2)
            cq = decode(encode(xt4, cb), cb).transpose(1, 2).reshape(xt.shape)
            uni = uniform(xt, xf, s.kind, bits, head_dim)
            norm = float(xt.pow(2).sum())
            rows.append({"layer": s.layer, "kind": s.kind, "bits_per_channel": bits, "cq_config": f"{c}c8b",
                         "cq_relative_mse": round(float((cq - xt).pow(2).sum()) / norm, 5),
                         "uniform_relative_mse": round(float((uni - xt).pow(2).sum()) / norm, 5)})
            print(rows[-1], flush=True)
    summary = {}
    for bits in (4, 2, 1):
        for kind in ("key", "value"):
            sel = [r for r in rows if r["bits_per_channel"] == bits and r["kind"] == kind]
            summary[f"{bits}bit_{kind}"] = {m: round(sum(r[m] for r in sel) / len(sel), 5)
                                            for m in ("cq_relative_mse", "uniform_relative_mse")}
    print(summary)
    write_result("cq_kv_mse", rows, model="smollm2-135m", model_sha256=src.fingerprint,
                 data_sha256=data.sha256("wikitext2-test"), extra={"summary": summary, "layers": layers})


if __name__ == "__main__":
    main()
