"""KV-cache quantization on SmolLM2-135M: CQ vs uniform at 4/2/1 bits per channel, KV-chunked perplexity.

    python -m benchmarks.cq_kv [--windows 5] [--rows cq-4c8b,uniform-2,...] [--redo] [--ort]

(from the repository root). `kivi-*` rows are KIVI's cache (uniform_kv:mode=kivi): their bits per
channel include the fp16 scales and zero points, and their float tail is counted in the fixed bytes.

Each row compiles the model with one cache pass (calibrating on wikitext2-valid) and scores
`ppl-512x<windows>-kv`: per 512-token window, prefill 256 tokens, then chunks of 32 through the
cache the graph really carries. Rows are written as they finish and skipped when already in the
results file for the same protocol, so an interrupted run resumes. Calibration activations and
codebooks are kept in --cache-dir and shared between rows.

Also per row, from the Program's size report (`size_report()["kv_cache"]`, recorded as `kv_cache`):
bits per channel, KV bytes per token per layer, fixed bytes (codebooks, key ranges, float
windows), and from them the largest context whose cache fits in 1 GiB at batch 1. With --ort: the
FP and the `--ort-pass` models exported to ONNX (the latter with llmc.CQAttention and with standard
ops, both with their ORT perplexity beside torch's), decode tokens/s (batch 1, 128+128, medians of
interleaved rounds) and parity, in the same run.

Accounting of rows written before the size report had a `kv_cache` entry (rows without
`kv_cache`), where it differs: `uniform-N` rows' `bits_per_channel` was N, the key and value codes
only (the report adds the values' fp16 scale and zero per token: N + 0.25 at head dim 64, as the
bytes per token always counted them); their `kv_fixed_bytes` left out the per-channel key ranges;
and CQ rows' `kv_bytes_per_token_per_layer` was the uint8 code storage (the report's
`stored_bytes_per_token`), which equals the packed b/c accounting for 8-bit codes, every CQ row so
far. `codebook_bytes` is now `kv_table_bytes` (codebooks, or uniform_kv's key ranges).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import time

import torch

import llmc
from benchmarks.common import STARTED_AT, interleaved_rates, load_rows, peak_rss_mb, write_result
from llmc import data
from llmc.eval import perplexity

ROWS = {  # cq_kv rows without "-x": every token read back from codes (exact_current=false)
    "fp": [],
    "uniform-4": ["uniform_kv:bits=4"],
    "cq-2c8b": ["cq_kv:config=2c8b,exact_current=false"],
    "uniform-2": ["uniform_kv:bits=2"],
    "cq-4c8b": ["cq_kv:config=4c8b,exact_current=false"],
    "cq-4c8b-plain": ["cq_kv:config=4c8b,fisher=false,exact_current=false"],
    "cq-4c8b-c32": ["cq_kv:config=4c8b,calib_sequences=32,tokens=16384,exact_current=false"],
    "cq-2c8b-c32": ["cq_kv:config=2c8b,calib_sequences=32,tokens=16384,exact_current=false"],
    "cq-4c8b-w32": ["cq_kv:config=4c8b,window=32,exact_current=false"],
    "cq-4c8b-w128": ["cq_kv:config=4c8b,window=128,exact_current=false"],
    "cq-4c8b-s4": ["cq_kv:config=4c8b,sink=4,exact_current=false"],
    "cq-4c8b-s4-w32": ["cq_kv:config=4c8b,sink=4,window=32,exact_current=false"],
    "cq-4c8b-s4-w128": ["cq_kv:config=4c8b,sink=4,window=128,exact_current=false"],
    "uniform-1": ["uniform_kv:bits=1"],
    "cq-8c8b": ["cq_kv:config=8c8b,exact_current=false"],
    "cq-8c8b-plain": ["cq_kv:config=8c8b,fisher=false,exact_current=false"],
    "cq-8c8b-w32": ["cq_kv:config=8c8b,window=32,exact_current=false"],
    "cq-8c8b-w128": ["cq_kv:config=8c8b,window=128,exact_current=false"],
    "cq-8c8b-s4": ["cq_kv:config=8c8b,sink=4,exact_current=false"],
    # KIVI's cache (groups of 32, newest 128 tokens float, fp16 scale + zero per group: +1 bit/channel)
    "kivi-2": ["uniform_kv:mode=kivi,bits=2"],
    "kivi-2-r0": ["uniform_kv:mode=kivi,bits=2,residual=0"],
    "kivi-2-g64": ["uniform_kv:mode=kivi,bits=2,group=64,value_group=64"],
    "kivi-2-g128-r0": ["uniform_kv:mode=kivi,bits=2,group=128,value_group=64,residual=0"],
    "kivi-4": ["uniform_kv:mode=kivi,bits=4"],
    "kivi-4-r0": ["uniform_kv:mode=kivi,bits=4,residual=0"],
    "kivi-1": ["uniform_kv:mode=kivi,bits=1"],
    "kivi-1-r0": ["uniform_kv:mode=kivi,bits=1,residual=0"],
    # exact current step (cq_kv's default): a step's tokens attend to each other unquantized (as transformers'
    # QuantizedCache, measured in BENCHMARKS.md, runs a prefill); the cache stores the same codes
    "kivi-2-g64-x": ["uniform_kv:mode=kivi,bits=2,group=64,value_group=64,exact_current=true"],
    "kivi-2-x": ["uniform_kv:mode=kivi,bits=2,exact_current=true"],
    "kivi-2-r0-x": ["uniform_kv:mode=kivi,bits=2,residual=0,exact_current=true"],
    "kivi-4-x": ["uniform_kv:mode=kivi,bits=4,exact_current=true"],
    "kivi-1-x": ["uniform_kv:mode=kivi,bits=1,exact_current=true"],
    "cq-4c8b-x": ["cq_kv:config=4c8b,exact_current=true"],
    "cq-4c8b-w128-x": ["cq_kv:config=4c8b,window=128,exact_current=true"],
    "cq-8c8b-x": ["cq_kv:config=8c8b,exact_current=true"],
    "cq-2c8b-x": ["cq_kv:config=2c8b,exact_current=true"],
    "cq-4c8b-plain-x": ["cq_kv:config=4c8b,fisher=false,exact_current=true"],
    "cq-8c8b-plain-x": ["cq_kv:config=8c8b,fisher=false,exact_current=true"],
    "cq-8c8b-w128-x": ["cq_kv:config=8c8b,window=128,exact_current=true"],
}
GIB = 1 << 30


def kivi_tail_bytes(program) -> int:
    """KIVI's float tail (the newest `residual` tokens and an unfinished key group, fp16), which
    uniform_kv simulates in float32 and the cache layout does not describe: computed here from the
    pass config, 0 for every other cache."""
    cfg = next((h.config for h in program.history if h.name == "uniform_kv"), None)
    if not cfg or cfg.get("mode", "static") != "kivi":
        return 0
    c = program.cache_layout[0]
    heads, dim = c.shape[1], c.shape[3]
    return program.num_layers * 2 * heads * dim * 2 * (cfg["residual"] + cfg["group"] - 1)


def kv_cost(program) -> dict:
    """What the cache costs, from the Program's size report (`size_report()["kv_cache"]`, kept whole
    as `kv_cache`): bits per channel and bytes per token as a real cache of the representation
    stores them (packed codes, scales, zero points), fixed bytes (codebooks / key ranges, float
    windows; plus KIVI's float tail, `kivi_tail_bytes`), and the context that fits in 1 GiB."""
    size = program.size_report()
    kv = size["kv_cache"]
    layers = program.num_layers
    tables = size["components"].get("kv cache codebooks/ranges", {}).get("bytes", 0)
    fixed = kv["fixed_bytes"] + kivi_tail_bytes(program)
    return {"bits_per_channel": kv["bits_per_channel"],
            # packed accounting (bytes_per_token); the runtime's storage beside it (stored_bytes_per_token)
            "kv_bytes_per_token_per_layer": round(kv["bytes_per_token"] / layers, 2),
            "kv_stored_bytes_per_token_per_layer": round(kv["stored_bytes_per_token"] / layers, 2),
            "kv_fixed_bytes": fixed, "kv_table_bytes": tables,
            "max_context_1gib_batch1": int((GIB - fixed) // kv["bytes_per_token"]), "kv_cache": kv}


def decode_speed(args, src, ids, rows, protocol: str):
    """Export FP and `--ort-pass` (default CQ 4c8b) to ONNX, the latter with the kernel lowering (llmc.CQAttention)
    and with standard ops; decode speed of the three, interleaved, same prompt; the perplexity of both CQ exports
    and of the same compiled model in torch under `protocol`."""
    from llmc.backends.onnxruntime import OrtModel, lower

    calib = data.calibration_batches(src.tokenizer, "wikitext2-valid", seed=0)
    models, ppl = {}, {}
    cq = llmc.compile(src, passes=[f"{args.ort_pass},cache_dir={args.cache_dir}"], calibration=calib)
    ppl["torch"] = perplexity(cq, ids, protocol).ppl
    for label, cm, lowering in (("fp", llmc.compile(src), "auto"), ("cq", cq, "auto"), ("cq-std", cq, "dequantize")):
        out = os.path.join(args.out, label)
        shutil.rmtree(out, ignore_errors=True)
        lower(cm.program, out, vq_lowering=lowering)
        with open(os.path.join(out, "llmc_onnx.json")) as f:
            manifest = json.load(f)
        models[label] = (OrtModel(out, threads=args.threads), manifest["parity"], manifest["vq_lowering"],
                         manifest["fusions"])
        if label != "fp":
            ppl[label] = perplexity(models[label][0], ids, protocol).ppl
    prompt = ids[:128].tolist()
    engines = {label: (lambda m=m: m.generate(prompt, 128, ignore_eos=True, return_tokens=True))
               for label, (m, *_) in models.items()}
    tps, tokens = interleaved_rates(engines, args.repeats)
    med = {k: statistics.median(v) for k, v in tps.items()}
    for label, (m, parity, lowering, fusions) in models.items():
        what = "fp" if label == "fp" else args.ort_pass
        entry = {"row": f"ort-{label}", "method": f"ONNX Runtime, {what} cache ({lowering} lowering): greedy decode, "
                 "batch 1, 128+128", "vq_lowering": lowering, "fusions": fusions,
                 "tokens_per_s": round(med[label], 2), "fp_cache_tokens_per_s": round(med["fp"], 2),
                 "ratio_to_fp_cache": round(med[label] / med["fp"], 3),
                 "all_tokens_per_s": [round(v, 2) for v in tps[label]], "parity": parity,
                 "same_tokens_as_fp_cache": tokens[label] == tokens["fp"], "commit": STARTED_AT}
        if label in ppl:
            entry.update({"ort_protocol": protocol, "ort_ppl": round(ppl[label], 4),
                          "torch_ppl": round(ppl["torch"], 4), "ort_minus_torch": round(ppl[label] - ppl["torch"], 4)})
        rows.append(entry)
        print(f"decode {label}: {med[label]:.1f} tok/s ({med[label] / med['fp']:.2f}x FP cache), parity {parity}"
              + (f", ppl {ppl[label]:.4f} (torch {ppl['torch']:.4f})" if label in ppl else ""), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/llmc/cq_kv"))
    ap.add_argument("--name", default=None, help="results file (default cq_kv_<windows>w)")
    ap.add_argument("--ort", action="store_true", help="also export FP and --ort-pass to ONNX and time decode")
    ap.add_argument("--ort-pass", default="cq_kv:config=4c8b", help="the cq_kv spec exported with --ort")
    ap.add_argument("--out", default="/tmp/llmc-bench-cq")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--redo", action="store_true", help="measure the --rows again even when the results file has them")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    name = args.name or f"cq_kv_{args.windows}w"
    protocol = f"ppl-512x{args.windows}-kv"

    src = llmc.load_model("smollm2-135m")
    ids = data.tokenize(src.tokenizer, data.text("wikitext2-test"))
    calib = data.calibration_batches(src.tokenizer, "wikitext2-valid", seed=0)
    rows = [r for r in load_rows(name) if r.get("protocol") == protocol]
    done = {r["row"] for r in rows}
    fp_ppl = next((r["ppl"] for r in rows if r["row"] == "fp"), None)

    def save():
        write_result(name, rows, model="smollm2-135m", model_sha256=src.fingerprint,
                     data_sha256=data.sha256("wikitext2-test"),
                     extra={"calibration": {"data": "wikitext2-valid", "sha256": data.sha256("wikitext2-valid"),
                                            "sequences": 16, "seq_len": 512},
                            "peak_rss_mb": round(peak_rss_mb())})

    wanted = [r for r in args.rows.split(",") if r]
    for row in ["fp"] + [r for r in wanted if r != "fp"]:  # every ratio needs the FP row first
        if row not in ROWS:
            raise SystemExit(f"unknown row '{row}'; choose from {', '.join(ROWS)}")
        if row in done and not (args.redo and row in wanted):
            continue
        rows = [r for r in rows if r["row"] != row]
        passes = [p if p.startswith("uniform") else f"{p},cache_dir={args.cache_dir}" for p in ROWS[row]]
        t0 = time.perf_counter()
        cm = llmc.compile(src, passes=passes, calibration=calib if passes else None)
        compile_s = time.perf_counter() - t0
        r = perplexity(cm, ids, protocol)
        if row == "fp":
            fp_ppl = r.ppl
        entry = {"row": row, "method": f"KV cache {row}: {' + '.join(ROWS[row]) or 'float32'}", "passes": ROWS[row],
                 "protocol": protocol, "windows": r.windows, "ppl": round(r.ppl, 4), "fp_ppl": round(fp_ppl, 4),
                 "x_fp": round(r.ppl / fp_ppl, 4),
                 **kv_cost(cm.program),
                 "seconds": {"compile_and_calibrate": round(compile_s, 1), "eval": round(r.seconds, 1)},
                 "commit": STARTED_AT}
        if cm.program.history:
            stats = cm.program.history[-1].stats
            entry["mean_relative_mse"] = stats.get("mean_relative_mse")
        rows.append(entry)
        print(json.dumps({k: entry[k] for k in ("row", "ppl", "x_fp", "kv_bytes_per_token_per_layer",
                                                 "max_context_1gib_batch1")}), flush=True)
        save()
    if args.ort and not any(r["row"].startswith("ort-") for r in rows):
        decode_speed(args, src, ids, rows, protocol)
        save()
    print("peak RSS", round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "MB")


if __name__ == "__main__":
    main()
