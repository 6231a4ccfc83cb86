"""qbb_quant on SmolLM2-135M: perplexity, stored bits, model bytes, time per configuration; ONNX decode.

    python -m benchmarks.qbb_quant --rows n4-s1,n4-s12 [--threads 1]
    python -m benchmarks.qbb_quant --onnx n4-s12      # export it, FP32 and RTN 4-bit; ORT ppl and decode

(from the repository root).

Every row compiles the built-in model with its passes on the calibration windows the CLI uses
(`--calib wikitext2-valid`: 32 x 512 tokens, seed 0; used only by the options that need data) and
scores `ppl-512x40` on WikiText-2 test, the protocol of benchmarks/pv_quant.py, whose rows (RTN,
GPTQ, pv_quant) are the comparison. Results are appended to benchmarks/results/<name>.json as rows
finish (rerunning skips finished rows).

Bits: `bits_per_weight` is the pass's accounting (one bit per basis, 16-bit scales);
`decoder_linear_bits_per_param` is the Program's size report (every stored byte of the decoder's
linears: uint8 signs, float16 scales), the same number here.

`--onnx ROW` lowers ROW's saved model with the packed kernel (llmc.VQLinear per basis, signs read
at run time) and with the standard-op lowering (ROW-dequantize), the FP32 model and RTN 4-bit g64
(MatMulNBits), all parity-checked; scores ppl-512x40 in ONNX Runtime for ROW; times greedy decode
(batch 1, 128-token prompt + 128 new tokens, interleaved rounds, median of `--repeats`), and the
session RSS of each folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

import torch

import llmc
from benchmarks.common import (STARTED_AT, export_onnx, interleaved_rates, load_rows, peak_rss_mb, row_definitions,
                               session_rss_mb, write_result)
from llmc import data
from llmc.eval import perplexity

ROWS = {
    "n4-s1": ["qbb_quant:bases=4,stages=1"],
    "n4-s12": ["qbb_quant:bases=4,stages=12,refine=alternate"],
    "n4-s12-gd": ["qbb_quant:bases=4,stages=12,refine=gd,rounds=1"],
    "n4-s123": ["qbb_quant:bases=4,stages=123,refine=alternate"],
    "n4-s123-kl": ["qbb_quant:bases=4,stages=123,scale_loss=kl,refine=alternate"],
    "n4-s123-wiki": ["qbb_quant:bases=4,stages=123,scale_data=wikitext2-valid,refine=alternate"],
    "n4-s12-gptq": ["qbb_quant:bases=4,stages=12,start=gptq,refine=alternate"],
    "n3-s12": ["qbb_quant:bases=3,stages=12,refine=alternate"],
    "n2-s12": ["qbb_quant:bases=2,stages=12,refine=alternate"],
    "n3-g64-s12": ["qbb_quant:bases=3,group=64,stages=12,refine=alternate"],
    "n4-g64-s12": ["qbb_quant:bases=4,group=64,stages=12,refine=alternate"],
    "n2-g64-s12": ["qbb_quant:bases=2,group=64,stages=12,refine=alternate"],
    "n4-o4-s12": ["qbb_quant:bases=4,outliers=4,stages=12,refine=alternate"],
    "n4-o4-s1": ["qbb_quant:bases=4,outliers=4,stages=1"],
    "n4-o4-s123": ["qbb_quant:bases=4,outliers=4,stages=123,refine=alternate"],
    "n4-o4-s123-wiki": ["qbb_quant:bases=4,outliers=4,stages=123,scale_data=wikitext2-valid,refine=alternate"],
    "n4-o16-s12": ["qbb_quant:bases=4,outliers=16,stages=12,refine=alternate"],
    "n3-o4-s12": ["qbb_quant:bases=3,outliers=4,stages=12,refine=alternate"],
    "n3-o16-s12": ["qbb_quant:bases=3,outliers=16,stages=12,refine=alternate"],
    "n2-o4-s12": ["qbb_quant:bases=2,outliers=4,stages=12,refine=alternate"],
    "n3-g64-o4-s12": ["qbb_quant:bases=3,group=64,outliers=4,stages=12,refine=alternate"],
    # stage 2 by joint rounding to each row's 2^N levels (refine=gptq), data-free or with error feedback on XᵀX
    "n4-s12-joint": ["qbb_quant:bases=4,stages=12,refine=gptq"],
    "n4-s12-ef": ["qbb_quant:bases=4,stages=12,refine=gptq,objective=input"],
    "n4-o4-s12-ef": ["qbb_quant:bases=4,outliers=4,stages=12,refine=gptq,objective=input"],
    "n3-o4-s12-ef": ["qbb_quant:bases=3,outliers=4,stages=12,refine=gptq,objective=input"],
    "n2-o4-s12-ef": ["qbb_quant:bases=2,outliers=4,stages=12,refine=gptq,objective=input"],
    "n3-s12-ef": ["qbb_quant:bases=3,stages=12,refine=gptq,objective=input"],
    "n4-g192-s12-ef": ["qbb_quant:bases=4,group=192,stages=12,refine=gptq,objective=input"],
    "n4-g192-o4-s12-ef": ["qbb_quant:bases=4,group=192,outliers=4,stages=12,refine=gptq,objective=input"],
    "n3-g96-s12-ef": ["qbb_quant:bases=3,group=96,stages=12,refine=gptq,objective=input"],
    "n3-g192-o4-s12-ef": ["qbb_quant:bases=3,group=192,outliers=4,stages=12,refine=gptq,objective=input"],
    "n4-g192-o4-s123-ef-wiki-150": ["qbb_quant:bases=4,group=192,outliers=4,stages=123,refine=gptq,objective=input,"
                                    "scale_steps=150,scale_data=wikitext2-valid"],
    "n4-g192-o4-s123-ef-wiki-v": ["qbb_quant:bases=4,group=192,outliers=4,stages=123,refine=gptq,objective=input,"
                                  "scale_steps=40,scale_data=wikitext2-valid,sign_change=0.0001"],
    "n4-g192-o4-s123-ef-wiki-v3": ["qbb_quant:bases=4,group=192,outliers=4,stages=123,refine=gptq,objective=input,"
                                   "scale_steps=40,scale_data=wikitext2-valid,sign_change=0.0001,sign_step=0.3"],
    "n4-g192-o4-s123-ef-wiki": ["qbb_quant:bases=4,group=192,outliers=4,stages=123,refine=gptq,objective=input,"
                                "scale_steps=40,scale_data=wikitext2-valid"],
    "n4-o4-s123-ef": ["qbb_quant:bases=4,outliers=4,stages=123,refine=gptq,objective=input,scale_steps=40"],
    "n4-o4-s123-ef-wiki": ["qbb_quant:bases=4,outliers=4,stages=123,refine=gptq,objective=input,scale_steps=40,"
                           "scale_data=wikitext2-valid"],
    # stage 3 as PV-Tuning's P step: KL, norm weights trained too, 512-token windows, bfloat16 autocast
    "n4-g192-o4-s123-ef-p": ["qbb_quant:bases=4,group=192,outliers=4,stages=123,refine=gptq,objective=input,"
                             "scale_steps=150,scale_data=wikitext2-valid,scale_loss=kl,scale_norms=true,"
                             "scale_amp=auto,scale_len=512,scale_samples=256,scale_batch=2"],
    "n3-g192-o4-s123-ef-p": ["qbb_quant:bases=3,group=192,outliers=4,stages=123,refine=gptq,objective=input,"
                             "scale_steps=150,scale_data=wikitext2-valid,scale_loss=kl,scale_norms=true,"
                             "scale_amp=auto,scale_len=512,scale_samples=256,scale_batch=2"],
    "n4-g192-o4-s123-ef-p-scales": ["qbb_quant:bases=4,group=192,outliers=4,stages=123,refine=gptq,objective=input,"
                                    "scale_steps=150,scale_data=wikitext2-valid,scale_loss=kl,scale_amp=auto,"
                                    "scale_len=512,scale_samples=256,scale_batch=2"],
    "n4-g192-o4-s123-ef-p-gen": ["qbb_quant:bases=4,group=192,outliers=4,stages=123,refine=gptq,objective=input,"
                                 "scale_steps=150,scale_loss=kl,scale_norms=true,scale_amp=auto,scale_len=512,"
                                 "scale_samples=64,scale_candidates=128,scale_batch=2"],
    "n2-o4-s123-ef-p": ["qbb_quant:bases=2,outliers=4,stages=123,refine=gptq,objective=input,"
                        "scale_steps=150,scale_data=wikitext2-valid,scale_loss=kl,scale_norms=true,"
                        "scale_amp=auto,scale_len=512,scale_samples=256,scale_batch=2"],
}
DECODE_ROWS = ("ort-",)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="n4-s1,n4-s12", help="comma-separated subset of: " + ", ".join(ROWS))
    ap.add_argument("--row", action="append", default=[], metavar="NAME=SPEC[;SPEC]",
                    help="an extra row: a name and its pass specs")
    ap.add_argument("--onnx", default=None, help="a finished row to export to ONNX and time against FP32 / RTN 4-bit")
    ap.add_argument("--layer", action="store_true", help="time one decoder-sized layer per lowering in ONNX Runtime "
                    "(1 token, interleaved rounds): N=4 packed kernel, N=4 standard ops, MatMulNBits 4-bit g64, FP32")
    ap.add_argument("--protocol", default="ppl-512x40")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="/tmp/llmc-bench-qbb")
    ap.add_argument("--name", default="qbb_quant")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows_def = row_definitions(ROWS, args.row)

    src = llmc.load_model("smollm2-135m")
    ids = data.tokenize(src.tokenizer, data.text("wikitext2-test"))
    calib = data.calibration_batches(src.tokenizer, "wikitext2-valid", seed=0)
    rows = load_rows(args.name)
    done = {r["row"] for r in rows if r.get("protocol") == args.protocol}

    def save(replace: tuple[str, ...] = ()):
        """Merge `rows` with the file's rows by name (several processes may run rows at once)."""
        merged = {r["row"]: r for r in load_rows(args.name) if not (replace and r["row"].startswith(replace))}
        merged.update({r["row"]: r for r in rows})
        rows[:] = list(merged.values())
        write_result(args.name, rows, model="smollm2-135m", model_sha256=src.fingerprint,
                     data_sha256=data.sha256("wikitext2-test"),
                     extra={"calibration": {"data": "wikitext2-valid", "sha256": data.sha256("wikitext2-valid"),
                                            "sequences": len(calib), "seq_len": int(calib[0].shape[1])},
                            "fp_ppl": FP, "fp_source": "benchmarks/results/foundation.json, torch (traced)"})

    for row in [r for r in args.rows.split(",") if r]:
        if row not in rows_def:
            raise SystemExit(f"unknown row '{row}'; choose from {', '.join(rows_def)} or add one with --row")
        if row in done:
            continue
        passes = rows_def[row]
        t0 = time.perf_counter()
        cm = llmc.compile(src, passes=passes, calibration=calib)
        compile_s = time.perf_counter() - t0
        r = perplexity(cm, ids, args.protocol)
        folder = os.path.join(args.out, row)
        shutil.rmtree(folder, ignore_errors=True)
        cm.save(folder)
        size = cm.program.size_report()
        h = next(h for h in cm.program.history if h.name == "qbb_quant")
        st = h.stats
        entry = {"row": row, "method": " + ".join(passes), "passes": passes, "protocol": args.protocol,
                 "windows": r.windows, "ppl": round(r.ppl, 4), "fp_ppl": FP[args.protocol],
                 "x_fp": round(r.ppl / FP[args.protocol], 4),
                 "model_bytes": size["total_bytes"], "bits_per_weight": st["bits_per_weight"],
                 "decoder_linear_bits_per_param": size["decoder_linear_bits_per_param"],
                 "mean_relative_error_stage1": st["mean_relative_error_stage1"],
                 "mean_relative_error": st["mean_relative_error"], "error_metric": st["error_metric"],
                 "seconds": {"compile": round(compile_s, 1), "eval": round(r.seconds, 1), **st["seconds"]},
                 "threads": args.threads, "peak_rss_mb": round(peak_rss_mb()), "commit": STARTED_AT}
        if st.get("scale_calibration"):
            sc = dict(st["scale_calibration"])
            entry["scale_calibration"] = sc  # the per-step losses go to benchmarks/traces/ (write_result)
        rows.append(entry)
        print(json.dumps({k: entry.get(k) for k in ("row", "ppl", "x_fp", "bits_per_weight", "seconds")}), flush=True)
        save()
    if args.onnx:
        onnx_rows(args, src, ids, rows)
        save(replace=DECODE_ROWS)
    if args.layer:
        rows[:] = [r for r in rows if not r["row"].startswith("layer-")] + layer_rows(args)
        save(replace=("layer-",))


