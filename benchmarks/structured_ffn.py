"""structured_ffn on SmolLM2-135M: perplexity, FFN parameters and size per configuration; ORT decode speed.

    python -m benchmarks.structured_ffn [--steps 100] [--recover lowrank:aware blockdense:aware]   # from the repo root

Quality grid: kind (lowrank, blockdense, blockshuffle) × budget (0.63, 0.32) × init (svd, aware)
without recovery, plus the `--recover` kind:init pairs with `--steps` recovery steps, each scored
with `--protocol` (ppl-512x40). The model is traced once; every row runs the pass on a copy of the
traced program with the same calibration windows (their XᵀX statistics are computed once and
cached in `--checkpoint-dir`), and the FP model as teacher.

Speed: the dense export and the `--decode-kind` models at both budgets (recovered ones where run)
are lowered to ONNX (with the parity check) and decoded greedily with batch 1, a 128-token prompt
from the test text and 128 new tokens, medians of `--repeats` interleaved rounds, beside HF eager
FP32 (`fp_tokens_per_s`). The FFN latency ratio times one decoder layer's FFN block at decode size
(one token) in torch: structured (in the form the pass kept) over dense.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import time

import torch
import torch.nn.functional as F

import llmc
from benchmarks.common import interleaved_rates, peak_rss_mb, write_result
from llmc import data
from llmc.api import to_program
from llmc.compiled import CompiledModel
from llmc.eval import perplexity
from llmc.passes.structured_ffn.factors import structured_linear
from llmc.passes_base import PassContext, PassManager

KINDS = ("lowrank", "blockdense", "blockshuffle")
BUDGETS = (0.63, 0.32)
INITS = ("svd", "aware")


def ffn_params(program, stats: dict | None) -> int:
    """Stored FFN parameters: the untouched FFN linears plus what the pass stored for the rest."""
    dense = sum(m * n for fqn, (m, n) in program.linear_shapes.items() if ".mlp." in fqn)
    if stats is None:
        return dense
    return dense - stats["dense_params"] + stats["stored_params"]


def run_pass(base, spec: str, calib, teacher, seed: int = 0):
    program = copy.deepcopy(base)
    ctx = PassContext(calibration=calib, teacher=teacher, seed=seed, progress=True)
    t0 = time.perf_counter()
    PassManager([spec]).run(program, ctx)
    return program, time.perf_counter() - t0


def ffn_block_latency(src_model, program, layer: int, repeats: int) -> dict:
    """µs of layer `layer`'s FFN at one token: dense (HF weights) vs the structured graph's form."""
    mlp = src_model.model.layers[layer].mlp
    gm = program.gm
    in_major = lambda t: t.detach().t().contiguous().t() if t.dim() == 2 else t.detach()  # noqa: E731
    wg, wu, wd = (in_major(m.weight) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    kind = program.history[-1].config["kind"]
    stats = program.history[-1].stats

    def form(module):
        sub = gm.get_submodule(module)
        if stats["premerge"][module] == "merged":
            w = in_major(sub.weight)
            return lambda x: F.linear(x, w)
        a, b = in_major(sub.factor_in), in_major(sub.factor_out)
        return lambda x: structured_linear(kind, x, a, b)

    gate_up, down = form(f"model.layers.{layer}.mlp.gate_up"), form(f"model.layers.{layer}.mlp.down_proj")
    f = wg.shape[0]

    def structured(x):
        gu = gate_up(x)
        return down(F.silu(gu[..., :f]) * gu[..., f:])

    def dense(x):
        return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

    x = torch.randn(1, 1, wg.shape[1])
    times = {"dense": [], "structured": []}
    with torch.inference_mode():
        for _ in range(3):
            dense(x), structured(x)
        for _ in range(repeats):
            for name, fn in (("dense", dense), ("structured", structured)):
                t0 = time.perf_counter()
                fn(x)
                times[name].append((time.perf_counter() - t0) * 1e6)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"layer": layer, "dense_us": round(med["dense"], 1), "structured_us": round(med["structured"], 1),
            "latency_ratio": round(med["structured"] / med["dense"], 3), "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="recovery steps of the --recover rows")
    ap.add_argument("--recover", nargs="*", default=["lowrank:aware", "blockdense:aware"],
                    help="kind:init pairs that also get a recovery row at each budget")
    ap.add_argument("--kinds", nargs="*", default=list(KINDS))
    ap.add_argument("--budgets", nargs="*", type=float, default=list(BUDGETS))
    ap.add_argument("--inits", nargs="*", default=list(INITS))
    ap.add_argument("--protocol", default="ppl-512x40")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--guided-fraction", type=float, default=0.5)
    ap.add_argument("--decode-kind", default="lowrank")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (passes, perplexity, FFN latency)")
    ap.add_argument("--ort-threads", type=int, default=2, help="ONNX Runtime threads for the decode rows")
    ap.add_argument("--checkpoint-dir", default="/tmp/llmc-sffn-checkpoints")
    ap.add_argument("--out", default="/tmp/llmc-bench-sffn")
    ap.add_argument("--name", default="structured_ffn")
    ap.add_argument("--no-decode", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    src = llmc.load_model("smollm2-135m", traceable=True)
    base = to_program(src)
    ids = data.tokenize(src.tokenizer, data.text("wikitext2-test"))
    calib = data.calibration_batches(src.tokenizer, "wikitext2-valid", num_samples=args.calib_samples,
                                     seq_len=args.calib_len, seed=0)

    def teacher(input_ids, attention_mask=None):
        return src.model(input_ids=input_ids, attention_mask=attention_mask).logits

    fp = perplexity(CompiledModel(copy.deepcopy(base)), ids, args.protocol)
    dense_ffn = ffn_params(base, None)
    dense_bytes = base.size_report()["total_bytes"]
    print(f"FP {args.protocol}: {fp.ppl:.4f}; FFN params {dense_ffn}; {dense_bytes / 1e6:.1f} MB", flush=True)
    rows = [{"method": "FP32 (traced, no pass)", "passes": [], "protocol": fp.protocol, "windows": fp.windows,
             "ppl": round(fp.ppl, 4), "fp_ppl": round(fp.ppl, 4), "ffn_params": dense_ffn, "ffn_fraction": 1.0,
             "model_bytes": dense_bytes, "seconds": {"eval": round(fp.seconds, 1)}}]

    grid = [(k, b, i, 0) for k in args.kinds for b in args.budgets for i in args.inits]
    late = []  # recovery rows after the first pair run after the decode rows (they are optional)
    for n, pair in enumerate(args.recover):
        k, _, i = pair.partition(":")
        (grid if n == 0 else late).extend((k, b, i, args.steps) for b in args.budgets)
    keep, extra = {}, {}

    def save():
        extra.update(seconds_total=round(time.perf_counter() - t_start, 1), peak_rss_mb=round(peak_rss_mb()),
                     threads={"torch": args.threads, "onnxruntime": args.ort_threads},
                     load_average=os.getloadavg(),
                     calibration={"source": "wikitext2-valid", "samples": args.calib_samples,
                                  "seq_len": args.calib_len})
        return write_result(args.name, rows, model="smollm2-135m", model_sha256=src.fingerprint,
                            data_sha256=data.sha256("wikitext2-test"), extra=extra)

    def quality_row(kind, budget, init, steps):
        spec = (f"structured_ffn:kind={kind},budget={budget},init={init},checkpoint_dir={args.checkpoint_dir}")
        if steps:
            spec += (f",steps={steps},lr={args.lr},batch_size={args.batch_size},"
                     f"guided_fraction={args.guided_fraction}")
        program, pass_s = run_pass(base, spec, calib, teacher)
        st = program.history[0].stats
        r = perplexity(CompiledModel(program), ids, args.protocol)
        ffn = ffn_params(program, st)
        row = {"method": f"structured_ffn {kind} {round(budget * 100)}% {init} init"
                         + (f" + {steps} recovery steps" if steps else ""),
               "passes": [spec], "protocol": r.protocol, "windows": r.windows, "ppl": round(r.ppl, 4),
               "fp_ppl": round(fp.ppl, 4), "x_fp": round(r.ppl / fp.ppl, 3),
               "ffn_params": ffn, "ffn_fraction": round(ffn / dense_ffn, 4),
               "structured_fraction": st["fraction"], "model_bytes": program.size_report()["total_bytes"],
               "merged_units": st["merged"], "units": st["units"],
               "init_output_error_mean": st.get("init_output_error_mean"),
               "seconds": {"pass": round(pass_s, 1), **st["seconds"], "eval": round(r.seconds, 1)},
               "peak_rss_mb": round(peak_rss_mb())}
        if "recovery" in st:
            rec = st["recovery"]
            row["recovery"] = {"steps": rec["steps"], "tokens": rec["steps"] * args.batch_size * args.calib_len,
                               "kl_first": rec["kl_first"], "kl_last": rec["kl_last"], "lr": args.lr,
                               "guided_fraction": args.guided_fraction, "resumed_from": rec["resumed_from"]}
        rows.append(row)
        print(f"{row['method']}: ppl {r.ppl:.3f} ({r.ppl / fp.ppl:.3f}x FP), FFN {ffn / dense_ffn:.3f}, "
              f"{row['seconds']} [{(time.perf_counter() - t_start) / 60:.1f} min]", flush=True)
        if kind == args.decode_kind and (budget not in keep or steps):
            keep[budget] = (program, row["method"], spec)
        save()

    for cfg in grid:
        quality_row(*cfg)
    if not args.no_decode and keep:
        rows.extend(decode_rows(args, src, base, keep, ids))
        lat = [dict(ffn_block_latency(src.model, keep[b][0], 15, 200), budget=b, method=keep[b][1])
               for b in sorted(keep)]
        extra["ffn_latency_decode_torch"] = lat
        for x in lat:
            print(f"FFN block latency at 1 token, {x['method']}: {x['latency_ratio']:.3f}x dense", flush=True)
        save()
    keep.clear()
    for cfg in late:
        quality_row(*cfg)
    print("wrote", save())


def decode_rows(args, src, base, keep, ids) -> list[dict]:
    """ORT decode tokens/s of the dense export and the kept structured models, with HF eager beside."""
    from llmc.backends.onnxruntime import OrtModel, lower

    models = {"dense": (base, "onnxruntime FP32 (dense FFN)", [])}
    for b, (program, method, spec) in sorted(keep.items()):
        models[f"sffn{round(b * 100)}"] = (program, f"onnxruntime {method}", [spec])
    sessions, info = {}, {}
    for key, (program, method, passes) in models.items():
        out = os.path.join(args.out, key)
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        lower(program, out)
        files = ("model.onnx", "model.onnx.data")
        info[key] = {"export_s": round(time.perf_counter() - t0, 1),
                     "onnx_bytes": sum(os.path.getsize(os.path.join(out, f)) for f in files)}
        sessions[key] = OrtModel(out, threads=args.ort_threads)
        print(f"exported {key}: {info[key]}", flush=True)
    prompt = ids[:128].tolist()
    engines = {k: (lambda s=s: s.generate(prompt, 128, ignore_eos=True, return_tokens=True))
               for k, s in sessions.items()}
    engines["hf"] = lambda: src.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=128,
                                               min_new_tokens=128, do_sample=False)[0, 128:].tolist()
    with torch.inference_mode():
        tps, outs = interleaved_rates(engines, args.repeats)
    med = {k: statistics.median(v) for k, v in tps.items()}
    rows = []
    for key, (program, method, passes) in models.items():
        rows.append({"method": f"{method}: greedy decode, batch 1, 128+128", "passes": passes,
                     "tokens_per_s": round(med[key], 2), "fp_tokens_per_s": round(med["hf"], 2),
                     "dense_onnx_tokens_per_s": round(med["dense"], 2),
                     "x_dense_onnx": round(med[key] / med["dense"], 3), "repeats": args.repeats,
                     "all_tokens_per_s": [round(v, 2) for v in tps[key]],
                     "all_fp_tokens_per_s": [round(v, 2) for v in tps["hf"]],
                     "tokens_identical_to_hf": outs[key] == outs["hf"], **info[key]})
        print(f"decode {key}: {med[key]:.1f} tok/s ({med[key] / med['dense']:.3f}x dense ORT, "
              f"{med[key] / med['hf']:.2f}x HF eager)", flush=True)
    return rows


if __name__ == "__main__":
    main()
