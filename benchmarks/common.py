"""Shared pieces of the benchmark scripts: the result file format of BENCHMARKS.md, timing, memory."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def commit() -> str:
    """HEAD's short hash, with "-dirty" when tracked files differ from it."""
    root = os.path.dirname(os.path.dirname(RESULTS))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=root, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=root, check=True).stdout.strip()
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

    from llmc.passes.pv_quant_tune import native_bf16

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16()}


def write_result(name: str, rows: list[dict], *, model: str, model_sha256: str, data_sha256: str,
                 extra: dict | None = None) -> str:
    """Write benchmarks/results/<name>.json in the format of BENCHMARKS.md and return its path."""
    from llmc.compiled import versions

    os.makedirs(RESULTS, exist_ok=True)
    now = {"commit": STARTED_AT, "date": time.strftime("%Y-%m-%d"), "machine": machine()}
    for row in rows:  # rows of this run; older ones carry theirs (load_rows)
        for key in PROVENANCE:
            row.setdefault(key, now[key])
    doc = {"benchmark": name, "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
           **now, "versions": versions(),
           "model": model, "model_sha256": model_sha256, "data_sha256": data_sha256, "rows": rows}
    if extra:
        doc.update(extra)
    path = os.path.join(RESULTS, f"{name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, path)
    return path


_SESSION_RSS = """
import resource, sys
from llmc.runtime import OrtModel
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
