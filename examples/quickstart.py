"""The main job on the built-in default: load SmolLM2-135M, compile, generate, save, export to
ONNX (parity-checked), evaluate both, report.

    python examples/quickstart.py [--model smollm2-135m] [--out out/smollm2] [--protocol ppl-512x5]
"""

import argparse
import json

import llmc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="out/smollm2")
    ap.add_argument("--protocol", default="ppl-512x5")
    ap.add_argument("--data", default="wikitext2-test")
    args = ap.parse_args(argv)

    cm = llmc.compile(args.model, passes=["fold_norm_scales"])
    prompt = "The capital of France is"
    print(f"{prompt!r} -> {cm.generate(prompt, max_new_tokens=20)!r}")
    cm.save(args.out, overwrite=True)
    loaded = llmc.load(args.out)  # a torch folder: a CompiledModel
    onnx_dir = llmc.get_backend("onnxruntime").lower(loaded.program, args.out + "-onnx",
                                                     overwrite=True)  # fails loudly unless ORT == torch
    ort = llmc.load(onnx_dir)  # an ONNX folder: an OrtModel, with the same interface
    result = loaded.perplexity(args.data, args.protocol)
    ort_result = ort.perplexity(args.data, args.protocol)
    report = loaded.report()
    print(json.dumps({"saved": args.out, "onnx": onnx_dir, "history": report["history"], "size": report["size"],
                      "perplexity": result.to_json(), "onnxruntime_perplexity": ort_result.to_json()}, indent=2))


if __name__ == "__main__":
    main()
