"""What calibration costs on SmolLM2-135M: seconds and peak resident memory of each calibrating pass, each
compiled in a fresh process, beside the floor (the same process compiling with no pass); and torch-runtime
greedy generation at batch 1 and batch 4: seconds per sequence (the whole batch's time over its size),
time to the first token (the prefill), and decode tokens/s per sequence after it.

    python -m benchmarks.calibration_cost [--rows cq_kv,gptq_quant,...] [--threads 2]

(from the repository root). A row's `peak_rss_mb` is the child process's peak (ru_maxrss): model loading,
tracing and the pass together; `pass_seconds` is the pass alone, from the model's history, and
`pass_peak_rss_mb_before` the peak before the pass ran (the floor it adds to).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from benchmarks.common import load_rows, write_result

NAME = "calibration_cost"
# row -> (pass specs, calibration data); the calibrating passes at the settings their docs measure
ROWS = {
    "none": ([], None),
    "cq_kv": (["cq_kv:config=4c8b"], "wikitext2-valid"),
    "uniform_kv-static": (["uniform_kv:mode=static,bits=4"], "wikitext2-valid"),
    "gptq_quant": (["gptq_quant:bits=4,group=64"], "wikitext2-valid"),
    "structured_ffn": (["structured_ffn:kind=blockdense,budget=0.63"], "wikitext2-valid"),
    "ircan-4": (["ircan:task=memotrap,samples=4,h=4,beta=2"], None),
    "pv_quant-scalar4": (["pv_quant:format=scalar,bits=4,code_change=0.0001,trust_ratio=0"], "wikitext2-valid"),
}

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
import llmc
passes, calib = json.loads(sys.argv[1]), (sys.argv[2] or None)
t0 = time.perf_counter()
cm = llmc.compile("smollm2-135m", passes=passes, calibration=calib, progress=False)
total = time.perf_counter() - t0
h = cm.program.history[-1] if cm.program.history else None
print("RESULT " + json.dumps({"seconds": round(total, 1), "peak_rss_mb": round(resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "pass_seconds": round(h.seconds, 1) if h else 0.0,
    "pass_peak_rss_mb_before": h.stats.get("peak_rss_mb_before") if h else None}))
"""


def decode_rows(threads: int, new_tokens: int = 32, prompt_tokens: int = 64) -> list[dict]:
    """Greedy decode on the torch runtime: tokens/s per sequence at batch 1 and 4 (same prompts' first row)."""
    import llmc
    from llmc import data

    torch.set_num_threads(threads)
    cm = llmc.compile("smollm2-135m", progress=False)
    ids = data.tokenize(cm.tokenizer, data.text("wikitext2-test"))
    prompts = [ids[i * prompt_tokens:(i + 1) * prompt_tokens].tolist() for i in range(4)]
    cm.generate(prompts[:1], 4, return_tokens=True, ignore_eos=True)  # warm-up
    runs = []
    for batch in (1, 4, 1, 4):  # interleaved
        for n in (1, new_tokens):  # one token (the prefill and its token), then all of them
            t0 = time.perf_counter()
            out = cm.generate(prompts[:batch], n, return_tokens=True, ignore_eos=True)
            runs.append({"batch": batch, "new": n, "seconds": time.perf_counter() - t0})
            assert all(len(r) == n for r in out)
    result = []
    for batch in (1, 4):
        first = min(r["seconds"] for r in runs if r["batch"] == batch and r["new"] == 1)
        best = min(r["seconds"] for r in runs if r["batch"] == batch and r["new"] == new_tokens)
        result.append({"row": f"decode-batch{batch}", "batch": batch, "prompt_tokens": prompt_tokens,
                       "new_tokens": new_tokens, "seconds": round(best, 2),
                       "seconds_per_sequence": round(best / batch, 3),
                       "time_to_first_token_s": round(first, 3),
                       "decode_tokens_per_s_per_sequence": round((new_tokens - 1) / (best - first), 2),
                       "tokens_per_s_per_sequence": round(new_tokens / best, 2),
                       "tokens_per_s": round(batch * new_tokens / best, 2), "threads": threads})
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(list(ROWS) + ["decode"]),
                    help=f"comma-separated: {', '.join(ROWS)}, decode")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    wanted = [r for r in args.rows.split(",") if r]
    unknown = [r for r in wanted if r not in ROWS and r != "decode"]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}, decode")
    rows = {r["row"]: r for r in load_rows(NAME)}
    for name in wanted:
        if name == "decode":
            for r in decode_rows(args.threads):
                rows[r["row"]] = r
                print(r, flush=True)
            continue
        passes, calib = ROWS[name]
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(passes), calib or "", str(args.threads)],
                              capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"row {name} failed (exit {proc.returncode})")
        rows[name] = {"row": name, "passes": " ".join(passes) or "none", "calibration": calib,
                      **json.loads(line[len("RESULT "):]), "threads": args.threads}
        print(rows[name], flush=True)
    import hashlib

    from llmc.data import resolve
    from llmc.models import load_model

    digest = hashlib.sha256(open(resolve("wikitext2-valid"), "rb").read()).hexdigest()
    print(write_result(NAME, list(rows.values()), model="smollm2-135m",
                       model_sha256=load_model("smollm2-135m").fingerprint, data_sha256=digest))


if __name__ == "__main__":
    main()
