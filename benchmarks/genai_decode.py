"""Greedy decode speed of an ONNX folder under onnxruntime-genai (run with a Python that has it).

    python -m benchmarks.genai_decode FOLDER PROMPT_JSON [--new-tokens 128] [--runs 1]

Prints one JSON line: tokens/s of each run (prompt processing included) and the new tokens. It
imports nothing of llmc or of the benchmarks package, so `common.genai_engine` runs it by its path
with another Python (one that has onnxruntime-genai).
"""

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("prompt_json")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    import onnxruntime_genai as og  # here, so that --help and imports work without it

    prompt = json.load(open(args.prompt_json))
    model = og.Model(args.folder)
    rates, tokens = [], []
    for _ in range(args.runs):
        params = og.GeneratorParams(model)
        total = len(prompt) + args.new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        while not gen.is_done():
            gen.generate_next_token()
        rates.append(args.new_tokens / (time.perf_counter() - t0))
        tokens = [int(t) for t in gen.get_sequence(0)][len(prompt):]
    print(json.dumps({"tokens_per_s": rates, "tokens": tokens}))


if __name__ == "__main__":
    main()
