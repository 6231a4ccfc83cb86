"""IRCAN attribution cost on SmolLM2-135M: seconds per example of the fast exact integrated gradients.

    python -m benchmarks.ircan [--task memotrap] [--examples 3] [--steps 20] [--threads 1]   # from the repo root

For the first N dev examples of the task: the wall time of one example's attribution (all 30 layers,
m points each; the two prompt runs included), with the tokenizer work excluded. Beside it, the cost the
naive reference would have, estimated from measured pieces: one forward + backward (to one layer's
down_proj input) of the whole with-context prompt through the Hugging Face model, times layers x m.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import llmc
from llmc import data
from benchmarks.common import load_rows, write_result
from llmc.passes.ircan import Attributor, example_neurons, load_examples
from llmc.context_tasks import answer_token, encode, task_file


def naive_step_seconds(hf, ids: list[int], layer: int, repeats: int = 3) -> float:
    """One naive point: the whole prompt forward and backward to `layer`'s down_proj input (median)."""
    times = []
    for _ in range(repeats):
        held = {}

        def hook(module, args):
            held["a"] = args[0].detach().requires_grad_()
            return (held["a"],)
        h = hf.model.layers[layer].mlp.down_proj.register_forward_pre_hook(hook)
        t0 = time.perf_counter()
        p = torch.softmax(hf(torch.tensor([ids])).logits[0, -1], -1)[0]
        torch.autograd.grad(p, held["a"])
        times.append(time.perf_counter() - t0)
        h.remove()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="memotrap", choices=["memotrap", "cose"])
    ap.add_argument("--examples", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ig", default="plain", choices=["plain", "alpha"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="ircan")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src = llmc.load_model("smollm2-135m")
    program = llmc.to_program(src)
    tok = program.tokenizer
    path = task_file(args.task)
    examples = load_examples(path)[:args.examples]
    t0 = time.perf_counter()
    attributor = Attributor(program.gm, program.empty_cache, args.steps, args.ig)
    setup = time.perf_counter() - t0
    rows = []
    for k, ex in enumerate(examples):
        w, wo = encode(tok, ex.with_context), encode(tok, ex.without_context)
        y = answer_token(tok, ex.answer, ex.where)
        t0 = time.perf_counter()
        att = attributor(w, wo, y)
        seconds = time.perf_counter() - t0
        kept = example_neurons(att.scores)
        row = {"row": f"{args.task}:{k}:threads={args.threads}", "task": args.task, "example": ex.where.rsplit("/", 3)[-1],
               "with_tokens": len(w), "without_tokens": len(wo), "answer": ex.answer, "steps": args.steps,
               "ig": args.ig, "seconds": round(seconds, 3), "p_with": att.p_with, "p_without": att.p_without,
               "kept": len(kept), "top": [list(t) for t in kept[:5]]}
        if k == 0:
            one = naive_step_seconds(src.model, w, layer=0)
            row["naive_point_seconds"] = round(one, 4)
            row["naive_estimate_seconds"] = round(one * attributor.num_layers * args.steps, 1)
        print(f"{row['row']}: {seconds:.2f} s ({len(w)} tokens), p_with {att.p_with:.4f} p_without "
              f"{att.p_without:.4f}, top {row['top'][:2]}", flush=True)
        row.update(setup_seconds=round(setup, 2), threads=args.threads, data_sha256=data.sha256(str(path)))
        rows.append(row)
    summary = {"seconds_per_example_mean": round(statistics.mean(r["seconds"] for r in rows), 3),
               "seconds_per_example_max": round(max(r["seconds"] for r in rows), 3),
               "setup_seconds": round(setup, 2), "threads": args.threads}
    print(summary, flush=True)
    # Rows of the other task (an earlier run) stay; this run's replace their namesakes.
    new = {r["row"] for r in rows}
    rows = [r for r in load_rows(args.name) if r["row"] not in new] + rows

    write_result(args.name, rows, model="smollm2-135m", model_sha256=src.fingerprint,
                 data_sha256=data.sha256(str(path)), extra={"data": str(path)})


if __name__ == "__main__":
    main()
