"""Weak-to-strong search on SmolLM2-135M-Instruct: gold reward vs base-model tokens per method.

    python scripts/make_guides.py -o out/guides                      # the guide pair (once)
    python -m benchmarks.guidance [--prompts 100] [--tokens 20] [--seeds 0 1 2] [--threads 1]

Steers SmolLM2-135M-Instruct (the base, frozen) toward positive sentiment with the guide pair of
scripts/make_guides.py (a 4-layer student distilled from it, and that student DPO-trained on its
own samples ranked by VADER). Prompts: the first `--prompt-words` words of sentences of
wikitext-2-raw test (wiki.test.raw), in file order. Gold reward: VADER's compound score of the
chosen continuation (-1..1). Every method runs through `llmc.search` with temperature 0.7 and
top-k 50: sampling (W=K=1), best-of-N (W=1, K=N, L=∞), CBS(W, K, L), and EFT (β=1: sampling from
the fused base + tuned − untuned step graph). For each: mean reward and its std over seeds,
mean base-model tokens generated per prompt, seconds per seed, the base model's perplexity of the
chosen continuations. Also: the scorer's cost per chunk with and without its own KV caches (same
run, same choices), one guide's decode time against the base's, and (--ort) the search in ONNX
Runtime against torch for a fixed seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import time

import torch

import llmc
from benchmarks.common import ROOT, write_result
from llmc import data
from llmc.data import sentence_starts
from llmc.generation import left_pad, position_ids_from_mask
from llmc.passes.fuse_guidance import fuse_eft, fuse_scorer
from llmc.search import SearchSpec, continuation_logprob, search

METHODS = ("sampling", "bon:n=16", "eft:beta=1", "cbs:w=4,k=4,l=5", "cbs:w=2,k=2,l=5")
# Best-of-M read off the best-of-16 run's first M samples of each prompt (i.i.d. draws of the base).
DERIVED_BON = (4, 8)


def batch_prompts(rows: int, target: int = 64) -> int:
    """Prompts per search call: about `target` rows in the base model's batch."""
    return max(1, target // rows)


def decode_seconds(model, batch: int, past_len: int = 16, steps: int = 8) -> float:
    """Median seconds of one decode step of `model` at `batch` rows after `past_len` tokens."""
    ids = torch.randint(100, 1000, (batch, past_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, past_len + 1, dtype=torch.long)
    _, past = model.step(ids, mask[:, :-1], position_ids_from_mask(mask[:, :-1]), model.empty_cache(batch))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.step(ids[:, :1], mask, torch.full((batch, 1), past_len), past)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_method(spec, base, eft, scorer, prompts, args, seed, vader) -> dict[str, dict]:
    """One search over every prompt with one seed: {method name: run}, plus the derived best-of-M runs."""
    s = SearchSpec.parse(spec)
    model = eft if s.kind == "eft" else base
    derive = s.kind == "bon" and s.successors == 16
    res = search(model, prompts, s, scorer, max_new_tokens=args.tokens, seed=seed,
                 batch_prompts=batch_prompts(s.rows), keep_candidates=derive, progress=True)
    if s.kind == "eft":  # its sampling log-probs are the fused model's: score the text with the base itself
        logp = continuation_logprob(base, prompts, res.tokens)
    else:
        logp = res.base_logprob
    runs = {s.name: _run(s.name, seed, res.texts, logp, res.tokens, res.base_tokens, vader,
                         seconds=res.seconds, scorer_seconds=res.scorer_seconds, scorer_calls=res.scorer_calls)}
    for m in DERIVED_BON if derive else ():
        picked = [max(c[:m], key=lambda x: x[1]) for c in res.candidates]
        runs[f"bon-{m}"] = _run(f"bon-{m}", seed, [base.tokenizer.decode(t, skip_special_tokens=True) for t, _, _ in picked],
                                [lp for _, _, lp in picked], [t for t, _, _ in picked],
                                [sum(len(t) for t, _, _ in c[:m]) for c in res.candidates], vader,
                                derived_from=s.name)
    return runs


def _run(name, seed, texts, logp, tokens, base_tokens, vader, **extra) -> dict:
    rewards = [vader.polarity_scores(t)["compound"] for t in texts]
    return {"method": name, "seed": seed, "reward": statistics.mean(rewards),
            "reward_prompt_std": statistics.pstdev(rewards), "base_tokens": statistics.mean(base_tokens),
            "nll": -sum(logp), "tokens": sum(len(t) for t in tokens), "texts": texts[:3], **extra}


def summarise(runs: list[dict], prompts: int) -> dict:
    rewards = [r["reward"] for r in runs]
    nll, tokens = sum(r["nll"] for r in runs), sum(r["tokens"] for r in runs)
    return {"method": runs[0]["method"], "reward": round(statistics.mean(rewards), 4),
            "reward_std": round(statistics.stdev(rewards), 4) if len(rewards) > 1 else None,  # over seeds
            "reward_per_seed": [round(x, 4) for x in rewards], "seeds": [r["seed"] for r in runs],
            "reward_prompt_std": round(statistics.mean(r["reward_prompt_std"] for r in runs), 4),
            # the standard error of one seed's mean over the prompts
            "reward_sem": round(statistics.mean(r["reward_prompt_std"] for r in runs) / math.sqrt(prompts), 4),
            "base_tokens": round(statistics.mean(r["base_tokens"] for r in runs), 2), "prompts": prompts,
            # seconds per seed (all prompts); a best-of-M read off the best-of-16 run has none of its own
            "seconds": round(statistics.mean(r["seconds"] for r in runs), 2) if "seconds" in runs[0] else None,
            "scorer_seconds": round(statistics.mean(r["scorer_seconds"] for r in runs), 2) if "seconds" in runs[0] else None,
            **({"derived_from": runs[0]["derived_from"]} if "derived_from" in runs[0] else {}),
            "base_ppl": round(math.exp(nll / max(tokens, 1)), 3),
            "mean_response_tokens": round(tokens / (len(runs) * prompts), 2),
            "example": runs[0]["texts"][0]}


def plot(results: str, out: str) -> str:
    """Mean gold reward (± std over seeds) against base-model tokens per prompt, one point per method,
    written as a PNG like benchmarks/make_docs.py writes its plots (Agg, fixed size and dpi, no metadata)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    with open(results) as f:
        doc = json.load(f)
    rows = [r for r in doc["rows"] if isinstance(r.get("reward"), (int, float))]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"sampling": ("#7f7f7f", "o"), "bon": ("#1f77b4", "s"), "eft": ("#2ca02c", "D"), "cbs": ("#d62728", "^")}
    bon = sorted((r for r in rows if r["method"].startswith("bon-")), key=lambda r: r["base_tokens"])
    if bon:
        ax.plot([r["base_tokens"] for r in bon], [r["reward"] for r in bon], color=styles["bon"][0], lw=0.8, zorder=1)
    for r in rows:
        color, marker = styles.get(r["method"].split("-")[0], ("black", "x"))
        ax.errorbar([r["base_tokens"]], [r["reward"]], yerr=[r.get("reward_std") or 0.0], color=color, marker=marker,
                    ms=6, capsize=3, lw=1, zorder=3)
        ax.annotate(f"{r['method']} (ppl {r['base_ppl']:.1f})", (r["base_tokens"], r["reward"]),
                    textcoords="offset points", xytext=(6, -11 if r["method"].startswith("cbs") else 4), fontsize=7.5)
    ax.set_xscale("log")
    ticks = sorted({round(r["base_tokens"]) for r in rows})
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("base-model tokens generated per prompt (log scale)")
    ax.set_ylabel("mean VADER compound of the chosen continuation")
    s = doc.get("settings", {})
    ax.set_title(f"Weak-to-strong search on SmolLM2-135M-Instruct: {s.get('prompts')} prompts, "
                 f"{s.get('tokens')} tokens, seeds {s.get('seeds')}", fontsize=9.5)
    ax.grid(True, lw=0.3, alpha=0.5)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return out


def ort_rows(base, scorer, prompts, args) -> list[dict]:
    """The CBS(4,4,5) search with base and scorer in ONNX Runtime against torch, same prompts and seed."""
    from llmc.backends.onnxruntime import OrtModel

    ort = llmc.get_backend("onnxruntime")
    folder = os.path.join(ROOT, "out", f"{args.name}_onnx")
    t0 = time.perf_counter()
    base_onnx = OrtModel(ort.lower(base.program, os.path.join(folder, "base"), overwrite=True), threads=args.threads)
    t1 = time.perf_counter()
    scorer_onnx = OrtModel(ort.lower(scorer.program, os.path.join(folder, "scorer"), overwrite=True),
                           threads=args.threads)
    t2 = time.perf_counter()
    p = prompts[:args.ort_prompts]
    ref = search(base, p, "cbs:w=4,k=4,l=5", scorer, max_new_tokens=args.tokens, seed=0, batch_prompts=2)
    got = search(base_onnx, p, "cbs:w=4,k=4,l=5", scorer_onnx, max_new_tokens=args.tokens, seed=0, batch_prompts=2)
    return [{"method": "ort-cbs-4-4-5", "prompts": len(p), "same_choices": got.tokens == ref.tokens,
             "prompts_identical": sum(a == b for a, b in zip(got.tokens, ref.tokens)),
             "max_score_diff": max(abs(a - b) for a, b in zip(got.scores, ref.scores)),
             "seconds_torch": round(ref.seconds, 2), "seconds_ort": round(got.seconds, 2),
             "scorer_seconds_torch": round(ref.scorer_seconds, 2), "scorer_seconds_ort": round(got.scorer_seconds, 2),
             "export_seconds_base": round(t1 - t0, 1), "export_seconds_scorer": round(t2 - t1, 1),
             "base_parity": base_onnx.manifest.get("parity"), "scorer_parity": scorer_onnx.manifest.get("parity")}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guides", default="out/guides", help="folder written by scripts/make_guides.py")
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--prompt-words", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=20, help="max new tokens per response")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--cost-prompts", type=int, default=8, help="prompts of the scorer cache on/off comparison")
    ap.add_argument("--ort", action="store_true", help="only export base and scorer to ONNX and compare the search "
                                                       "in ONNX Runtime with torch (results: NAME_ort.json)")
    ap.add_argument("--ort-prompts", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="guidance")
    ap.add_argument("--merge", nargs="+", default=[], metavar="NAME",
                    help="first take the finished runs of other runs' checkpoints (--name NAME, same settings), "
                         "e.g. seeds run in parallel processes")
    ap.add_argument("--finished-only", action="store_true",
                    help="run nothing new: write the rows of the finished runs (each row lists its seeds)")
    ap.add_argument("--plot", action="store_true", help="only redraw docs/plots/guidance_reward_vs_tokens.png "
                                                        "from the results file")
    args = ap.parse_args()
    if args.plot:
        from benchmarks.common import RESULTS

        print(plot(os.path.join(RESULTS, f"{args.name}.json"),
                   os.path.join(ROOT, "docs", "plots", "guidance_reward_vs_tokens.png")))
        return
    torch.set_num_threads(args.threads)
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    test_text = data.text("wikitext2-test")
    prompts = sentence_starts(test_text, args.prompt_words, args.prompts)
    models: dict = {}

    def load_models():  # only when something is to be run (a --finished-only merge needs none)
        if not models:
            models["base"] = llmc.compile("smollm2-135m", progress=False)
            tuned = llmc.compile(os.path.join(args.guides, "tuned"), progress=False)
            models["untuned"] = llmc.compile(os.path.join(args.guides, "untuned"), progress=False)
            models["scorer"] = llmc.CompiledModel(fuse_scorer(tuned, models["untuned"]))
            models["eft"] = llmc.CompiledModel(fuse_eft(models["base"], tuned, models["untuned"], beta=1.0))
        return models["base"], models["untuned"], models["scorer"], models["eft"]

    with open(os.path.join(args.guides, "guides.json")) as f:
        guides = json.load(f)

    src = llmc.load_model("smollm2-135m")
    meta = dict(model="smollm2-135m", model_sha256=src.fingerprint, data_sha256=data.sha256("wikitext2-test"))
    if args.ort:
        base, _, scorer, _ = load_models()
        print(write_result(f"{args.name}_ort", ort_rows(base, scorer, prompts, args), **meta,
                           extra={"settings": {"prompts": args.ort_prompts, "tokens": args.tokens, "seed": 0,
                                               "guides": args.guides}, "threads": args.threads}))
        return
    # Resumable: finished (method, seed) runs are kept under the run's settings.
    settings = {k: getattr(args, k) for k in ("guides", "prompts", "prompt_words", "tokens", "threads")}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    ckpt = os.path.join(ROOT, "out", f"{args.name}_runs_{key}.json")
    runs = json.load(open(ckpt)) if os.path.exists(ckpt) else {}
    for other in args.merge:
        path = os.path.join(ROOT, "out", f"{other}_runs_{key}.json")
        if not os.path.exists(path):
            raise SystemExit(f"--merge {other}: no checkpoint {path} with these settings")
        with open(path) as f:
            runs.update({k: v for k, v in json.load(f).items() if k not in runs})

    def save():
        os.makedirs(os.path.dirname(ckpt), exist_ok=True)
        with open(ckpt, "w") as f:
            json.dump(runs, f, indent=1)

    rows = []
    # The scorer's cost per chunk call, with and without its own caches (same prompts, same seed).
    if "scorer-cost" not in runs:
        base, untuned, scorer, eft = load_models()
        cost = {}
        for cache in (True, False):
            res = search(base, prompts[:args.cost_prompts], "cbs:w=4,k=4,l=5", scorer, max_new_tokens=args.tokens,
                         seed=0, batch_prompts=batch_prompts(16), scorer_cache=cache)
            chunks = res.scorer_calls - (math.ceil(args.cost_prompts / batch_prompts(16)) if cache else 0)
            cost[cache] = {"seconds": res.scorer_seconds, "calls": res.scorer_calls, "chunks": chunks,
                           "tokens": res.tokens, "search_seconds": res.seconds}
        runs["scorer-cost"] = {
            "method": "scorer-cost", "search": "cbs-4-4-5", "prompts": args.cost_prompts,
            "rows_per_call": 16 * batch_prompts(16), "chunk_calls": cost[True]["chunks"],
            "seconds_per_chunk_cached": round(cost[True]["seconds"] / cost[True]["chunks"], 4),
            "seconds_per_chunk_uncached": round(cost[False]["seconds"] / cost[False]["chunks"], 4),
            "scorer_seconds_cached": round(cost[True]["seconds"], 3),
            "scorer_seconds_uncached": round(cost[False]["seconds"], 3),
            "search_seconds_cached": round(cost[True]["search_seconds"], 3),
            "search_seconds_uncached": round(cost[False]["search_seconds"], 3),
            "same_choices": cost[True]["tokens"] == cost[False]["tokens"]}
        save()
    # One guide's decode step against the base's, at the batch of the CBS(4,4,5) runs.
    if "guide-cost" not in runs:
        base, untuned, scorer, eft = load_models()
        batch = 16 * batch_prompts(16)
        t_base, t_guide = decode_seconds(base, batch), decode_seconds(untuned, batch)
        t_base1, t_guide1 = decode_seconds(base, 1), decode_seconds(untuned, 1)
        runs["guide-cost"] = {
            "method": "guide-cost", "batch": batch, "base_step_seconds": round(t_base, 4),
            "guide_step_seconds": round(t_guide, 4), "guide_over_base": round(t_guide / t_base, 3),
            "base_step_seconds_batch1": round(t_base1, 4), "guide_step_seconds_batch1": round(t_guide1, 4),
            "guide_over_base_batch1": round(t_guide1 / t_base1, 3),
            "base_parameters": guides["teacher_parameters"], "guide_parameters": guides["student_parameters"]}
        save()
    print(json.dumps(runs["scorer-cost"]), json.dumps(runs["guide-cost"]), flush=True)
    # Seed-major, so that an interrupted run has every method at the seeds it finished.
    for seed in args.seeds:
        for spec in args.methods:
            name = SearchSpec.parse(spec).name
            if f"{name}/{seed}" in runs or args.finished_only:
                continue
            base, _, scorer, eft = load_models()
            for m, run in run_method(spec, base, eft, scorer, prompts, args, seed, vader).items():
                runs[f"{m}/{seed}"] = run
                print(json.dumps({x: run.get(x) for x in ("method", "seed", "reward", "base_tokens", "seconds")}),
                      flush=True)
            save()
    names = []
    for spec in args.methods:
        s = SearchSpec.parse(spec)
        if s.kind == "bon" and s.successors == 16:
            names += [f"bon-{m}" for m in DERIVED_BON]
        names.append(s.name)
    for name in names:
        done = [runs[f"{name}/{seed}"] for seed in args.seeds if f"{name}/{seed}" in runs]
        if done:
            rows.append(summarise(done, len(prompts)))
    rows += [runs["scorer-cost"], runs["guide-cost"]]

    path = write_result(args.name, rows, **meta,
                        extra={"merged_runs_of": args.merge, "settings": {**settings, "seeds": args.seeds, "temperature": 0.7, "top_k": 50,
                                            "prompt_source": "sentence starts of wikitext-2-raw/wiki.test.raw",
                                            "gold_reward": "vaderSentiment 3.3.2 compound"},
                               "guides": guides, "threads": args.threads})
    print(path)


if __name__ == "__main__":
    main()
