"""pv_quant on SmolLM2-135M: perplexity, bits per weight, time and memory per configuration; ONNX.

    python -m benchmarks.pv_quant --rows 2x8g8,2x8g8-pv50 [--threads 2]
    python -m benchmarks.pv_quant --onnx 2x8g8-pv50          # export it, FP32 and RTN 4-bit; ORT ppl and decode

(from the repository root).

Every row compiles the built-in model with its passes on the calibration windows the CLI uses
(`--calib wikitext2-valid`: 32 x 512 tokens, seed 0), with the FP model as the PV-Tuning teacher,
and scores `ppl-512x40` on WikiText-2 test. Rows sharing a calibration configuration reuse its
checkpoint (`~/.cache/llmc/pv_quant`), so a PV row after a calibration-only row costs only its
tuning; the reported seconds are then the tuning's plus the calibration row's. Results are
appended to benchmarks/results/<name>.json as rows finish (rerunning skips finished rows). Peak
memory is the process's, so run heavy rows one per process for a meaningful number.

Bits: `bits_per_weight` is the pass's own accounting (AQLM's: codes at their bit width, 16-bit
codebooks and scales); `decoder_linear_bits_per_param` and `stored_bits_breakdown` are the Program's
size report (every stored byte of the decoder's linears as llmc stores them: uint8 codes, float32
codebooks and scales), the breakdown summing to it. Rows written before this script used the size
report carry `bits_breakdown` instead: the AQLM accounting by part, summing to `bits_per_weight`.
PV-Tuning's per-step traces (KL, code changes) go to benchmarks/traces/<name>.json; the row keeps
`tuning.kl_first`, `kl_last`, `steps` and the timings.

`--onnx ROW` lowers the saved model of ROW (with llmc's VQLinear kernel where it builds, and with
the dequantize lowering as ROW-dequantize), the FP32 model and RTN 4-bit g64 (MatMulNBits) to ONNX
(each parity-checked), scores ppl-512x40 in ONNX Runtime for ROW, and times greedy decode (batch
1, 128-token prompt, 128 new tokens) of all of them in interleaved rounds, and the peak RSS of a
process that opens each folder (`--session-memory`: only that, for the folders already written).
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
from benchmarks.common import (STARTED_AT, export_onnx, genai_engine, interleaved_rates, load_rows, peak_rss_mb,
                               row_definitions, session_rss_mb, write_result)
from llmc import data
from llmc.eval import perplexity

ROWS = {
    "fp": [],
    "rtn-2": ["rtn_quant:bits=2,group=64"],
    "2x8g8": ["pv_quant:steps=0"],
    "2x8g8-pv": ["pv_quant"],
    "2x8g8-ste": ["pv_quant:mode=ste"],
    "3x8g8": ["pv_quant:codebooks=3"],
    "4x8g8": ["pv_quant:codebooks=4"],
    "scalar4": ["pv_quant:format=scalar,bits=4"],
}
DECODE_ROWS = ("ort-", "genai-")  # the rows an --onnx run writes, all in one run

# The size report's components that it files under the decoder's linear layers (lm_head and the
# embeddings are components of their own).
LINEAR_COMPONENTS = ("codes", "codebooks", "scales", "linear weights", "linear biases", "linear other")


def stored_bits_breakdown(size: dict) -> dict:
    """Stored bits per decoder linear weight by component, from `Program.size_report()`: each
    component's bytes over the weights the linears had at trace time (sums to
    `decoder_linear_bits_per_param`)."""
    params = size["decoder_linear_params"]
    return {c: round(8 * v["bytes"] / params, 4) for c, v in size["components"].items()
            if c in LINEAR_COMPONENTS and v["bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="fp,2x8g8", help="comma-separated subset of: " + ", ".join(ROWS))
    ap.add_argument("--row", action="append", default=[], metavar="NAME=SPEC[;SPEC]",
                    help="an extra row: a name and its pass specs")
    ap.add_argument("--onnx", default=None, help="a finished row to export to ONNX and time against FP32 / RTN 4-bit")
    ap.add_argument("--session-memory", action="store_true",
                    help="with --onnx: only measure the ORT session memory of the folders the last --onnx run wrote")
    ap.add_argument("--genai-python", help="with --onnx: a Python that has onnxruntime-genai, to decode ROW's "
                    "export under genai too")
    ap.add_argument("--protocol", default="ppl-512x40")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="/tmp/llmc-bench-pvq")
    ap.add_argument("--name", default="pv_quant")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows_def = row_definitions(ROWS, args.row)

    src = llmc.load_model("smollm2-135m")
    ids = data.tokenize(src.tokenizer, data.text("wikitext2-test"))
    calib = data.calibration_batches(src.tokenizer, "wikitext2-valid", seed=0)
    rows = [r for r in load_rows(args.name) if r.get("protocol") == args.protocol]
    done = {r["row"] for r in rows}

    def save(replace: tuple[str, ...] = ()):
        """Write `rows` merged with the file's rows by name (several processes may run rows at once); the
        file's rows whose names start with a `replace` prefix are dropped, not merged."""
        merged = {r["row"]: r for r in load_rows(args.name) if r.get("protocol", args.protocol) == args.protocol
                  and not (replace and r["row"].startswith(replace))}
        merged.update({r["row"]: r for r in rows})
        rows[:] = list(merged.values())
        write_result(args.name, rows, model="smollm2-135m", model_sha256=src.fingerprint,
                     data_sha256=data.sha256("wikitext2-test"),
                     extra={"calibration": {"data": "wikitext2-valid", "sha256": data.sha256("wikitext2-valid"),
                                            "sequences": len(calib), "seq_len": int(calib[0].shape[1])}})

    wanted = [r for r in args.rows.split(",") if r]
    fp_ppl = next((r["ppl"] for r in rows if r["row"] == "fp"), None)
    for row in (["fp"] if fp_ppl is None else []) + [r for r in wanted if r != "fp"]:
        if row not in rows_def:
            raise SystemExit(f"unknown row '{row}'; choose from {', '.join(rows_def)} or add one with --row")
        if row in done:
            continue
        passes = rows_def[row]
        t0 = time.perf_counter()
        cm = llmc.compile(src, passes=passes, calibration=calib if passes else None)
        compile_s = time.perf_counter() - t0
        r = perplexity(cm, ids, args.protocol)
        if row == "fp":
            fp_ppl = r.ppl
        folder = os.path.join(args.out, row)
        shutil.rmtree(folder, ignore_errors=True)
        cm.save(folder)
        size = cm.program.size_report()
        entry = {"row": row, "method": " + ".join(passes) or "FP32 (traced, no pass)", "passes": passes,
                 "protocol": args.protocol, "windows": r.windows, "ppl": round(r.ppl, 4), "fp_ppl": round(fp_ppl, 4),
                 "x_fp": round(r.ppl / fp_ppl, 4), "model_bytes": size["total_bytes"],
                 "decoder_linear_bits_per_param": size.get("decoder_linear_bits_per_param"),
                 "seconds": {"compile": round(compile_s, 1), "eval": round(r.seconds, 1)},
                 "peak_rss_mb": round(peak_rss_mb()), "commit": STARTED_AT}
        if passes:
            entry["stored_bits_breakdown"] = stored_bits_breakdown(size)  # the size report's accounting
        h = next((h for h in cm.program.history if h.name == "pv_quant"), None)
        if h is not None:
            entry["bits_per_weight"] = h.stats["bits_per_weight"]  # the pass's (AQLM) accounting
            entry["mean_relative_output_error"] = h.stats["mean_relative_output_error"]
            cal = h.stats["calibration"]
            entry["seconds"]["calibration"] = round(sum(b.get("seconds", 0) for b in cal["blocks"]), 1)
            entry["calibration_resumed_blocks"] = cal["resumed_blocks"]
            if h.stats["tuning"]:
                t = h.stats["tuning"]
                entry["seconds"]["pv_tuning"] = h.stats["seconds"].get("pv_tuning")
                # the per-step lists (kl, code_change, code_proposed) go to benchmarks/traces/ (write_result)
                entry["tuning"] = {k: t.get(k) for k in ("mode", "amp", "schedule", "extra", "steps", "kl_first",
                                                         "kl_last", "kl", "code_change", "code_proposed", "seconds")}
        rows.append(entry)
        print(json.dumps({k: entry.get(k) for k in ("row", "ppl", "x_fp", "bits_per_weight", "seconds")}), flush=True)
        save()
    if args.onnx and args.session_memory:  # (ORT decode rows carry no protocol: not among `rows` above)
        for r in load_rows(args.name):
            if r["row"].startswith("ort-"):
                r["session_rss_mb"] = round(session_rss_mb(os.path.join(args.out, "onnx-" + r["row"][4:]), args.threads))
                print(r["row"], "session RSS MB", r["session_rss_mb"], flush=True)
                rows.append(r)
        save()
    elif args.onnx:  # a new set of decode rows: those of an earlier --onnx run (maybe another ROW) go
        onnx_rows(args, src, ids, rows)
        save(replace=DECODE_ROWS)


