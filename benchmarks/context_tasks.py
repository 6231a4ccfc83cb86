"""Knowledge-conflict tasks on SmolLM2-135M: accuracy (follows the context) and stubbornness (gives the
memorised answer) on the MemoTrap and COSE_KRE test files, plain and with context-aware decoding.

    python -m benchmarks.context_tasks [--passes SPEC ...] [--cad 0 0.5] [--limit N] [--name context_tasks]

(from the repository root). Rows: one per (task, CAD alpha) for the model compiled with `--passes`
(none: the FP model). The scoring is `llmc.context_tasks.context_following`, as `llmc eval memotrap|kre`.
"""

from __future__ import annotations

import argparse
import hashlib
import time

import torch

import llmc
from benchmarks.common import write_result
from llmc.context_tasks import context_following, load_examples, task_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", nargs="*", default=[], help="pass specs to compile with (default: none)")
    ap.add_argument("--calib", default=None, help="calibration data for the passes")
    ap.add_argument("--cad", type=float, nargs="+", default=[0.0, 0.5], help="CAD alphas (0: plain)")
    ap.add_argument("--tasks", nargs="+", default=["memotrap", "cose"])
    ap.add_argument("--limit", type=int, default=0, help="the first N test examples only (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="context_tasks")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src = llmc.load_model("smollm2-135m", traceable=True)
    model = llmc.compile(src, passes=args.passes, calibration=args.calib, progress=False)
    spec = " ".join(args.passes) or "FP"
    rows, digests = [], []
    for task in args.tasks:
        path = task_file(task, "test")
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
        examples = load_examples(path)[: args.limit or None]
        for alpha in args.cad:
            t0 = time.perf_counter()
            result = context_following(model, examples, cad=alpha)
            rows.append({"row": f"{task}:{spec}:cad={alpha:g}", "task": task, "passes": spec, "data": f"{path.name}",
                         **result, "seconds": round(time.perf_counter() - t0, 1), "threads": args.threads})
            print(rows[-1], flush=True)
    print(write_result(args.name, rows, model="smollm2-135m", model_sha256=src.fingerprint,
                       data_sha256=" ".join(digests)))


if __name__ == "__main__":
    main()
