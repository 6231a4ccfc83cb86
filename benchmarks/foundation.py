"""Foundation benchmark on SmolLM2-135M: FP perplexity, trace time, forward and decode speed.

    python -m benchmarks.foundation [--windows 40] [--repeats 3]     # from the repository root

Rows: FP ppl (ppl-512x40 and ppl-512x5 through the traced graph, ppl-512x5 through HF eager as
a cross-check), a 512-token forward (traced graph vs HF eager), and greedy decode tokens/s at
batch 1 with a 128-token prompt and 128 new tokens (traced graph with its functional cache vs
HF eager `generate` with its DynamicCache), medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import llmc
from benchmarks.common import median_time, peak_rss_mb, write_result
from llmc import data
from llmc.eval import perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    src = llmc.load_model("smollm2-135m")
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    program = llmc.to_program(src)
    trace_s = time.perf_counter() - t0
    cm = llmc.CompiledModel(program)
    ids = data.tokenize(src.tokenizer, data.text("wikitext2-test"))
    rows = []

    # -- quality -----------------------------------------------------------------------------
    for proto in (f"ppl-512x{args.windows}", "ppl-512x5"):
        r = perplexity(cm, ids, proto)
        rows.append({"method": "torch (traced)", "passes": [], "protocol": r.protocol, "windows": r.windows,
                     "ppl": round(r.ppl, 4), "fp_ppl": None, "seconds": {"eval": round(r.seconds, 1)}})
        print(f"traced {r.protocol}: {r.ppl:.4f}", flush=True)
    r = perplexity(src.model, ids, "ppl-512x5")
    rows.append({"method": "torch (HF eager)", "passes": [], "protocol": r.protocol, "windows": r.windows,
                 "ppl": round(r.ppl, 4), "fp_ppl": None, "seconds": {"eval": round(r.seconds, 1)}})
    print(f"HF eager {r.protocol}: {r.ppl:.4f}", flush=True)

    # -- 512-token forward -----------------------------------------------------------------------
    x = ids[None, :512]
    with torch.inference_mode():
        cm(x)  # warm-up
        src.model(input_ids=x)
        fwd_traced, _ = median_time(lambda: cm(x), args.repeats)
        fwd_eager, _ = median_time(lambda: src.model(input_ids=x, use_cache=False), args.repeats)
    print(f"forward 512: traced {fwd_traced:.2f} s, eager {fwd_eager:.2f} s", flush=True)

    # -- greedy decode: 128-token prompt, 128 new tokens, interleaved rounds ------------------------
    prompt = ids[:128].tolist()
    traced_tps, eager_tps, same = [], [], True
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ours = [cm.generate(prompt, 128, ignore_eos=True, return_tokens=True)]
        traced_tps.append(128 / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        with torch.inference_mode():
            ref = src.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=128, min_new_tokens=128,
                                     do_sample=False)
        eager_tps.append(128 / (time.perf_counter() - t0))
        same = same and ours[0] == ref[0, 128:].tolist()
    print(f"decode: traced {statistics.median(traced_tps):.1f} tok/s, eager {statistics.median(eager_tps):.1f} tok/s,"
          f" identical tokens: {same}", flush=True)
    fp = next(r["ppl"] for r in rows if r["protocol"] == f"ppl-512x{args.windows}")
    fp5 = next(r["ppl"] for r in rows if r["protocol"] == "ppl-512x5" and r["method"] == "torch (traced)")
    for r in rows:
        r["fp_ppl"] = fp if r["protocol"] == f"ppl-512x{args.windows}" else fp5
    rows += [
        {"method": "torch (traced): forward 512 tokens", "passes": [], "seconds": {"median": round(fwd_traced, 3)},
         "fp_seconds": round(fwd_eager, 3), "repeats": args.repeats},
        {"method": "torch (traced): greedy decode, batch 1, 128+128", "passes": [],
         "tokens_per_s": round(statistics.median(traced_tps), 2),
         "fp_tokens_per_s": round(statistics.median(eager_tps), 2), "repeats": args.repeats,
         "tokens_identical_to_hf": same,
         "all_tokens_per_s": [round(v, 2) for v in traced_tps], "all_fp_tokens_per_s": [round(v, 2) for v in eager_tps]},
    ]
    path = write_result("foundation", rows, model="smollm2-135m", model_sha256=src.fingerprint,
                        data_sha256=data.sha256("wikitext2-test"),
                        extra={"seconds": {"load": round(load_s, 1), "trace": round(trace_s, 1)},
                               "peak_rss_mb": round(peak_rss_mb()), "program_nodes": len(program.gm.graph.nodes)})
    print("wrote", path)


if __name__ == "__main__":
    main()
