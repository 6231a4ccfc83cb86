"""ONNX Runtime backend on SmolLM2-135M: export time, file size, session load, decode speed, ppl.

    python -m benchmarks.onnxruntime_decode [--repeats 3] [--out /tmp/llmc-bench-onnx]     # from the repo root

Decode: batch 1, 128-token prompt from the test text, 128 new greedy tokens, medians of
interleaved rounds, for llmc's ORT FP32 export, llmc's torch runtime and HF eager (the
`fp_tokens_per_s` baseline), all in the same process; with --genai-python also llmc's export
and (--genai-builder-dir) genai's own FP32 build under onnxruntime-genai, in a subprocess per run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

import torch

import llmc
from benchmarks.common import genai_engine, interleaved_rates, peak_rss_mb, write_result
from llmc import data
from llmc.backends.onnxruntime import OrtModel, lower
from llmc.eval import perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/llmc-bench-onnx")
    ap.add_argument("--pass", dest="passes", action="append", default=[], help="pass spec to compile with")
    ap.add_argument("--name", default="onnxruntime_decode", help="results file name")
    ap.add_argument("--genai-python", help="a Python with onnxruntime-genai: also decode llmc's export under genai")
    ap.add_argument("--genai-builder-dir", help="a model built by onnxruntime-genai's builder, to decode too")
    ap.add_argument("--genai-builder-label", default="FP32", help="what --genai-builder-dir is (e.g. 'int4')")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    src = llmc.load_model("smollm2-135m")
    cm = llmc.compile(src, passes=args.passes)
    label = "onnxruntime " + (" + ".join(args.passes) if args.passes else "FP32")
    shutil.rmtree(args.out, ignore_errors=True)
    t0 = time.perf_counter()
    lower(cm.program, args.out)
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ort_model = OrtModel(args.out, threads=args.threads)
    load_s = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in ("model.onnx", "model.onnx.data"))

    ids = data.tokenize(src.tokenizer, data.text("wikitext2-test"))
    rows = []
    for proto in ("ppl-512x40",):
        r_ort = perplexity(ort_model, ids, proto)
        r_torch = perplexity(cm, ids, proto)
        r_fp = perplexity(src.model, ids, proto) if args.passes else r_torch
        size_report = cm.program.size_report()
        rows.append({"method": label, "passes": args.passes, "protocol": proto, "windows": r_ort.windows,
                     "ppl": round(r_ort.ppl, 4), "torch_ppl": round(r_torch.ppl, 4), "fp_ppl": round(r_fp.ppl, 4),
                     "bits_per_param": size_report["decoder_linear_bits_per_param"],
                     "seconds": {"eval": round(r_ort.seconds, 1)}})
        print(f"{proto}: ORT {r_ort.ppl:.4f}, torch {r_torch.ppl:.4f}, FP {r_fp.ppl:.4f}", flush=True)

    prompt = ids[:128].tolist()
    engines = {
        "onnxruntime": lambda: ort_model.generate(prompt, 128, ignore_eos=True, return_tokens=True),
        "torch": lambda: cm.generate(prompt, 128, ignore_eos=True, return_tokens=True),
        "hf": lambda: src.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=128, min_new_tokens=128,
                                         do_sample=False)[0, 128:].tolist(),
    }
    if args.passes:  # llmc's torch runtime dequantizes on every call: a reference, not a decoder
        del engines["torch"]
    if args.genai_python:
        engines["genai (llmc export)"] = genai_engine(args.genai_python, args.out, prompt)
        if args.genai_builder_dir:
            engines["genai (genai builder)"] = genai_engine(args.genai_python, args.genai_builder_dir, prompt)
    with torch.inference_mode():
        tps, outs = interleaved_rates(engines, args.repeats)
    med = {k: statistics.median(v) for k, v in tps.items()}
    for k in engines:
        print(f"decode {k}: {med[k]:.1f} tok/s ({med[k] / med['hf']:.2f}x HF eager)", flush=True)
    labels = [("onnxruntime", f"{label} (llmc OrtModel)"), ("torch", "torch (llmc runtime) FP32")]
    labels = [(k, m) for k, m in labels if k in engines]
    genai_label = "onnxruntime-genai " + ("FP32" if not args.passes else "+".join(args.passes))
    labels += [(k, f"{genai_label}, llmc export") for k in engines if k == "genai (llmc export)"]
    labels += [(k, f"onnxruntime-genai {args.genai_builder_label}, genai builder") for k in engines
               if k == "genai (genai builder)"]
    for name, method in labels:
        passes = [] if name.startswith("genai (genai") or name == "torch" else args.passes
        rows.append({"method": f"{method}: greedy decode, batch 1, 128+128", "passes": passes,
                     "tokens_per_s": round(med[name], 2), "fp_tokens_per_s": round(med["hf"], 2),
                     "repeats": args.repeats, "tokens_identical_to_hf": outs[name] == outs["hf"],
                     "all_tokens_per_s": [round(v, 2) for v in tps[name]],
                     "all_fp_tokens_per_s": [round(v, 2) for v in tps["hf"]]})
    path = write_result(args.name, rows, model="smollm2-135m", model_sha256=src.fingerprint,
                        data_sha256=data.sha256("wikitext2-test"),
                        extra={"seconds": {"onnx_export_with_parity": round(export_s, 1),
                                           "ort_session_load": round(load_s, 2)},
                               "onnx_bytes": size, "peak_rss_mb": round(peak_rss_mb()),
                               **({"genai_builder_onnx_bytes": sum(
                                   os.path.getsize(os.path.join(args.genai_builder_dir, f))
                                   for f in os.listdir(args.genai_builder_dir) if f.startswith("model.onnx"))}
                                  if args.genai_builder_dir else {})})
    print("wrote", path)


if __name__ == "__main__":
    main()
