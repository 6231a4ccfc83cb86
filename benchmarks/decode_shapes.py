"""Prefill and decode speed of ONNX exports at several batch sizes and prompt lengths, and their peers.

    python -m benchmarks.decode_shapes --export fp32= --export int4=rtn_quant:bits=4,group=64,lm_head=true,embeddings=true;int8_activations \
        [--folder NAME=DIR] [--genai-python PY --genai NAME=DIR] [--shapes 1x128,8x128,1x2048,8x2048] [--new-tokens 64]

(from the repository root). `--export NAME=SPECS` compiles the built-in model with the passes SPECS
(`;`-separated, empty for none) and exports it with the default (fused) lowering; `--folder` times
an existing llmc export; `--genai` a folder built by onnxruntime-genai's builder, decoded by
`--genai-python` (a Python that has onnxruntime-genai).

Every (engine, shape) is measured in a fresh subprocess (one model per process; the process start
and model load are not counted), rounds interleaved over the engines, medians of `--repeats`:
batch B of P-token prompts (B different windows of the WikiText-2 test text, no padding), then
greedy decode of `--new-tokens` tokens per row.
- time to first token: the prompt's forward pass (llmc: its last-position prefill session; genai:
  `append_tokens`), prefill tokens/s = B·P / that time;
- decode tokens/s = B·(new − 1) / the time of the remaining steps (all rows together);
- peak RSS of the process (VmHWM), model load included (llmc's process also holds torch and a second,
  last-position session for the prefill, with its own copy of the weights);
- both engines run with `--threads` intra-op threads; llmc's time to first token includes making the
  cache (room for the prompt and every new token), genai's allocates it before the timer. llmc decodes
  as OrtModel.generate does: `OrtModel.greedy_tokens` (numpy between the steps) for an export with
  shared cache buffers, else `step` and llmc.generation.greedy with torch on one thread; genai picks
  tokens in its own C++ loop.
A warm-up (a 16-token prompt and 4 steps) runs first in each process.

`--ppl` also scores every engine on ppl-512x40 of WikiText-2 test (llmc folders through OrtModel, genai
folders through their graph in a plain ONNX Runtime session, `GenaiGraph`) and records it in every row
of that engine, earlier rows of the results file included; `--shapes ''` then times nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

import numpy as np
import torch

import llmc
from benchmarks.common import STARTED_AT, load_rows, row_definitions, write_result
from llmc import data
from llmc.backends.onnxruntime import lower

_LLMC = r"""
import json, sys, time
import numpy as np
import torch
from llmc.backends.onnxruntime import OrtModel
from llmc.calibration import decode_inputs
from llmc.generation import greedy  # as OrtModel.generate picks a token
folder, threads, prompt_file, new = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.set_num_threads(1)  # as OrtModel.generate: ORT's threads work, torch's only pick the next token
model = OrtModel(folder, threads=threads)
prefill = model.prefill_step if model.prefill_session is not None else model.step

def run(ids, new):
    if model.shared_buffers:  # what OrtModel.generate runs for greedy decoding
        t0 = time.perf_counter()
        steps = model.greedy_tokens(ids.tolist(), new)
        tokens = [next(steps)]
        t1 = time.perf_counter()
        tokens += list(steps)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, np.stack(tokens, 1).tolist()
    B, P = ids.shape
    mask, pos = decode_inputs(ids)
    t0 = time.perf_counter()
    logits, cache = prefill(ids, mask, pos, model.empty_cache(B))
    nxt = greedy(torch.as_tensor(logits)[:, -1])[:, None]
    t1 = time.perf_counter()
    tokens = [nxt]
    for t in range(new - 1):
        mask = torch.ones(B, P + t + 1, dtype=mask.dtype)
        logits, cache = model.step(nxt, mask, torch.full((B, 1), P + t, dtype=torch.long), cache)
        nxt = greedy(torch.as_tensor(logits)[:, -1])[:, None]
        tokens.append(nxt)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, torch.cat(tokens, 1).tolist()

ids = torch.tensor(json.load(open(prompt_file)), dtype=torch.long)
run(ids[:, :16], 4)
ttft, decode, tokens = run(ids, new)
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"ttft_s": ttft, "decode_s": decode, "peak_rss_mb": peak / 1024, "tokens": tokens}))
"""

_GENAI = r"""
import json, sys, time
import numpy as np
import onnxruntime_genai as og
folder, prompt_file, new, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = og.Config(folder)  # the same intra-op threads as llmc's sessions
config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
model = og.Model(config)

def run(ids, new):
    B, P = ids.shape
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=P + new, min_length=P + new, do_sample=False, batch_size=B)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    gen.generate_next_token()
    t1 = time.perf_counter()
    while not gen.is_done():
        gen.generate_next_token()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, [[int(t) for t in gen.get_sequence(b)][P:] for b in range(B)]

