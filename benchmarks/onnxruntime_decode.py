"""ONNX Runtime backend on SmolLM2-135M: export time, file size, session load, decode speed, ppl.

    python -m benchmarks.onnxruntime_decode [--repeats 3] [--out /tmp/llmc-bench-onnx]     # from the repo root

Decode: batch 1, 128-token prompt from the test text, 128 new greedy tokens, medians of
interleaved rounds, for llmc's ORT FP32 export, llmc's torch runtime and HF eager (the
`fp_tokens_per_s` baseline), all in the same process; with --genai-python also llmc's export
and (--genai-builder-dir) genai's own FP32 build under onnxruntime-genai, in a subprocess per run.
--fuse both exports the program with and without the backend's fused lowering and evaluates and
decodes both in the same run (rows labelled "fused" / "unfused"; --fuse on, the default, and off
export one; every row records its setting under "fuse"). With both, each ORT decode runs in a
subprocess of its own (one ORT model per process, as the timings here require; a warm-up decode
of 8 tokens, then the timed one; the process start and model load are not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

import llmc
from benchmarks.common import SelfTimed, genai_engine, interleaved_rates, peak_rss_mb, write_result
from llmc import data
from llmc.backends.onnxruntime import OrtModel, lower
from llmc.eval import perplexity


_ORT_DECODE = """
import json, sys, time
import torch
from llmc.backends.onnxruntime import OrtModel
folder, threads, prompt_file, new = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
model = OrtModel(folder, threads=threads)
prompt = json.load(open(prompt_file))
model.generate(prompt, 8, ignore_eos=True, return_tokens=True)
t0 = time.perf_counter()
tokens = model.generate(prompt, new, ignore_eos=True, return_tokens=True)
print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": tokens}))
"""


def ort_subprocess_engine(folder: str, threads: int, prompt: list[int], new_tokens: int = 128):
    """A decode engine for interleaved_rates: llmc's OrtModel on `folder` in a subprocess of its own,
    rated by its own timing of the decode (after a warm-up decode of 8 tokens)."""
    prompt_file = folder.rstrip("/") + "-prompt.json"
    with open(prompt_file, "w") as f:
        json.dump(prompt, f)

    def run() -> SelfTimed:
        res = subprocess.run([sys.executable, "-c", _ORT_DECODE, folder, str(threads), prompt_file, str(new_tokens)],
                             capture_output=True, text=True, env={**os.environ, "LLMC_QUIET": "1"})
        if res.returncode != 0:
            raise RuntimeError(f"OrtModel decode failed on {folder}: {res.stderr.strip()[-2000:]}")
        out = json.loads(res.stdout.strip().splitlines()[-1])
        return SelfTimed((out["tokens"], out["seconds"]))
    return run


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
    ap.add_argument("--fuse", choices=("on", "off", "both"), default="on",
                    help="the backend's fused lowering (backend option fuse): on, off, or both in the same run")
    ap.add_argument("--no-ppl", action="store_true", help="decode rows only (skip the ppl-512x40 evaluations)")
    ap.add_argument("--ort-ppl-only", action="store_true",
                    help="evaluate only the ONNX exports (rows without torch_ppl / fp_ppl: a fused/unfused comparison)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()  # the machine may be shared: recorded beside the timings

    src = llmc.load_model("smollm2-135m")
    cm = llmc.compile(src, passes=args.passes)
    label = "onnxruntime " + (" + ".join(args.passes) if args.passes else "FP32")
    settings = {"on": [True], "off": [False], "both": [True, False]}[args.fuse]
    ort_models, export_s, load_s, size, fusions = {}, {}, {}, {}, {}
    for fuse in settings:  # the first folder is args.out (the one genai decodes)
        folder = args.out if fuse == settings[0] else args.out + "-unfused"
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        lower(cm.program, folder, fuse=fuse)
        export_s[fuse] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        ort_models[fuse] = OrtModel(folder, threads=args.threads)
        load_s[fuse] = round(time.perf_counter() - t0, 2)
        size[fuse] = sum(os.path.getsize(os.path.join(folder, f)) for f in ("model.onnx", "model.onnx.data"))
        fusions[fuse] = ort_models[fuse].manifest.get("fusions", {})
    tag = {True: "fused", False: "unfused"}
    suffix = (lambda fuse: f" ({tag[fuse]})") if len(settings) > 1 else (lambda fuse: "")
    engine = {fuse: "onnxruntime" + suffix(fuse) for fuse in settings}

    ids = data.tokenize(src.tokenizer, data.text("wikitext2-test"))
    rows = []
    for proto in () if args.no_ppl else ("ppl-512x40",):
        r_torch = None if args.ort_ppl_only else perplexity(cm, ids, proto)
        r_fp = None if args.ort_ppl_only else perplexity(src.model, ids, proto) if args.passes else r_torch
        size_report = cm.program.size_report()
        for fuse in settings:
            r_ort = perplexity(ort_models[fuse], ids, proto)
            rows.append({"method": label + suffix(fuse), "passes": args.passes, "fuse": fuse, "protocol": proto,
                         "windows": r_ort.windows, "ppl": round(r_ort.ppl, 4),
                         **({} if r_torch is None else {"torch_ppl": round(r_torch.ppl, 4),
                                                        "fp_ppl": round(r_fp.ppl, 4)}),
                         "bits_per_param": size_report["decoder_linear_bits_per_param"],
                         "seconds": {"eval": round(r_ort.seconds, 1)}})
            ref = "" if r_torch is None else f", torch {r_torch.ppl:.4f}, FP {r_fp.ppl:.4f}"
            print(f"{proto}{suffix(fuse)}: ORT {r_ort.ppl:.4f}{ref}", flush=True)

    prompt = ids[:128].tolist()
    if len(settings) > 1:  # one ORT model per process: each setting decodes in a subprocess
        decoders = {engine[fuse]: ort_subprocess_engine(ort_models[fuse].folder, args.threads, prompt)
                    for fuse in settings}
        ort_models.clear()
    else:
        decoders = {engine[fuse]: (lambda m=ort_models[fuse]: m.generate(prompt, 128, ignore_eos=True,
                                                                         return_tokens=True)) for fuse in settings}
    engines = {
        **decoders,
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
    labels = [(engine[fuse], f"{label}{suffix(fuse)} (llmc OrtModel)") for fuse in settings]
    labels += [("torch", "torch (llmc runtime) FP32")]
    labels = [(k, m) for k, m in labels if k in engines]
    genai_label = "onnxruntime-genai " + ("FP32" if not args.passes else "+".join(args.passes))
    labels += [(k, f"{genai_label}, llmc export") for k in engines if k == "genai (llmc export)"]
    labels += [(k, f"onnxruntime-genai {args.genai_builder_label}, genai builder") for k in engines
               if k == "genai (genai builder)"]
    for name, method in labels:
        passes = [] if name.startswith("genai (genai") or name == "torch" else args.passes
        fuse = next((f for f in settings if engine[f] == name), settings[0] if name.startswith("genai (llmc") else None)
        rows.append({"method": f"{method}: greedy decode, batch 1, 128+128", "passes": passes, "fuse": fuse,
                     "tokens_per_s": round(med[name], 2), "fp_tokens_per_s": round(med["hf"], 2),
                     "repeats": args.repeats, "tokens_identical_to_hf": outs[name] == outs["hf"],
                     "all_tokens_per_s": [round(v, 2) for v in tps[name]],
                     "all_fp_tokens_per_s": [round(v, 2) for v in tps["hf"]]})
    path = write_result(args.name, rows, model="smollm2-135m", model_sha256=src.fingerprint,
                        data_sha256=data.sha256("wikitext2-test"),
                        extra={"seconds": {"onnx_export_with_parity": export_s[settings[0]],
                                           "ort_session_load": load_s[settings[0]],
                                           **({"onnx_export_with_parity_unfused": export_s[False],
                                               "ort_session_load_unfused": load_s[False]}
                                              if len(settings) > 1 else {})},
                               "onnx_bytes": size[settings[0]], "fusions": fusions[settings[0]],
                               **({"onnx_bytes_unfused": size[False]} if len(settings) > 1 else {}),
                               "peak_rss_mb": round(peak_rss_mb()),
                               "load_average_1_5_15min": {"start": [round(x, 2) for x in load_at_start],
                                                          "end": [round(x, 2) for x in os.getloadavg()]},
                               **({"genai_builder_onnx_bytes": sum(
                                   os.path.getsize(os.path.join(args.genai_builder_dir, f))
                                   for f in os.listdir(args.genai_builder_dir) if f.startswith("model.onnx"))}
                                  if args.genai_builder_dir else {})})
    print("wrote", path)


if __name__ == "__main__":
    main()