# The traced FP32 model (benchmarks/results/foundation.json, "torch (traced)"), per protocol.
FP = {"ppl-512x40": 28.7385, "ppl-512x5": 29.6534}


def onnx_rows(args, src, ids, rows) -> None:
    """Lower ROW (packed kernel and standard ops), FP32 and RTN 4-bit; ORT ppl of ROW; decode tokens/s, interleaved."""
    from llmc.backends.onnxruntime import OrtModel

    row = args.onnx
    models = {}
    exports = [(row, lambda: llmc.load(os.path.join(args.out, row)), "kernel"),
               (f"{row}-dequantize", lambda: llmc.load(os.path.join(args.out, row)), "dequantize"),
               ("fp32", lambda: llmc.compile(src), "auto"),
               ("rtn-4", lambda: llmc.compile(src, passes=["rtn_quant:bits=4,group=64"]), "auto")]
    for label, make, lowering in exports:
        cm = make()
        out = os.path.join(args.out, f"onnx-{label}")
        parity, size, export_s = export_onnx(cm, out, lowering)
        models[label] = (OrtModel(out, threads=args.threads), parity, size, export_s, lowering)
    ort_ppl = perplexity(models[row][0], ids, args.protocol)
    torch_ppl = next(r["ppl"] for r in rows if r["row"] == row)
    prompt = ids[:128].tolist()
    engines = {label: (lambda m=m: m.generate(prompt, 128, ignore_eos=True, return_tokens=True))
               for label, (m, *_rest) in models.items()}
    load = os.getloadavg()
    tps, _ = interleaved_rates(engines, args.repeats)
    load_after = os.getloadavg()
    med = {k: statistics.median(v) for k, v in tps.items()}
    rows[:] = [r for r in rows if not r["row"].startswith(DECODE_ROWS)]
    for label, (_, par, sz, ex, lowering) in models.items():
        entry = {"row": f"ort-{label}", "method": f"ONNX Runtime {label} ({lowering} lowering): greedy decode, batch 1, "
                 "128+128", "lowering": lowering, "file_mb": round(sz / 1e6, 1), "tokens_per_s": round(med[label], 2),
                 "all_tokens_per_s": [round(v, 2) for v in tps[label]], "parity": par,
                 "export_seconds": round(ex, 1), "ratio_to_fp32": round(med[label] / med["fp32"], 3),
                 "ratio_to_rtn4": round(med[label] / med["rtn-4"], 3), "threads": args.threads,
                 "loadavg_before_after": [round(load[0], 2), round(load_after[0], 2)], "commit": STARTED_AT,
                 "session_rss_mb": round(session_rss_mb(os.path.join(args.out, f"onnx-{label}"), args.threads))}
        if label == row:
            entry.update({"protocol": args.protocol, "ort_ppl": round(ort_ppl.ppl, 4), "torch_ppl": torch_ppl,
                          "ort_minus_torch": round(ort_ppl.ppl - torch_ppl, 4)})
        rows.append(entry)
        print(json.dumps(entry), flush=True)