ids = np.array(json.load(open(prompt_file)), dtype=np.int32)
run(ids[:, :16], 4)
ttft, decode, tokens = run(ids, new)
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"ttft_s": ttft, "decode_s": decode, "peak_rss_mb": peak / 1024, "tokens": tokens}))
"""


class GenaiGraph:
    """An onnxruntime-genai builder's decoder (`model.onnx` + `genai_config.json`) in a plain ONNX Runtime session,
    with llmc's step interface, so llmc.eval.perplexity scores it as it scores an llmc export (every window from
    an empty cache, no position_ids: the graph computes them from the mask)."""

    def __init__(self, folder: str, threads: int):
        import onnxruntime as ort

        with open(os.path.join(folder, "genai_config.json")) as f:
            decoder = json.load(f)["model"]["decoder"]
        self.layers, self.heads, self.dim = (decoder["num_hidden_layers"], decoder["num_key_value_heads"],
                                              decoder["head_size"])
        self.names = decoder["inputs"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(os.path.join(folder, decoder["filename"]), opts,
                                            providers=["CPUExecutionProvider"])

    def empty_cache(self, batch: int) -> list:
        return [np.zeros((batch, self.heads, 0, self.dim), np.float32) for _ in range(2 * self.layers)]

    def step(self, ids, mask, pos, past):
        feeds = {self.names["input_ids"]: ids.numpy(), self.names["attention_mask"]: mask.numpy()}
        for i in range(self.layers):
            feeds[self.names["past_key_names"] % i] = past[2 * i]
            feeds[self.names["past_value_names"] % i] = past[2 * i + 1]
        outs = self.session.run(None, feeds)
        return torch.from_numpy(outs[0]), outs[1:]


def perplexities(engines: dict, threads: int, ids) -> dict:
    """ppl-512x40 of WikiText-2 test for every engine: llmc folders through OrtModel, genai folders through
    GenaiGraph (the same windows and scoring)."""
    from llmc.backends.onnxruntime import OrtModel
    from llmc.eval import perplexity

    out = {}
    for name, (kind, folder) in engines.items():
        model = OrtModel(folder, threads=threads, prefill_session=False) if kind == "llmc" else GenaiGraph(folder, threads)
        out[name] = round(perplexity(model, ids, "ppl-512x40", progress=False).ppl, 4)
        print(json.dumps({"engine": name, "ppl_512x40": out[name]}), flush=True)
        del model
    return out


def _measure(kind: str, folder: str, threads: int, prompt_file: str, new: int, python: str) -> dict:
    if kind == "llmc":
        cmd = [sys.executable, "-c", _LLMC, folder, str(threads), prompt_file, str(new)]
    else:
        cmd = [python, "-c", _GENAI, folder, prompt_file, str(new), str(threads)]
    env = {**os.environ, "LLMC_QUIET": "1", "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} decode of {folder} failed: {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


_ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1, "int8": 1, "int16": 2, "int32": 4}


def export_facts(folder: str) -> dict:
    """The passes (specs), lowering, fusion setting and rewrites an llmc ONNX folder was made with, from its
    manifest; and its cache's bytes per token (every cache tensor's per-position slice, all layers) with
    the longest context whose cache fits in 1 GiB at batch 1."""
    with open(os.path.join(folder, "llmc_onnx.json")) as f:
        m = json.load(f)
    per_token = sum(c["shape"][1] * c["shape"][3] * _ITEM_BYTES[c["dtype"]] for c in m["cache_layout"]
                    if isinstance(c["shape"][2], str))  # fixed-length tensors (a float window) do not grow
    return {"passes": [h["spec"] for h in m.get("history", [])], "vq_lowering": m.get("vq_lowering"),
            "fuse": m.get("fuse"), "fusions": {k: v for k, v in (m.get("fusions") or {}).items() if v},
            "cache_bytes_per_token": per_token, "context_in_1gib": 2**30 // per_token}


def engine_of(row: dict) -> str:
    """The NAME a row was timed under (its id is NAME-bB-pP; its "engine" says which runtime ran it)."""
    return row["row"].rsplit("-b", 1)[0]


def _split(option: str, what: str) -> tuple[str, str]:
    name, sep, value = option.partition("=")
    if not sep or not name:
        raise SystemExit(f"{what} takes NAME=VALUE, got '{option}'")
    return name, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", action="append", default=[], metavar="NAME=SPECS",
                    help="compile the built-in model with these passes (';'-separated; empty: none) and export it")
    ap.add_argument("--folder", action="append", default=[], metavar="NAME=DIR", help="an existing llmc ONNX export")
    ap.add_argument("--genai", action="append", default=[], metavar="NAME=DIR",
                    help="a folder built by onnxruntime-genai's builder (needs --genai-python)")
    ap.add_argument("--genai-python", help="a Python with onnxruntime-genai")
    ap.add_argument("--shapes", default="1x128,8x128,1x2048,8x2048", help="BATCHxPROMPT, comma-separated ('' for none)")
    ap.add_argument("--ppl", action="store_true",
                    help="also score every engine on ppl-512x40 (WikiText-2 test) and record it in all its rows")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/llmc-bench-shapes")
    ap.add_argument("--name", default="decode_shapes")
    args = ap.parse_args()
    if args.genai and not args.genai_python:
        raise SystemExit("--genai needs --genai-python")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]

    src = llmc.load_model("smollm2-135m")
    ids = data.tokenize(src.tokenizer, data.text("wikitext2-test"))
    engines, about = {}, {}
    os.makedirs(args.out, exist_ok=True)
    for option in args.export:
        _split(option, "--export")  # NAME=SPECS, or a clear error
    for name, passes in row_definitions({}, args.export).items():
        folder = os.path.join(args.out, name)
        if not os.path.isfile(os.path.join(folder, "llmc_onnx.json")):
            calib = data.calibration_batches(src.tokenizer, "wikitext2-valid", seed=0) if passes else None
            cm = llmc.compile(src, passes=passes, calibration=calib)
            shutil.rmtree(folder, ignore_errors=True)
            lower(cm.program, folder)  # parity-checked
        engines[name] = ("llmc", folder)
        about[name] = {"engine": "llmc OrtModel", "passes": passes}
    for option in args.folder:
        name, folder = _split(option, "--folder")
        engines[name] = ("llmc", folder)
        about[name] = {"engine": "llmc OrtModel", "folder": folder}
    for name, (kind, folder) in engines.items():
        if kind == "llmc":
            about[name].update(export_facts(folder))
    for option in args.genai:
        name, folder = _split(option, "--genai")
        engines[name] = ("genai", folder)
        about[name] = {"engine": "onnxruntime-genai", "folder": folder}
    for name, (_, folder) in engines.items():
        about[name]["onnx_bytes"] = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                                        if f.startswith("model") and ".onnx" in f)

    rows = load_rows(args.name)
    if args.ppl:
        ppl = perplexities(engines, args.threads, ids)
        for name, value in ppl.items():
            about[name]["ppl_512x40"] = value
        for r in rows:  # earlier rows of the same engines
            if engine_of(r) in ppl:
                r["ppl_512x40"] = ppl[engine_of(r)]
        write_result(args.name, rows, model="smollm2-135m", model_sha256=src.fingerprint,
                     data_sha256=data.sha256("wikitext2-test"))
    for B, P in shapes:
        if B * P > ids.numel():
            raise SystemExit(f"the test text has {ids.numel()} tokens, fewer than {B}x{P}")
        prompt_file = os.path.join(args.out, f"prompt-{B}x{P}.json")
        with open(prompt_file, "w") as f:
            json.dump(ids[: B * P].reshape(B, P).tolist(), f)
        runs = {k: [] for k in engines}
        load = [os.getloadavg()[0]]
        for _ in range(args.repeats):
            for name, (kind, folder) in engines.items():
                runs[name].append(_measure(kind, folder, args.threads, prompt_file, args.new_tokens, args.genai_python))
        load.append(os.getloadavg()[0])
        for name, rs in runs.items():
            ttft = statistics.median(r["ttft_s"] for r in rs)
            decode = statistics.median(r["decode_s"] for r in rs)
            row = {"row": f"{name}-b{B}-p{P}", "engine": name, **about[name], "batch": B, "prompt": P,
                   "new_tokens": args.new_tokens, "ttft_s": round(ttft, 4), "prefill_tokens_per_s": round(B * P / ttft, 1),
                   "decode_tokens_per_s": round(B * (args.new_tokens - 1) / decode, 2),
                   "all_decode_tokens_per_s": [round(B * (args.new_tokens - 1) / r["decode_s"], 2) for r in rs],
                   "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs)), "threads": args.threads,
                   "loadavg_before_after": [round(v, 2) for v in load], "first_tokens": rs[-1]["tokens"][0][:16],
                   "commit": STARTED_AT}
            rows = [r for r in rows if r["row"] != row["row"]] + [row]
            print(json.dumps({k: row[k] for k in ("row", "ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s",
                                                   "peak_rss_mb")}), flush=True)
        write_result(args.name, rows, model="smollm2-135m", model_sha256=src.fingerprint,
                     data_sha256=data.sha256("wikitext2-test"))


if __name__ == "__main__":
    main()