def onnx_rows(args, src, ids, rows) -> None:
    """Lower ROW (and ROW-dequantize), FP32 and RTN 4-bit; ORT ppl of ROW; decode tokens/s of all, interleaved
    (with --genai-python, ROW's folder under onnxruntime-genai too); each folder's session memory."""
    from llmc.backends.onnxruntime import OrtModel, custom_ops

    row = args.onnx
    models = {}
    exports = [(row, lambda: llmc.load(os.path.join(args.out, row)), "auto"),
               ("fp32", lambda: llmc.compile(src), "auto"),
               ("rtn-4", lambda: llmc.compile(src, passes=["rtn_quant:bits=4,group=64"]), "auto")]
    if custom_ops.available():  # ROW's default export is the kernel lowering; the dequantize one beside it
        exports.insert(1, (f"{row}-dequantize", exports[0][1], "dequantize"))
    for label, make, lowering in exports:
        cm = make()
        out = os.path.join(args.out, f"onnx-{label}")
        parity, size, export_s = export_onnx(cm, out, lowering)
        models[label] = (OrtModel(out, threads=args.threads), parity, size, cm, export_s)
    m, parity, size, cm, export_s = models[row]
    ort_ppl = perplexity(m, ids, args.protocol)
    torch_ppl = next(r["ppl"] for r in rows if r["row"] == row)
    prompt = ids[:128].tolist()
    engines = {label: (lambda m=mm: m.generate(prompt, 128, ignore_eos=True, return_tokens=True))
               for label, (mm, *_rest) in models.items()}
    if args.genai_python:
        engines["genai"] = genai_engine(args.genai_python, os.path.join(args.out, f"onnx-{row}"), prompt)
    tps, tokens = interleaved_rates(engines, args.repeats)
    med = {k: statistics.median(v) for k, v in tps.items()}
    rows[:] = [r for r in rows if not r["row"].startswith(DECODE_ROWS)]
    if args.genai_python:
        entry = {"row": f"genai-{row}", "method": f"onnxruntime-genai, llmc's {row} export: greedy decode, batch 1, "
                 "128+128", "tokens_per_s": round(med["genai"], 2), "all_tokens_per_s": [round(v, 2) for v in tps["genai"]],
                 "tokens_identical_to_ort": tokens["genai"] == tokens[row], "file_mb": round(models[row][2] / 1e6, 1),
                 "ratio_to_fp32": round(med["genai"] / med["fp32"], 3),
                 "ratio_to_rtn4": round(med["genai"] / med["rtn-4"], 3), "commit": STARTED_AT}
        rows.append(entry)
        print(json.dumps(entry), flush=True)
    for label, (_, par, sz, _, ex) in models.items():
        lowering = json.load(open(os.path.join(args.out, f"onnx-{label}", "llmc_onnx.json"))).get("vq_lowering")
        how = f" ({'llmc.VQLinear kernel' if lowering == 'kernel' else 'dequantized at load'})" if lowering else ""
        entry = {"row": f"ort-{label}", "method": f"ONNX Runtime {label}{how}: greedy decode, batch 1, 128+128",
                 "vq_lowering": lowering,
                 "file_mb": round(sz / 1e6, 1), "tokens_per_s": round(med[label], 2),
                 "all_tokens_per_s": [round(v, 2) for v in tps[label]], "parity": par,
                 "export_seconds": round(ex, 1), "ratio_to_fp32": round(med[label] / med["fp32"], 3),
                 "ratio_to_rtn4": round(med[label] / med["rtn-4"], 3), "commit": STARTED_AT,
                 "session_rss_mb": round(session_rss_mb(os.path.join(args.out, f"onnx-{label}"), args.threads))}
        if label == row:
            entry.update({"protocol": args.protocol, "ort_ppl": round(ort_ppl.ppl, 4), "torch_ppl": torch_ppl,
                          "ort_minus_torch": round(ort_ppl.ppl - torch_ppl, 4)})
        rows.append(entry)
        print(json.dumps(entry), flush=True)


if __name__ == "__main__":
    main()
