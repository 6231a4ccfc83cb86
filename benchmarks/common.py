"""Shared pieces of the benchmark scripts: the result file format of BENCHMARKS.md, timing, memory.

The scripts are modules of the `benchmarks` package, run from the repository root:
`python -m benchmarks.NAME ...` (`from benchmarks import common`; nothing edits sys.path).
"""

from __future__ import annotations

import json
import numbers
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# LLMC_BENCH_RESULTS: write (and resume from) another folder, e.g. for a smoke run
RESULTS = os.environ.get("LLMC_BENCH_RESULTS") or os.path.join(ROOT, "benchmarks", "results")
TRACES = os.path.join(os.path.dirname(RESULTS), "traces")  # beside results/, not in it: not results files
# A list of more numbers than this inside a row is a per-step trace: write_result moves it to
# benchmarks/traces/<name>.json (keyed by row) and the row keeps its summary fields (kl_first, steps, ...).
TRACE_MIN_LEN = 20


def commit() -> str:
    """HEAD's short hash, with "-dirty" when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


# The code a run measures is the code it started with: a long run must not take the commit made
# while it ran (write_result records this one).
STARTED_AT = commit()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_time(fn, repeats: int = 3) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


PROVENANCE = ("commit", "date", "machine")


def load_rows(name: str) -> list[dict]:
    """The rows of benchmarks/results/<name>.json, or [] when there is none (resumable benchmarks).

    A row without its own commit, date or machine takes the file's: a later run that rewrites the
    file with new rows must not pass the old rows off as measured at its commit, on its machine."""
    path = os.path.join(RESULTS, f"{name}.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        doc = json.load(f)
    for row in doc["rows"]:
        for key in PROVENANCE:
            if key not in row and key in doc:
                row[key] = doc[key]
    return doc["rows"]


def machine() -> dict:
    """CPU count, torch threads and the CPU's kernel level (AVX2 / AVX512: bf16 and int8 speed depend on it)."""
    import torch

    from llmc.calibration import native_bf16

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16()}


def command() -> str:
    """How this process was started, as a command to rerun from the repository root: the `-m` form for
    a module of the benchmarks package (arguments shell-quoted)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        return "python -m " + shlex.join([spec.name] + sys.argv[1:])
    return "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def _row_key(row: dict, index: int) -> str:
    return str(row["row"]) if row.get("row") is not None else f"{index}: {row.get('method')}"


def _is_trace(v) -> bool:
    return (isinstance(v, list) and len(v) > TRACE_MIN_LEN
            and all(x is None or (isinstance(x, numbers.Real) and not isinstance(x, bool)) for x in v))


def _pop_traces(d: dict) -> dict:
    """Remove the per-step traces (long lists of numbers) from `d`, nested dicts included; return them
    in the same nesting."""
    out = {}
    for k in list(d):
        v = d[k]
        if _is_trace(v):
            out[k] = d.pop(k)
        elif isinstance(v, dict):
            inner = _pop_traces(v)
            if inner:
                out[k] = inner
    return out


def split_traces(name: str, rows: list[dict]) -> str | None:
    """Move the per-step traces out of `rows` (in place) into benchmarks/traces/<name>.json, keyed by row
    (`row`, else index and method), beside the row's commit and date. Entries of the file for rows
    that are still in `rows` with the same commit and date are kept (a row read back by load_rows
    has no traces left); the rest go. Returns the trace file's path relative to the repository, or None when
    there are no traces (an old trace file is then removed)."""
    path = os.path.join(TRACES, f"{name}.json")
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f).get("by_row", {})
    traces = {}
    for i, row in enumerate(rows):
        key = _row_key(row, i)
        moved = _pop_traces(row)
        if moved:
            traces[key] = {"commit": row.get("commit"), "date": row.get("date"), **moved}
        elif key in old and (old[key].get("commit"), old[key].get("date")) == (row.get("commit"), row.get("date")):
            traces[key] = old[key]
    if not traces:
        if os.path.exists(path):
            os.remove(path)
        return None
    os.makedirs(TRACES, exist_ok=True)
    head = json.dumps({"benchmark": name, "results": f"benchmarks/results/{name}.json",
                       "about": "per-step traces of the rows of the results file, by row; the rows keep the "
                                "summaries (first/last values, steps)"}, indent=2)
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in traces.items())  # one line per row
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(head[:-2] + ',\n  "by_row": {\n' + body + "\n  }\n}\n")
    os.replace(tmp, path)
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel  # a results folder outside the repository: absolute


def write_result(name: str, rows: list[dict], *, model: str, model_sha256: str, data_sha256: str,
                 extra: dict | None = None) -> str:
    """Write benchmarks/results/<name>.json in the format of BENCHMARKS.md and return its path.

    Long per-step traces in the rows go to benchmarks/traces/<name>.json (`split_traces`); the file
    names it under "traces"."""
    from llmc.compiled import versions

    os.makedirs(RESULTS, exist_ok=True)
    now = {"commit": STARTED_AT, "date": time.strftime("%Y-%m-%d"), "machine": machine()}
    for row in rows:  # rows of this run; older ones carry theirs (load_rows)
        for key in PROVENANCE:
            row.setdefault(key, now[key])
    traces = split_traces(name, rows)
    doc = {"benchmark": name, "command": command(),
           **now, "versions": versions(),
           "model": model, "model_sha256": model_sha256, "data_sha256": data_sha256, "rows": rows}
    if extra:
        doc.update(extra)
    if traces:
        doc["traces"] = traces
    path = os.path.join(RESULTS, f"{name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, path)
    return path


_SESSION_RSS = """
import resource, sys
from llmc.backends.onnxruntime import OrtModel
OrtModel(sys.argv[1], threads=int(sys.argv[2]))
try:  # this process's own peak: ru_maxrss keeps the parent's peak across the spawn on Linux
    print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def session_rss_mb(folder: str, threads: int) -> float:
    """Peak RSS (MB) of a fresh Python process that opens the ONNX folder with OrtModel (its two
    sessions: the model and its last-position variant), imports included."""
    done = subprocess.run([sys.executable, "-c", _SESSION_RSS, folder, str(threads)], capture_output=True, text=True,
                          check=True, env={**os.environ, "LLMC_QUIET": "1"})
    return int(done.stdout.split()[-1]) / 1024


