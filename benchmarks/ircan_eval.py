"""IRCAN on SmolLM2-135M: h and beta chosen by the pass's grid search on dev, then accuracy and stubbornness
on the MemoTrap / COSE_KRE test files for the FP model, CAD, IRCAN, IRCAN + CAD and the random-neuron
control (same h and beta, `--seeds` seeds), and the IRCAN model's ppl-512x40.

    python -m benchmarks.ircan_eval [--tasks memotrap cose] [--samples 100] [--seeds 10] [--threads 1]

(from the repository root). Neurons are mined on the first `--samples` dev examples (attribution cached
in `--cache`, so an interrupted run resumes), h/beta are searched on the first `--grid-samples` dev
examples, everything else is measured on test. Rows already in benchmarks/results/ircan_eval.json
are kept and skipped (resumable; runs of different tasks may share the file); `--fresh` measures every
row again.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time

import torch

import llmc
from benchmarks.common import load_rows, write_result
from llmc.context_tasks import context_following, load_examples, task_file

NAME = "ircan_eval"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["memotrap", "cose"])
    ap.add_argument("--samples", type=int, default=100, help="dev examples to mine neurons on")
    ap.add_argument("--grid-samples", type=int, default=200, help="dev examples each grid setting is scored on")
    ap.add_argument("--grid-h", default="2+4+8+14", help="h values of the grid search ('+'-separated)")
    ap.add_argument("--grid-beta", default="2+3+5+8+12", help="beta values of the grid search ('+'-separated)")
    ap.add_argument("--seeds", type=int, default=10, help="seeds of the random-neuron control")
    ap.add_argument("--cad", type=float, default=0.5, help="context-aware decoding alpha of the CAD rows")
    ap.add_argument("--ig", default="plain", choices=["plain", "alpha"])
    ap.add_argument("--cache", default=os.path.join("benchmarks", "cache", "ircan"),
                    help="attribution cache (resumable mining)")
    ap.add_argument("--limit", type=int, default=0, help="the first N test examples only (0: all)")
    ap.add_argument("--no-ppl", action="store_true", help="skip the ppl-512x40 of the IRCAN models")
    ap.add_argument("--no-cad", action="store_true", help="skip the CAD and IRCAN + CAD rows")
    ap.add_argument("--compose", action="store_true",
                    help="also IRCAN -> rtn_quant 4-bit -> cq_kv 4c8b exported to ONNX, vs the same without IRCAN")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = [] if args.fresh else load_rows(NAME)
    have = {r["row"] for r in rows}
    src = llmc.load_model("smollm2-135m", traceable=True)
    traced = llmc.to_program(src)  # traced once; every model below is compiled from a fork of it
    digests = [hashlib.sha256(task_file(t, split).read_bytes()).hexdigest()  # every file a row may come from
               for t in ("memotrap", "cose") for split in ("dev", "test")]

    def save() -> None:  # merged with the file's rows, so runs of different tasks can share it
        merged = {r["row"]: r for r in load_rows(NAME)}
        merged.update({r["row"]: r for r in rows})
        write_result(NAME, list(merged.values()), model="smollm2-135m", model_sha256=src.fingerprint,
                     data_sha256=" ".join(digests))

    def measure(row: str, model, examples, cad: float, **extra) -> dict:
        if row in have:
            return next(r for r in rows if r["row"] == row)
        t0 = time.perf_counter()
        result = context_following(model, examples, cad=cad)
        rows.append({"row": row, **extra, **result, "seconds": round(time.perf_counter() - t0, 1),
                     "threads": args.threads})
        have.add(row)
        print(rows[-1], flush=True)
        save()
        return rows[-1]

    for task in args.tasks:
        test = task_file(task, "test")
        dev = task_file(task, "dev")
        examples = load_examples(test)[: args.limit or None]
        base = {"task": task, "data": test.name, "ig": args.ig}

        neurons = os.path.join(args.cache, f"{task}-{args.ig}-{args.samples}-neurons.json")
        spec = (f"ircan:task={task},samples={args.samples},ig={args.ig},grid_samples={args.grid_samples},"
                f"grid_h={args.grid_h},grid_beta={args.grid_beta},checkpoint_dir={args.cache},neurons_out={neurons}")
        if f"{task}:grid" in have and os.path.isfile(neurons):  # resuming: the selection and its h, beta are saved
            spec = f"ircan:neurons={neurons}"
        t0 = time.perf_counter()
        ircan = llmc.compile(traced, passes=[spec], progress=True)
        stats = ircan.program.history[-1].stats
        h, beta = stats["h"], stats["beta"]
        grid_row = f"{task}:grid"
        if grid_row not in have:
            from llmc.passes.ircan import read_neurons  # the pass's own reader of its neurons file

            doc = read_neurons(neurons)
            rows.append({"row": grid_row, "method": "grid", **base, "data": dev.name, "mined": args.samples,
                         "h": h, "beta": beta, "grid_examples": doc["grid"]["examples"], "grid": doc["grid"]["rows"],
                         "grid_unmodified": doc["grid"].get("baseline"),
                         "seconds": round(time.perf_counter() - t0, 1), "threads": args.threads})
            have.add(grid_row)
            save()
        knobs = {"h": h, "beta": beta, "mined": args.samples}
        measure(f"{task}:IRCAN", ircan, examples, 0.0, method="IRCAN", **base, **knobs)
        fp = llmc.compile(traced, progress=False)
        measure(f"{task}:FP", fp, examples, 0.0, method="FP", **base)
        ppl_row = f"{task}:IRCAN:ppl"
        if not args.no_ppl and ppl_row not in have:
            t0 = time.perf_counter()
            ppl = ircan.perplexity("wikitext2-test", "ppl-512x40").ppl
            rows.append({"row": ppl_row, "method": "IRCAN", **base, **knobs, "ppl-512x40": ppl,
                         "seconds": round(time.perf_counter() - t0, 1), "threads": args.threads})
            have.add(ppl_row)
            print(rows[-1], flush=True)
            save()

        control = []
        for seed in range(args.seeds):
            row = f"{task}:random:{seed}"
            if row not in have:
                model = llmc.compile(traced, passes=[f"ircan:neurons={neurons},random={seed}"], progress=False)
            else:
                model = None
            control.append(measure(row, model, examples, 0.0, method="random", seed=seed, **base, **knobs))
        summary = f"{task}:random"
        acc = [r["accuracy"] for r in control]
        stub = [r["stubbornness"] for r in control]
        rows[:] = [r for r in rows if r["row"] != summary]
        rows.append({"row": summary, "method": "random (mean ± std)", **base, **knobs, "seeds": len(control),
                     "accuracy": statistics.mean(acc), "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "stubbornness": statistics.mean(stub),
                     "stubbornness_std": statistics.stdev(stub) if len(stub) > 1 else 0.0})
        save()
        # context-aware decoding runs two prompts per example: the costliest rows come last
        if not args.no_cad:
            measure(f"{task}:CAD", fp, examples, args.cad, method="CAD", **base)
            measure(f"{task}:IRCAN+CAD", ircan, examples, args.cad, method="IRCAN+CAD", **base, **knobs)
        del fp, ircan
        if args.compose:
            # the point of a compiler: IRCAN, then 4-bit weights, then a 2-bit CQ cache, exported to ONNX
            # (parity-checked), against the same pipeline without IRCAN
            for label, first in (("IRCAN", [f"ircan:neurons={neurons}"]), ("none", [])):
                passes = first + ["rtn_quant:bits=4,group=64", "cq_kv:config=4c8b"]
                row = f"{task}:compose:{label}"
                if row in have:
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    ort = llmc.compile(traced, passes=passes, calibration="wikitext2-valid", backend="onnxruntime",
                                       out=os.path.join(tmp, "onnx"), progress=False)
                    parity = ort.manifest["parity"]
                    measure(row, ort, examples, 0.0, method=f"ONNX: {label} + rtn_quant 4-bit + cq_kv 4c8b",
                            passes=" ".join(passes), backend="onnxruntime",
                            parity_max_abs_diff=parity.get("logits_max_abs_diff"),
                            parity_mode=parity.get("mode"), **base, **knobs)
                    del ort
    print(os.path.join("benchmarks", "results", f"{NAME}.json"))


if __name__ == "__main__":
    main()