def layer_rows(args, rounds: int = 7, calls: int = 300) -> list[dict]:
    """Microseconds per 1-token call of one layer (SmolLM2's 1536x576 and 576x1536) in ONNX Runtime, per lowering:
    qbb N=4 through llmc.BinaryBasesLinear (masked multiply-adds on the packed signs), through one llmc.VQLinear
    over the stacked bases and through one VQLinear per basis (the two earlier lowerings), through standard ops
    (folded to float at load),
    MatMulNBits 4-bit g64 and an FP32 MatMul; random weights, interleaved rounds, medians."""
    import numpy as np
    import onnxruntime as ort

    from llmc.backends.onnxruntime import custom_ops
    from llmc.backends.onnxruntime.translations import (binary_bases_linear_per_basis, binary_bases_linear_stacked,
                                                        translations)
    from llmc.ops.nbits_linear import quantize_rtn

    class Op(torch.nn.Module):
        def __init__(self, fn, **tensors):
            super().__init__()
            self.fn = fn
            for k, v in tensors.items():
                self.register_buffer(k, v)

        def forward(self, x):
            return self.fn(self, x)

    out = []
    gen = torch.Generator().manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    for N, K in ((1536, 576), (576, 1536)):
        W = torch.randn(N, K, generator=gen) * 0.05
        signs = torch.randint(0, 256, (4, N, K // 8), dtype=torch.uint8, generator=gen)
        scales = (torch.rand(4, N, 1, generator=gen) * 0.02).half()
        c, sc, z = quantize_rtn(W, 4, 64)
        qbb = (lambda m, x: torch.ops.llmc.binary_bases_linear(x, m.signs, m.scales))
        mods = {"qbb4-kernel": (Op(qbb, signs=signs, scales=scales), "kernel"),
                "qbb4-kernel-stacked": (Op(qbb, signs=signs, scales=scales), "kernel-stacked"),
                "qbb4-kernel-per-basis": (Op(qbb, signs=signs, scales=scales), "kernel-per-basis"),
                "qbb4-dequantize": (Op(qbb, signs=signs, scales=scales), "dequantize"),
                "matmulnbits-4bit-g64": (Op(lambda m, x: torch.ops.llmc.nbits_linear(x, m.c, m.sc, m.z, K, N, 4, 64),
                                            c=c, sc=sc, z=z), "dequantize"),
                "fp32": (Op(lambda m, x: x @ m.w.t(), w=W), "dequantize")}
        sessions = {}
        for name, (m, lowering) in mods.items():
            path = os.path.join(args.out, f"layer-{name}-{N}x{K}.onnx")
            table = translations(lowering.split("-")[0])
            earlier = {"kernel-stacked": binary_bases_linear_stacked, "kernel-per-basis": binary_bases_linear_per_basis}
            if lowering in earlier:  # the earlier VQLinear lowerings, for comparison
                table[torch.ops.llmc.binary_bases_linear.default] = earlier[lowering]
            torch.onnx.export(m, (torch.randn(1, 1, K),), dynamo=True, custom_translation_table=table,
                              verbose=False).save(path)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            if lowering.startswith("kernel"):
                opts.register_custom_ops_library(custom_ops.library_path())
            sessions[name] = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((1, 1, K)).astype(np.float32)
        times = {k: [] for k in sessions}
        load = os.getloadavg()[0]
        for _ in range(rounds):
            for k, sess in sessions.items():
                feed = {sess.get_inputs()[0].name: x}
                for _ in range(20):
                    sess.run(None, feed)
                t0 = time.perf_counter()
                for _ in range(calls):
                    sess.run(None, feed)
                times[k].append((time.perf_counter() - t0) / calls * 1e6)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in times.items():
            out.append({"row": f"layer-{k}-{N}x{K}", "method": f"ONNX Runtime, one {N}x{K} layer, 1 token: {k}",
                        "us_per_call": round(med[k], 1), "all_us": [round(t, 1) for t in v],
                        "ratio_to_matmulnbits": round(med[k] / med["matmulnbits-4bit-g64"], 3),
                        "threads": args.threads, "loadavg_before_after": [round(load, 2), round(os.getloadavg()[0], 2)],
                        "commit": STARTED_AT})
            print(json.dumps(out[-1]), flush=True)
    return out


if __name__ == "__main__":
    main()
