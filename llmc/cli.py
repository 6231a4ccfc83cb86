"""The `llmc` command line: compile, eval, generate, inspect, export-hf, passes, backends.

Exit status: 0 success; 2 bad input (options, paths, data, model specs, corrupt or incompatible
folders), printed as one line `llmc: error: ...`; 1 a failure while working (tracing, a pass, an export,
a parity check, NaN logits); 130 interrupted. Output folders are written atomically (see
CompiledModel.save).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from llmc.errors import ConfigError, LlmcError


def _open_model(spec: str):
    """A folder some backend wrote is opened by that backend; anything else is traced."""
    import llmc

    from llmc.backend import owner

    backend = owner(spec) if os.path.isdir(spec) else None
    if backend is not None:
        return backend.load(os.path.abspath(spec))
    return llmc.compile(spec)


def _backend_options(args) -> dict:
    """--backend-option KEY=VALUE (repeatable), plus the onnxruntime shortcuts --no-parity / --vq-lowering."""
    options = {}
    for item in args.backend_options:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--backend-option '{item}' has no value; write KEY=VALUE")
        options[key.strip()] = value.strip()
    if args.no_parity:
        options["parity"] = False
    if args.vq_lowering is not None:
        options["vq_lowering"] = args.vq_lowering
    return options


def cmd_compile(args) -> int:
    import llmc
    from llmc.backend import get_backend

    out = os.path.abspath(args.output)
    if os.path.exists(out) and not args.overwrite:
        raise LlmcError(f"{args.output} already exists; choose another folder or pass --overwrite")
    backend = get_backend(args.backend)
    options = backend.options(_backend_options(args))  # checked before anything is traced
    source = args.model
    if os.path.isdir(source):
        from llmc.backend import owner

        folder_backend = owner(source)
        if folder_backend is not None:  # an llmc folder: lower it (and run any further passes) without tracing
            source = folder_backend.load(os.path.abspath(source))
            if not isinstance(source, llmc.CompiledModel):
                raise ConfigError(f"{args.model} is a {folder_backend.name} folder, which cannot be lowered again; "
                                  "give the torch folder it was compiled from (llmc compile MODEL -o DIR)")
    cm = llmc.compile(source, passes=args.passes, calibration=args.calib, seed=args.seed)
    backend.lower(cm.program, out, options, overwrite=args.overwrite)
    size = cm.program.size_report()
    print(f"wrote {args.output} ({args.backend}): {len(cm.program.history)} pass(es), "
          f"{size['total_bytes'] / 1e6:.1f} MB of weights, "
          f"{size['decoder_linear_bits_per_param']:.2f} bits/param over decoder linears")
    return 0


def cmd_eval(args) -> int:
    from llmc import data
    from llmc.eval import Protocol, perplexity

    proto = Protocol.parse(args.protocol)  # validate before loading anything
    data.resolve(args.data)
    model = _open_model(args.model)
    ids = data.tokenize(model.tokenizer, data.text(args.data))
    result = perplexity(model, ids, proto, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(dict(result.to_json(), model=args.model, data=args.data)))
    else:
        print(f"{result.protocol} ({result.windows} windows, {result.tokens} predicted tokens): "
              f"ppl {result.ppl:.2f}")
    return 0


def cmd_eval_context(args) -> int:
    from llmc.context_tasks import context_following, load_examples, task_file

    if args.cad < 0:
        raise ConfigError(f"--cad must be >= 0, got {args.cad}")
    path = args.data or task_file("memotrap" if args.metric == "memotrap" else "cose", "test")
    examples = load_examples(path)  # validated before the model is loaded
    kind = "memotrap" if args.metric == "memotrap" else "kre"
    wrong = [ex.where for ex in examples if ex.task != kind]
    if wrong:
        raise ConfigError(f"{path} is not a {args.metric} file ({wrong[0]} is a {examples[0].task} record)")
    if args.limit:
        examples = examples[:args.limit]
    result = context_following(_open_model(args.model), examples, cad=args.cad)
    if args.json:
        print(json.dumps(dict(result, model=args.model, data=str(path))))
    else:
        print(f"{args.metric} ({result['examples']} examples of {path}{f', CAD alpha {args.cad:g}' if args.cad else ''})")
        print(f"accuracy {result['accuracy']:.3f}")
        print(f"stubbornness {result['stubbornness']:.3f}")
    return 0


def _guided_generate(args) -> int:
    """`generate --guide TUNED UNTUNED --search SPEC`: weak-to-strong search (llmc.search)."""
    import llmc
    from llmc.search import SearchSpec, search

    spec = SearchSpec.parse(args.search or "cbs:w=4,k=4,l=5")
    needs_guides = spec.kind == "eft" or spec.rows > 1
    if needs_guides and not args.guide:
        raise ConfigError(f"--search {spec.name} is steered by a guide pair: add --guide TUNED UNTUNED")
    temperature = 0.7 if args.temperature is None else args.temperature
    top_k = 50 if args.top_k is None else args.top_k

    def fused(spec_or_folder: str, pass_spec: str):  # fuse_guidance on a model's graph, through the registry
        m = _open_model(spec_or_folder)
        if not isinstance(m, llmc.CompiledModel):
            raise ConfigError(f"{spec_or_folder} is an ONNX folder: fuse_guidance fuses graphs; give a model spec, "
                              "a Hugging Face folder or a torch-compiled folder")
        llmc.PassManager([pass_spec]).run(m.program, llmc.PassContext(progress=False))
        return llmc.CompiledModel(m.program)

    model, scorer = None, None
    if args.guide:
        tuned, untuned = (os.path.abspath(g) if os.path.exists(g) else g for g in args.guide)
    if spec.kind == "eft":  # the base and both guides as one step graph
        model = fused(args.model, f"fuse_guidance:mode=eft,tuned={tuned},untuned={untuned},beta={spec.beta}")
    else:
        model = _open_model(args.model)
        if args.guide and spec.rows > 1:
            scorer = fused(tuned, f"fuse_guidance:untuned={untuned}")
    res = search(model, args.prompt, spec, scorer, max_new_tokens=args.max_new_tokens, temperature=temperature,
                 top_k=top_k, top_p=args.top_p, seed=0 if args.seed is None else args.seed,
                 batch_prompts=len(args.prompt), stop=args.stop or None)
    for prompt, text, score in zip(args.prompt, res.texts, res.scores):
        print(prompt + text)
        if score is not None:
            print(f"  (guide score {score:.3f}, {spec.name})", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    from llmc.generation import SamplingConfig

    if args.guide or args.search:
        return _guided_generate(args)
    args.temperature = 1.0 if args.temperature is None else args.temperature
    args.top_k = 0 if args.top_k is None else args.top_k
    SamplingConfig(args.max_new_tokens, args.sample, args.temperature, args.top_k, args.top_p, args.seed)
    model = _open_model(args.model)
    outs = model.generate(args.prompt, args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop or None,
                          progress=True)
    for prompt, text in zip(args.prompt, outs):
        print(prompt + text)
    return 0


def cmd_verify(args) -> int:
    from llmc.backend import owner
    from llmc.fsutil import verify_folder

    folder = os.path.abspath(args.folder)
    if not os.path.isdir(folder):
        raise ConfigError(f"no such folder: {args.folder}")
    n = verify_folder(folder, required=True)
    backend = owner(folder)
    if backend is not None:
        backend.load(folder)  # the backend's own checks (manifest, versions, a session that opens)
    print(f"{args.folder}: {n} files match their checksums" + (f"; opens as a {backend.name} model" if backend else ""))
    return 0


def cmd_inspect(args) -> int:
    model = _open_model(args.model)
    rep = model.report()
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(f"{rep['name']} ({rep['architecture']}, {rep['layers']} layers, backend {rep['backend']})")
    print("passes:", ", ".join(h["spec"] for h in rep["history"]) or "none")
    print("cache layout:")
    for c in rep["cache_layout"][:2]:
        print(f"  past_key_values.{{i}}.{c['kind']}: {c['dtype']} {c['shape']} ({c['meaning']})")
    print(f"  ... {len(rep['cache_layout'])} tensors in all")
    print("ops:")
    for name, n in rep["ops"].items():
        print(f"  {n:6d}  {name}")
    size = rep["size"]
    print("size:")
    for comp, c in size["components"].items():
        print(f"  {comp:16s} {c['bytes'] / 1e6:10.3f} MB  {c['numel']:>12,d} elements  {c['bits_per_element']:6.2f} bits")
    if "decoder_linear_bits_per_param" in size:
        print(f"  total {size['total_bytes'] / 1e6:.3f} MB; decoder linears {size['decoder_linear_bits_per_param']:.2f} "
              f"bits/param over {size['decoder_linear_params']:,d} weights")
    for name, nbytes in size.get("files", {}).items():
        print(f"  file {name}: {nbytes / 1e6:.3f} MB")
    for t in size["tied"]:
        print(f"  tied: {t}")
    kv = size.get("kv_cache")
    if kv:
        print(f"  kv cache: {kv['bits_per_channel']:.2f} bits/channel, {kv['bytes_per_token']:g} bytes per token "
              f"({kv['stored_bytes_per_token']} stored), {kv['fixed_bytes']} fixed bytes")
    return 0


def cmd_export_hf(args) -> int:
    import llmc
    from llmc.export_hf import save_aqlm

    out = os.path.abspath(args.output)
    if os.path.exists(out) and not args.overwrite:
        raise LlmcError(f"{args.output} already exists; choose another folder or pass --overwrite")
    if not os.path.isfile(os.path.join(args.model, "manifest.json")):
        raise ConfigError(f"{args.model} is not a compiled llmc folder; compile one with "
                          "`llmc compile MODEL --pass pv_quant --calib DATA -o DIR`")
    save_aqlm(llmc.load(args.model), out, overwrite=args.overwrite)
    with open(os.path.join(out, "config.json")) as f:
        q = json.load(f)["quantization_config"]
    print(f"wrote {args.output} (Hugging Face AQLM checkpoint, {q['num_codebooks']}x{q['nbits_per_codebook']} bits "
          f"per group of {q['in_group_size']}); load it with transformers and the aqlm package")
    return 0


def cmd_backends(args) -> int:
    from llmc.backend import available_backends, get_backend
    from llmc.passes_base import pass_options

    for name in available_backends():
        backend = get_backend(name)
        doc = (type(backend).__doc__ or "").strip().splitlines()[0]
        print(f"{name}: {doc}")
        for opt, tp, default, help_ in pass_options(backend.Options):
            print(f"    {opt} ({tp}, default {default!r}){': ' + help_ if help_ else ''}")
    return 0


def cmd_passes(args) -> int:
    from llmc.passes_base import pass_options, registered_passes

    for name, cls in registered_passes().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name}: {doc}")
        for opt, tp, default, help_ in pass_options(cls):
            print(f"    {opt} ({tp}, default {default!r}){': ' + help_ if help_ else ''}")
        if cls.requires or cls.provides or cls.invalidates:
            print(f"    requires {list(cls.requires)}, provides {list(cls.provides)}, "
                  f"invalidates {list(cls.invalidates)}")
    return 0


EXIT_CODES = ("exit status: 0 success; 2 bad input (options, paths, data, model specs, corrupt or incompatible "
              "folders); 1 a failure while working (tracing, a pass, an export, a parity check, NaN logits); "
              "130 interrupted")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default where it has one (choices are shown by argparse itself)."""

    def _get_help_string(self, action):
        if action.default in (None, False, [], argparse.SUPPRESS) or not action.help:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        kwargs.setdefault("epilog", EXIT_CODES)
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line, exit 2
        print(f"llmc: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="llmc", description="Model-transformation compiler for LLMs.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compile", help="trace a model, run passes, save the compiled folder")
    c.add_argument("model", help="smollm2-135m, a Hugging Face folder, a .gguf file or a hub id")
    c.add_argument("--pass", dest="passes", action="append", default=[], metavar="SPEC",
                   help="name[:key=value,...]; repeat for a pipeline (see `llmc passes`)")
    c.add_argument("--calib", help="calibration data set name or file (e.g. wikitext2-valid)")
    c.add_argument("-o", "--output", required=True, help="output folder (must not exist)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--backend", default="torch", help="a backend of `llmc backends`: torch (the default) or "
                   "onnxruntime (an ONNX folder)")
    c.add_argument("--backend-option", dest="backend_options", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the backend (see `llmc backends`); repeatable")
    c.add_argument("--no-parity", action="store_true", help="onnxruntime: skip the ONNX-vs-torch parity check")
    c.add_argument("--vq-lowering", default=None, choices=["auto", "kernel", "dequantize"],
                   help="onnxruntime: vector-quantized layers as llmc's custom op, reading uint8 codes at run time "
                        "(kernel; the folder carries the op's library), or as standard ONNX that ONNX Runtime "
                        "dequantizes at load (dequantize); auto: kernel where a C compiler can build it")
    c.set_defaults(fn=cmd_compile)

    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="metric", required=True, parser_class=_Parser)
    ppl = esub.add_parser("ppl", help="perplexity under a protocol (see --protocol)")
    ppl.add_argument("model", help="a compiled folder or anything `compile` accepts")
    ppl.add_argument("--protocol", default="ppl-512x40",
                     help="ppl-<window>x<windows>[-kv]: the first <windows> non-overlapping windows of <window> "
                          "tokens, e.g. ppl-512x40, ppl-512x5; -kv feeds each window through the KV cache in "
                          "chunks")
    ppl.add_argument("--data", default="wikitext2-test", help="data set name or file")
    ppl.add_argument("--batch-size", type=int, default=1)
    ppl.add_argument("--json", action="store_true", help="print the result as JSON")
    ppl.set_defaults(fn=cmd_eval)
    for metric, what in (("memotrap", "MemoTrap JSONL (default: the shared test file)"),
                         ("kre", "KRE JSON, e.g. COSE_KRE (default: the shared COSE_KRE test file)")):
        ctx = esub.add_parser(metric, help=f"{metric}: accuracy (follows the context) and stubbornness (gives "
                                           "the memorised answer)")
        ctx.add_argument("model", help="a compiled or ONNX folder, or anything `compile` accepts")
        ctx.add_argument("--data", help=what)
        ctx.add_argument("--cad", type=float, default=0.0, metavar="ALPHA",
                         help="context-aware decoding: logits (1+ALPHA)*with-context - ALPHA*without (0: off)")
        ctx.add_argument("--limit", type=int, default=0, help="the first N examples only (0: all)")
        ctx.add_argument("--json", action="store_true", help="print the result as JSON")
        ctx.set_defaults(fn=cmd_eval_context)

    g = sub.add_parser("generate", help="continue prompts")
    g.add_argument("model")
    g.add_argument("prompt", nargs="+", help="one or more prompts (batched together)")
    g.add_argument("--max-new-tokens", type=int, default=20)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=None, help="default 1.0 (0.7 with --search)")
    g.add_argument("--top-k", type=int, default=None, help="default 0: off (50 with --search)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="a single-token stop string (repeatable)")
    g.add_argument("--guide", nargs=2, metavar=("TUNED", "UNTUNED"),
                   help="steer with a small tuned / untuned pair (weak-to-strong search; see --search)")
    g.add_argument("--search", metavar="SPEC", help="cbs:w=W,k=K,l=L (default cbs:w=4,k=4,l=5), bon:n=N, "
                                                    "sampling or eft:beta=B")
    g.set_defaults(fn=cmd_generate)

    v = sub.add_parser("verify", help="check a compiled or exported folder: every file's size and sha256, "
                                      "and that its backend opens it")
    v.add_argument("folder")
    v.set_defaults(fn=cmd_verify)

    i = sub.add_parser("inspect", help="op histogram, layers, cache layout, size report")
    i.add_argument("model")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    x = sub.add_parser("export-hf", help="write a pv_quant model as a Hugging Face AQLM checkpoint")
    x.add_argument("model", help="a compiled folder (llmc compile ... --pass pv_quant)")
    x.add_argument("-o", "--output", required=True, help="output folder (must not exist)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    x.set_defaults(fn=cmd_export_hf)

    ps = sub.add_parser("passes", help="list registered passes and their options")
    ps.set_defaults(fn=cmd_passes)

    bs = sub.add_parser("backends", help="list registered backends and their options")
    bs.set_defaults(fn=cmd_backends)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except LlmcError as e:
        from llmc.errors import ArtifactError, ConfigError, DataError, ModelLoadError, UnsupportedArchitectureError

        print(f"llmc: error: {e}", file=sys.stderr)
        bad_input = (ArtifactError, ConfigError, DataError, ModelLoadError, UnsupportedArchitectureError)
        return 2 if isinstance(e, bad_input) or type(e) is LlmcError else 1
    except KeyboardInterrupt:
        print("llmc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