class SelfTimed(tuple):
    """What an engine that times itself returns: (tokens, seconds of its own decode)."""


def interleaved_rates(engines: dict, repeats: int, new_tokens: int = 128) -> tuple[dict, dict]:
    """Tokens/s of each engine (a callable generating `new_tokens` tokens) over `repeats` rounds.

    Rounds interleave the engines so that drifts in machine load hit them alike. An engine that
    returns SelfTimed is rated by its own seconds. Returns {name: [tokens/s per round]} and
    {name: the last round's output tokens}.
    """
    rates = {k: [] for k in engines}
    outs = {}
    for _ in range(repeats):
        for name, fn in engines.items():
            t0 = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - t0
            if isinstance(out, SelfTimed):
                out, seconds = out
            outs[name] = out
            rates[name].append(new_tokens / seconds)
    return rates, outs


def genai_engine(python: str, folder: str, prompt: list[int], new_tokens: int = 128):
    """A decode engine for interleaved_rates: greedy decode of `folder` under onnxruntime-genai, run by
    `python` (which has it) in a subprocess; rated by genai_decode.py's own timing, so the process
    start and model load are not counted (prompt processing is, as for the other engines)."""
    # by path: genai_decode.py imports nothing of llmc or of this package, so any Python with genai runs it
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "genai_decode.py")
    prompt_file = os.path.join(folder, "..", f"{os.path.basename(folder)}-prompt.json")
    with open(prompt_file, "w") as f:
        json.dump(prompt, f)

    def run() -> SelfTimed:
        res = subprocess.run([python, script, folder, prompt_file, "--new-tokens", str(new_tokens)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"onnxruntime-genai failed on {folder}: {res.stderr.strip()[-2000:]}")
        out = json.loads(res.stdout.strip().splitlines()[-1])
        return SelfTimed((out["tokens"], new_tokens / out["tokens_per_s"][0]))
    return run


def row_definitions(rows: dict, extra: list[str]) -> dict:
    """A script's rows {name: pass specs} plus those given as `--row NAME=SPEC[;SPEC...]`."""
    out = dict(rows)
    for item in extra:
        key, _, specs = item.partition("=")
        out[key] = [s for s in specs.split(";") if s]
    return out


def export_onnx(cm, out: str, lowering: str) -> tuple[dict, int, float]:
    """`cm` lowered to a fresh ONNX folder `out` (vq_lowering `lowering`): its parity report, the folder's
    bytes and the export's seconds (parity check included)."""
    import shutil

    from llmc.backends.onnxruntime import lower

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    lower(cm.program, out, vq_lowering=lowering)
    seconds = time.perf_counter() - t0
    with open(os.path.join(out, "llmc_onnx.json")) as f:
        parity = json.load(f)["parity"]
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    return parity, size, seconds
